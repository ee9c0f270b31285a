"""Search for a DP-SGD regime that learns, on a validation split carved from train (never on test).

Why: the privacy sweep is only worth reading if DP visibly learns; which knobs make it learn (logical batch, steps,
clip, learning rate, rank, adapted layers) is found by measurement, and tuning on the test split would report an
optimistic number. Every variant is one in-process federation (simulations.cells) with
``data.validation-fraction`` set, so its accuracy is on held-out *training* paragraphs. Variants run in one process
and share the cached frozen prefix of each client's data. Finished variants are reused (as the sweep's cells).

Run: HF_HUB_OFFLINE=1 python benchmarks/dp_regime.py [--variants base,lr2e-2,...] [--epsilon 8] [--out runs/dp-regime]
     python benchmarks/dp_regime.py --list          # the variants and what each changes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedlora.cli import parse_overrides, quiet_flower
from fedlora.config import FedLoraConfig
from simulations.cells import run_or_reuse
from simulations.privacy_sweep import PRESETS

# What every variant starts from: the sweep's MiniLM preset, evaluated on validation instead of test.
VALIDATION = {"data.validation-fraction": 0.15}

# name -> the run-config keys it changes from the preset (before the command line's --set).
VARIANTS: dict[str, dict[str, Any]] = {
    "preset": {},
    "4-clients-4-steps": {"__clients": 4, "train.local-steps": 4},
    "old": {"adapter.target-modules": "query,value", "train.cache-frozen-layers": False, "train.batch-size": 32,
            "train.local-steps": 10, "privacy.clip": 1.0, "train.lr": 5e-3},
    "lr-1e-2": {"train.lr": 1e-2},
    "lr-2e-2": {"train.lr": 2e-2},
    "clip-0.1": {"privacy.clip": 0.1},
    "clip-10": {"privacy.clip": 10.0},
    "batch-64": {"train.batch-size": 64, "train.local-steps": 12},  # the same example-gradients as the preset
    "rank-2": {"adapter.rank": 2},
    "top-2": {"adapter.target-modules": r".*layer\.(4|5)\..*(query|value)"},
    "clients-8": {"__clients": 8},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--methods", default="fedit")
    p.add_argument("--epsilons", default="8,inf", help="target epsilons; inf = no DP")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="runs/dp-regime")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        for name, change in VARIANTS.items():
            print(f"{name:12s} {change or '(the preset)'}")
        return
    quiet_flower()
    preset = PRESETS["minilm"]
    rows = []
    for name in args.variants.split(","):
        change = dict(VARIANTS[name])
        clients = change.pop("__clients", preset["num_clients"])
        for method in args.methods.split(","):
            for eps in (float(e) for e in args.epsilons.split(",")):
                priv = ({"privacy.mode": "none", "privacy.target-epsilon": 0.0} if eps == float("inf")
                        else {"privacy.mode": "sample", "privacy.target-epsilon": eps})
                out = Path(args.out) / f"{name}-{method}-eps{eps:g}"
                cfg = FedLoraConfig.from_run_config({
                    **preset["overrides"], "model.name": "minilm", "num-server-rounds": preset["rounds"], **VALIDATION,
                    **change, **parse_overrides(args.set), **priv, "method.name": method, "seed": args.seed,
                    "output-dir": str(out)}).to_run_config()
                s = run_or_reuse(f"{name} {method} eps={eps:g}", method, cfg, out, clients)
                rows.append((name, method, eps, s.get("final_accuracy"), s.get("best_accuracy"), s.get("final_loss"),
                             s.get("wall_seconds")))
    print("\n| variant | method | epsilon | val final acc | val best acc | val loss | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, method, eps, fa, ba, fl, w in rows:
        print(f"| {name} | {method} | {eps:g} | {fa:.3f} | {ba:.3f} | {fl:.3f} | {w:.0f} |")
    (Path(args.out) / "regime.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
