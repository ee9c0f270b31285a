"""One experiment cell = one in-process federation with a fixed run config; shared by compare and the sweep.

Runs go through the real ServerApp and ClientApp on :class:`fedlora.localgrid.LocalGrid` (no ray, one process),
so every method of a comparison sees the same model, partition and seed. A cell whose folder already holds a
finished run with the same config is reused: an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

IGNORED_ON_RESUME = ("output-dir", "resume")  # keys that may differ between a finished cell and its re-request


def run_method(method: str, base: dict[str, Any], out: Path, num_clients: int) -> dict:
    """Run one federation with ``base`` and ``method.name=method`` into ``out``; returns its summary.json."""
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from fedlora.config import FedLoraConfig
    from fedlora.localgrid import LocalGrid
    from server.app import make_server_app

    cfg = FedLoraConfig.from_run_config({**base, "method.name": method, "output-dir": str(out)}).to_run_config()
    grid = LocalGrid(make_client_app(cfg), num_clients)
    make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return json.loads((Path(out) / "summary.json").read_text())


def run_or_reuse(tag: str, method: str, cfg: dict[str, Any], out: Path, num_clients: int) -> dict:
    """One cell with a progress line: reuse a finished run with this config, else run it; warn about rounds in
    which nothing was aggregated. Returns the cell's summary."""
    import time

    summary = finished(out, cfg)
    if summary is not None:
        print(f"{tag} ... reused {out} (final acc {_f(summary.get('final_accuracy'))})", flush=True)
    else:
        print(f"{tag} ... running -> {out}", flush=True)
        t0 = time.perf_counter()
        summary = run_method(method, cfg, out, num_clients)
        spent = "" if summary.get("epsilon") is None else f", epsilon spent {summary['epsilon']:.2f}"
        print(f"{tag} ... final acc {_f(summary.get('final_accuracy'))}{spent} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    if bad := empty_rounds(out):
        print(f"{tag} ... WARNING: no client update aggregated in round(s) {bad}; see the 'rejected' and 'failed' "
              f"reasons in {out / 'metrics.jsonl'} (delete {out} to re-run it)", flush=True)
    return summary


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def finished(out: Path, cfg: dict[str, Any]) -> dict | None:
    """The cell's summary if it finished with this config (same rounds, same run.json config), else None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("rounds") != cfg["num-server-rounds"]:
        return None
    try:
        ran = json.loads((out / "run.json").read_text())["run_config"]
    except (OSError, ValueError, KeyError):
        return summary  # an older folder without run.json: the rounds check is all we have
    # A key the finished run did not know yet (added to fedlora since) counts as its default.
    from fedlora.config import FedLoraConfig

    defaults = FedLoraConfig().to_run_config()
    same = all(ran.get(k, defaults.get(k)) == v for k, v in cfg.items() if k not in IGNORED_ON_RESUME)
    return summary if same else None


def metrics(out: Path) -> list[dict[str, Any]]:
    """The rows of a cell's metrics.jsonl (round 0 = before training), [] if absent or unreadable."""
    try:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def empty_rounds(out: Path) -> list[int]:
    """Rounds in which no client update was aggregated (every client failed or was rejected)."""
    return [r["round"] for r in metrics(out) if r.get("round", 0) > 0 and r.get("clients_aggregated") == 0]


def add_common_arguments(p: argparse.ArgumentParser, real_help: str, per: str) -> None:
    """Options every experiment runner shares: the model (or ``--real``), rounds, clients, ``--set``.
    ``per`` names what one federation is in that runner ("method", "cell") for the help texts."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="tiny", help="tiny | minilm | local model folder")
    which.add_argument("--real", action="store_true", help=real_help)
    p.add_argument("--rounds", type=int, help=f"server rounds per {per} (default: the model's preset)")
    p.add_argument("--num-clients", type=int, help="clients per federation (default: the model's preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any run-config key for every {per}, e.g. adapter.rank=4")


def preset_base(args: argparse.Namespace, presets: dict[str, dict[str, Any]], default: dict[str, Any],
                extra: dict[str, Any] | None = None) -> tuple[str, int, int, dict[str, Any]]:
    """(model, rounds, clients, base run config) from the common options and the runner's per-model presets;
    ``--set`` pairs win over the preset and ``extra``."""
    from fedlora.cli import parse_overrides

    model = "minilm" if args.real else args.model
    preset = presets.get(model, default)
    rounds = args.rounds or preset["rounds"]
    base = {**preset["overrides"], "model.name": model, "num-server-rounds": rounds, **(extra or {}),
            **parse_overrides(args.set)}
    return model, rounds, args.num_clients or preset["num_clients"], base


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    """One row per cell; a missing value (None) is an empty field."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def runner_main(add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser], description: str,
                prog: str, argv: list[str] | None) -> int:
    """``python -m simulations.<runner>``: parse, run, and turn a config error into one line and exit status 2."""
    from fedlora.config import ConfigError

    args = add_arguments(argparse.ArgumentParser(description=description)).parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
