"""Run outputs: resolved config + seeds + library versions, per-round metrics, a progress line, a plot.

Everything a reader needs to reproduce or compare a run lands in its output folder:
``run.json`` (config, seed, versions, machine), ``metrics.jsonl`` (one line per round),
``metrics.png`` (accuracy and loss per round), ``server_state-<round>.safetensors`` (the last
keep-checkpoints checkpoints), ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.config import FedLoraConfig

PACKAGES = ("fedlora", "flwr", "torch", "transformers", "numpy", "safetensors", "flwr-datasets", "datasets",
            "opacus", "peft")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def _fmt_count(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


class Reporter:
    def __init__(self, cfg: FedLoraConfig, output_dir: str | Path, printer=print) -> None:
        self.cfg = cfg
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.printer = printer
        self.rows: list[dict[str, Any]] = []
        self.t_start = time.perf_counter()

    def start(self, extra: dict[str, Any] | None = None, keep_history: bool = False,
              history: list[dict[str, Any]] | None = None) -> None:
        """Write run.json; start metrics.jsonl afresh, or keep its rows when resuming a run: ``history`` (the
        rows saved in the checkpoint resumed from, which rewrite metrics.jsonl: rows of rounds after that
        checkpoint are dropped) or else the file's own rows."""
        info = {"config": self.cfg.to_dict(), "run_config": self.cfg.to_run_config(), "seed": self.cfg.run.seed,
                "versions": versions(), "platform": platform.platform(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **(extra or {})}
        (self.dir / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        # A summary marks a finished run (experiment runners reuse such folders): an earlier run's must not
        # outlive this one's start.
        (self.dir / "summary.json").unlink(missing_ok=True)
        metrics = self.dir / "metrics.jsonl"
        if keep_history and history is not None:
            self.rows = [dict(r) for r in history]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif keep_history and metrics.exists():
            self.rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        else:
            metrics.write_text("")
        self.printer(f"fedlora: method={self.cfg.method.name} model={self.cfg.model.name} "
                     f"data={self.cfg.data.source} rounds={self.cfg.run.num_server_rounds} -> {self.dir}")

    def round(self, stats) -> None:
        row = dataclasses.asdict(stats)
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.printer(self.line(row))

    @staticmethod
    def line(row: dict[str, Any]) -> str:
        def f(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        parts = [f"round {row['round']:>3}"]
        if row["round"] > 0:
            parts += [f"clients {row['clients_aggregated']}/{row['clients_sampled']}",
                      f"train loss {f(row['train_loss'])}"]
            if row["fed_accuracy"] is not None:
                parts.append(f"fed acc {f(row['fed_accuracy'])}")
        parts.append(f"test loss {f(row['global_loss'])} acc {f(row['global_accuracy'])}")
        if row.get("global_perplexity") is not None:
            parts.append(f"ppl {row['global_perplexity']:.2f}")
        if row["round"] > 0:
            parts += [f"down {_fmt_bytes(row['bytes_down'])} up {_fmt_bytes(row['bytes_up'])}",
                      f"{row['seconds']:.1f} s"]
        if row.get("tokens_per_second") is not None:
            parts.append(f"{_fmt_count(row['tokens_per_second'])} tok/s")
        if row.get("peak_memory_mb") is not None:
            parts.append(f"peak {_fmt_bytes(row['peak_memory_mb'] * 2**20)}")
        errors = [(d, row.get(k)) for d, k in (("down", "wire_error_down"), ("up", "wire_error_up"))]
        if any(e is not None for _, e in errors):
            parts.append("wire err " + " ".join(f"{d} {e:.1e}" for d, e in errors if e is not None))
        if row.get("epsilon") is not None:
            parts.append(f"eps {row['epsilon']:.2f}")
        if row["rejected"]:
            parts.append(f"rejected {len(row['rejected'])}")
        if row.get("failed"):
            parts.append(f"failed {len(row['failed'])}")
        if row.get("exhausted"):
            parts.append(f"budget spent {len(row['exhausted'])}")
        return " | ".join(parts)

    def finish(self) -> dict[str, Any]:
        trained = [r for r in self.rows if r["round"] > 0]
        acc = [r["global_accuracy"] for r in self.rows if r["global_accuracy"] is not None]
        summary = {
            "method": self.cfg.method.name,
            "rounds": len(trained),
            "initial_accuracy": self.rows[0]["global_accuracy"] if self.rows and self.rows[0]["round"] == 0 else None,
            "final_accuracy": acc[-1] if acc else None,
            "best_accuracy": max(acc) if acc else None,
            "final_loss": self.rows[-1]["global_loss"] if self.rows else None,
            "bytes_down_per_round": [r["bytes_down"] for r in trained],
            "bytes_up_per_round": [r["bytes_up"] for r in trained],
            "wall_seconds": time.perf_counter() - self.t_start,
            # DP: the largest epsilon any client spent (sample-level) or the federation's (client-level)
            "epsilon": max((r["epsilon"] for r in self.rows if r.get("epsilon") is not None), default=None),
            # DP-SGD: each client's epsilon when it last trained (clients may have budgets of their own)
            "client_epsilon": {node: eps for r in self.rows for node, eps in (r.get("client_epsilon") or {}).items()},
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.plot()
        self.printer(f"done in {summary['wall_seconds']:.1f} s: test accuracy "
                     f"{summary['initial_accuracy']} -> {summary['final_accuracy']} (outputs in {self.dir})")
        return summary

    def plot(self) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rounds = [r["round"] for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax1.plot(rounds, [r["global_accuracy"] for r in self.rows], marker="o", label="server test")
        if any(r["fed_accuracy"] is not None for r in self.rows):
            ax1.plot(rounds, [r["fed_accuracy"] for r in self.rows], marker="s", label="federated eval")
        ax1.set(xlabel="round", ylabel="accuracy", title=f"{self.cfg.method.name}: accuracy")
        ax1.legend()
        ax2.plot(rounds, [r["global_loss"] for r in self.rows], marker="o", label="server test")
        ax2.plot(rounds, [r["train_loss"] for r in self.rows], marker="^", label="client train")
        ax2.set(xlabel="round", ylabel="loss", title="loss")
        ax2.legend()
        from matplotlib.ticker import MaxNLocator

        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = self.dir / "metrics.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
