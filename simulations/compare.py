"""Run several aggregation methods on the same model, data, partition and seed; print and save a table and a
plot (accuracy per round, one line per method).

    python -m simulations.compare --methods fedit,ffa,flora,lora_fair,fed_sb,fedsvd --model minilm --rounds 3
    python -m simulations.compare --model tiny --rounds 2 --set train.local-steps=4      # a quick look

Each method's run folder (config, metrics, checkpoint) lands under --output; ``compare.md``/``compare.csv``/
``compare.png`` summarise them. Methods already finished in that folder are not re-run (delete to redo).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from fedlora.aggregation import available
from fedlora.cli import parse_overrides, quiet_flower
from fedlora.config import FedLoraConfig

COLUMNS = ["method", "initial_accuracy", "final_accuracy", "best_accuracy", "final_loss", "bytes_down_per_round",
           "bytes_up_per_round", "wall_seconds"]


def run_method(method: str, base: dict, out: Path, num_clients: int) -> dict:
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from fedlora.localgrid import LocalGrid
    from server.app import make_server_app

    cfg = FedLoraConfig.from_run_config({**base, "method.name": method, "output-dir": str(out)}).to_run_config()
    grid = LocalGrid(make_client_app(cfg), num_clients)
    make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return json.loads((out / "summary.json").read_text())


def table(rows: list[dict]) -> str:
    lines = ["| method | acc round 0 | final acc | best acc | final loss | down / round | up / round | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        down, up = r["bytes_down_per_round"][-1] / 1e3, r["bytes_up_per_round"][-1] / 1e3
        lines.append(f"| {r['method']} | {r['initial_accuracy']:.3f} | {r['final_accuracy']:.3f} | "
                     f"{r['best_accuracy']:.3f} | {r['final_loss']:.3f} | {down:,.1f} kB | {up:,.1f} kB "
                     f"| {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        hist = [json.loads(x) for x in (root / r["method"] / "metrics.jsonl").read_text().splitlines()]
        ax.plot([h["round"] for h in hist], [h["global_accuracy"] for h in hist], marker="o", label=r["method"])
    ax.set(xlabel="round", ylabel="test accuracy", title="fedlora: methods compared")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(available()))
    p.add_argument("--model", default="minilm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-clients", type=int, default=4)
    p.add_argument("--output", default="runs/compare")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    quiet_flower()
    root = Path(args.output)
    base = {"model.name": args.model, "num-server-rounds": args.rounds, **parse_overrides(args.set)}
    rows = []
    for method in args.methods.split(","):
        out = root / method
        done = out / "summary.json"
        if done.exists() and json.loads(done.read_text()).get("rounds") == args.rounds:
            print(f"{method}: already done, reusing {done}")
            rows.append(json.loads(done.read_text()))
            continue
        t0 = time.perf_counter()
        rows.append(run_method(method, base, out, args.num_clients))
        print(f"{method}: {time.perf_counter() - t0:.0f} s")
    md = table(rows)
    print(md)
    (root / "compare.md").write_text(md + "\n")
    with open(root / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, root / "compare.png", root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
