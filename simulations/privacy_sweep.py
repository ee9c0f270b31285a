"""Final accuracy against the privacy budget: target epsilons x aggregation methods, same data, partition, seed.

    python -m simulations.privacy_sweep                                   # tiny model, eps 1,3,8,inf, 4 methods
    python -m simulations.privacy_sweep --real                            # the pretrained MiniLM
    python -m simulations.privacy_sweep --epsilons 2,inf --methods fedit,fedsvd --set privacy.delta=1e-6
    python -m simulations.privacy_sweep --seeds 0,1,2                     # every cell 3 times: mean +- std
    python -m simulations.privacy_sweep --tune-lr 1e-2,5e-2               # each method's lr tuned on validation
    python -m simulations.privacy_sweep --real --mode client --methods fedit   # DP-FedAvg, 1000 clients, 100 a round

Each cell (method, target epsilon) is one in-process federation (simulations.cells), with ``privacy.mode=sample``
(DP-SGD on every client) and ``privacy.target-epsilon=eps``; ``inf`` is the no-DP baseline (``privacy.mode=none``).
``--mode client`` (or ``--set privacy.mode=client``) sweeps client-level DP (DP-FedAvg) instead, with presets of
many clients (``CLIENT_PRESETS``); every cell, the no-DP one too, then weights clients uniformly. Cell folders land
under ``<output>/<method>-eps<eps>/`` (with ``--seeds``, one ``seed-<s>/`` inside per seed; ``--real`` runs 3 seeds,
42,43,44, unless told otherwise). ``--tune-lr`` (on by default for ``--real``) first runs each method at
``--tune-epsilon`` and without DP once per learning rate on a validation split carved from train
(``<cell>/tune/lr-<lr>/``, ``tuning.csv``), then runs its DP cells at the best lr under DP and its no-DP cell at the
best without. ``sweep.md`` shows mean +- std over the seeds and their count n, ``sweep.csv`` has one row per (cell,
seed), ``sweep-mean.csv`` one per cell (n, ``<col>_mean``, ``<col>_std``), ``sweep.png`` the mean with +- std error
bars. A run whose ``summary.json`` has the requested rounds and whose ``run.json`` has the same config is reused, so
an interrupted sweep continues where it stopped and a seed added later runs only that seed (delete a folder to redo
it).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from fedlora.cli import quiet_flower
from fedlora.config import ConfigError, FedLoraConfig
from simulations.cells import (
    TUNING_COLUMNS,
    Job,
    add_common_arguments,
    aggregate,
    aggregate_columns,
    parse_list,
    parse_lrs,
    pm,
    preset_base,
    resolve_seeds,
    run_jobs,
    runner_main,
    tune_lr,
    write_csv,
)

COLUMNS = ["method", "epsilon", "seed", "epsilon_spent", "final_accuracy", "best_accuracy", "final_loss",
           "bytes_up_per_round", "lr", "wall_seconds"]
# sweep-mean.csv: mean and std of what the seed changes; the mean alone of what it does not (the accountant's
# epsilon and the bytes are fixed by the config) or what is a cost rather than a result.
KEYS = ["method", "epsilon"]
SPREAD = ["final_accuracy", "best_accuracy", "final_loss"]
MEAN_ONLY = ["epsilon_spent", "bytes_up_per_round", "lr", "wall_seconds"]
MEAN_COLUMNS = aggregate_columns(KEYS, SPREAD, MEAN_ONLY)

# Per-model settings, overridable with --rounds/--num-clients/--set. The tiny random BERT is for a quick look
# (short sequences, few steps). MiniLM runs the DP regime found on a validation split by benchmarks/dp_regime.py
# (README "Privacy"): adapters on the top layer only over the cached frozen layers below, so that logical batches of
# 256 are affordable, few clients (more examples each, a lower sampling rate), over 3 seeds so that a trade-off can be
# told from the seed spread (--seeds 42 for one), each method at its own learning rate (tuned on validation at
# epsilon 8 under DP and on its own without; --tune-lr off keeps train.lr).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"rounds": 3, "num_clients": 4,
             "overrides": {"train.local-steps": 10, "model.max-length": 32, "data.max-eval-examples": 200}},
    "minilm": {"rounds": 4, "num_clients": 3, "seeds": 3, "tune_lr": "2e-2,5e-2,1e-1,2e-1", "overrides": {
        "adapter.target-modules": r".*layer\.5\..*(query|value)", "train.cache-frozen-layers": True,
        "train.batch-size": 256, "train.local-steps": 3, "train.lr": 5e-2, "data.partition": "iid",
        "fraction-evaluate": 0.0}},
}
DEFAULT_PRESET = {"rounds": 3, "num_clients": 4, "overrides": {}}

# ``--mode client`` (DP-FedAvg): the noise on the server's mean of m clipped updates has norm z S sqrt(d) / m, and at a
# fixed budget z grows with the sampling rate m / N, so only many clients make it small (docs/privacy.md "Client-level
# DP at scale"). MiniLM: 1000 clients of about 11 paragraphs each, 100 of them a round, the DP-SGD preset's adapters
# over the cached frozen layers (d = 14.6k), clip S near the median update norm of 3 local AdamW steps (about 9
# at lr 5e-2, measured), so that clipping keeps the updates' size and the noise is what the budget costs.
CLIENT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"rounds": 3, "num_clients": 20, "overrides": {
        "train.local-steps": 5, "model.max-length": 32, "data.max-eval-examples": 200, "fraction-train": 0.5,
        "method.weighting": "uniform", "data.partition": "iid"}},
    "minilm": {"rounds": 5, "num_clients": 1000, "seeds": 3, "overrides": {
        "adapter.target-modules": r".*layer\.5\..*(query|value)", "train.cache-frozen-layers": True,
        "train.batch-size": 256, "train.local-steps": 3, "train.lr": 5e-2, "data.partition": "iid",
        "fraction-evaluate": 0.0, "fraction-train": 0.1, "method.weighting": "uniform", "privacy.clip": 8.0}},
}
MODES = ("sample", "client")


def dp_mode(args: argparse.Namespace) -> str:
    """The DP of the sweep's finite-epsilon cells: ``--mode``, else ``--set privacy.mode=...``, else sample (DP-SGD)."""
    from fedlora.cli import parse_overrides

    given = parse_overrides(args.set).get("privacy.mode")
    mode = args.mode or given or "sample"
    if mode not in MODES:
        raise ConfigError(f"privacy.mode={mode!r}: the sweep's DP cells run 'sample' (DP-SGD) or 'client' (DP-FedAvg); "
                          "the no-DP cell is epsilon 'inf' in --epsilons")
    if args.mode and given and given != args.mode:
        raise ConfigError(f"--mode {args.mode} and --set privacy.mode={given} disagree; keep one")
    return mode


def parse_epsilons(text: str) -> list[float]:
    """'1,3,8,inf' -> [1.0, 3.0, 8.0, inf]; every value > 0, each once."""
    return list(parse_list(text, "--epsilons", float, "a number", "1,3,8,inf", "epsilon",
                           lambda e: None if e > 0 else "must be > 0 ('inf' = no DP)"))


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def cell_dir(root: Path, method: str, eps: float) -> Path:
    return root / f"{method}-eps{eps_label(eps)}"


def cell_config(base: dict[str, Any], method: str, eps: float, out: Path) -> dict[str, Any]:
    """The full, validated run config of one cell. ``base`` may name privacy.mode (sample or client)."""
    mode = base.get("privacy.mode", "sample")
    if math.isinf(eps):
        privacy = {"privacy.mode": "none", "privacy.target-epsilon": 0.0}
    elif mode == "none":
        raise ConfigError("privacy.mode=none in --set contradicts a finite epsilon; use 'sample' or 'client'")
    else:
        privacy = {"privacy.mode": mode, "privacy.target-epsilon": eps}
    cfg = {**base, **privacy, "method.name": method, "output-dir": str(out)}
    return FedLoraConfig.from_run_config(cfg).to_run_config()


def tuning_group(tag: str) -> str:
    """The learning-rate group of a cell tagged '<method> eps=<eps>': its method with DP, or without."""
    method, eps = tag.split(" eps=")
    return f"{method} no DP" if eps == "inf" else f"{method} DP"


def row(method: str, eps: float, seed: int, summary: dict, lr: float | None = None) -> dict[str, Any]:
    up = summary.get("bytes_up_per_round") or []
    return {"method": method, "epsilon": eps_label(eps), "seed": seed, "epsilon_spent": summary.get("epsilon"),
            "final_accuracy": summary.get("final_accuracy"), "best_accuracy": summary.get("best_accuracy"),
            "final_loss": summary.get("final_loss"), "bytes_up_per_round": up[-1] if up else None, "lr": lr,
            "wall_seconds": summary.get("wall_seconds")}


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    """The markdown table of the aggregate rows (one per cell): results as mean +- std over the n seeds."""
    lines = ["| method | epsilon | n | epsilon spent | final acc | best acc | final loss | up / round | lr | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        up = "-" if r["bytes_up_per_round"] is None else f"{r['bytes_up_per_round'] / 1e3:,.1f} kB"
        lines.append(f"| {r['method']} | {r['epsilon']} | {r['n']} | {_f(r['epsilon_spent'], '.2f')} | "
                     f"{pm(r, 'final_accuracy')} | {pm(r, 'best_accuracy')} | {pm(r, 'final_loss')} | {up} | "
                     f"{_f(r.get('lr'), 'g')} | {_f(r['wall_seconds'], '.0f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, mode: str = "sample") -> None:
    """Final accuracy (mean over the seeds, error bars +- one std) vs epsilon on a log axis, each method nudged
    sideways; the no-DP point sits one step right of the largest epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] != "inf"})
    no_dp = finite[-1] * 4 if finite else 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        dodge = 1.06 ** (i - (len(methods) - 1) / 2)  # methods side by side at each epsilon: bars do not overlap
        pts = sorted((no_dp if r["epsilon"] == "inf" else float(r["epsilon"]),
                      math.nan if r["final_accuracy_mean"] is None else r["final_accuracy_mean"],
                      r["final_accuracy_std"] or 0.0)
                     for r in rows if r["method"] == method)
        n = max(r["n"] for r in rows if r["method"] == method)
        ax.errorbar([x * dodge for x, _, _ in pts], [y for _, y, _ in pts], yerr=[s for _, _, s in pts], marker="o",
                    capsize=3, label=method if n == 1 else f"{method} (n={n})")
    ax.set_xscale("log")
    ticks = finite + ([no_dp] if any(r["epsilon"] == "inf" for r in rows) else [])
    ax.set_xticks(ticks, [f"{t:g}" for t in finite] + (["no DP"] if len(ticks) > len(finite) else []))
    ax.minorticks_off()
    if finite and len(ticks) > len(finite):
        ax.axvline(math.sqrt(finite[-1] * no_dp), color="grey", linestyle=":", linewidth=1)
    seeded = any(r["n"] > 1 for r in rows)
    ax.set(xlabel="target epsilon (log scale)", ylabel="final test accuracy" + (" (mean +- std)" if seeded else ""),
           title="fedlora: accuracy vs privacy (" + ("DP-SGD" if mode == "sample" else "client-level DP-FedAvg") + ")")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's options on ``p`` (its own parser or a ``fedlora sweep`` subparser); sets ``func=run``."""
    p.add_argument("--epsilons", default="1,3,8,inf", help="target epsilons, comma-separated; inf = no DP")
    p.add_argument("--methods", default="fedit,ffa,fed_sb,fedsvd", help="aggregators, comma-separated")
    add_common_arguments(p, real_help="the pretrained MiniLM in its DP regime (3 clients, 4 rounds, 3 seeds, "
                                         "each method's lr tuned on validation: --tune-lr off to skip)", per="cell")
    p.add_argument("--mode", choices=MODES, help="the DP of the finite-epsilon cells: sample = DP-SGD on every client "
                                                 "(default), client = DP-FedAvg on the server, with its own presets "
                                                 "(--real: 1000 clients, 100 a round)")
    p.add_argument("--tune-epsilon", default="8", help="with --tune-lr: the epsilon at which each method's learning "
                                                        "rate under DP is tuned, then used at every finite epsilon "
                                                        "(the no-DP cell is tuned on its own)")
    p.add_argument("--output", default="runs/privacy-sweep", help="sweep folder (cells, sweep.csv/md/png)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    quiet_flower()
    mode = dp_mode(args)
    presets = PRESETS if mode == "sample" else CLIENT_PRESETS
    model, rounds, num_clients, base = preset_base(args, presets, DEFAULT_PRESET, {"privacy.mode": mode})
    epsilons = parse_epsilons(args.epsilons)
    seeds = resolve_seeds(args.seeds, presets.get(model, DEFAULT_PRESET), base)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    root = Path(args.output)
    # Every run's config is validated before the first one runs: a typo fails now, not after an hour. Seed by
    # seed: an interrupted sweep has the whole grid at the first seeds.
    cells = [(m, e, cell_dir(root, m, e)) for e in epsilons for m in methods]
    jobs = [Job(f"{m} eps={eps_label(e)}", seed, cell, cell_config({**base, "seed": seed}, m, e, seeds.dir(cell, seed)))
            for seed in seeds.values for m, e, cell in cells]
    tune = args.tune_lr if args.tune_lr is not None else presets.get(model, DEFAULT_PRESET).get("tune_lr", "off")
    lrs = () if tune == "off" else parse_lrs(tune)
    at = eps_label(parse_epsilons(args.tune_epsilon)[0])
    if lrs and any(math.isfinite(e) for e in epsilons) and (at == "inf" or at not in map(eps_label, epsilons)):
        raise ConfigError(f"--tune-epsilon {args.tune_epsilon} is not a finite one of --epsilons {args.epsilons}; the "
                          "DP cells are tuned at one of theirs (the no-DP cell at inf)")
    if len(seeds.values) > 1 or lrs:
        print(f"sweep: {len(cells)} cells x {len(seeds.values)} seeds = {len(jobs)} runs"
              + (f", after {len({tuning_group(j.tag) for j in jobs})} (method, DP or not) x {len(lrs)} learning-rate "
                 "tries on validation" if lrs else "")
              + " (finished ones are reused)", flush=True)
    if lrs:  # one lr per method under DP (tuned at one epsilon: per cell would double the sweep), one without
        jobs, tried = tune_lr(jobs, lrs, num_clients, group=lambda job: tuning_group(job.tag),
                              on=lambda job: job.tag.endswith((f" eps={at}", " eps=inf")))
        write_csv(tried, root / "tuning.csv", TUNING_COLUMNS)

    done = run_jobs(jobs, seeds, num_clients)
    by_key = {(job.tag, job.seed): (job, summary) for job, (summary, _) in zip(jobs, done, strict=True)}
    rows = [row(m, e, seed, by_key[key][1], by_key[key][0].cfg["train.lr"])
            for m in methods for e in epsilons for seed in seeds.values
            for key in [(f"{m} eps={eps_label(e)}", seed)]]
    means = aggregate(rows, KEYS, SPREAD, MEAN_ONLY)
    md = table(means)
    print(md)
    (root / "sweep.md").write_text(md + "\n")
    write_csv(rows, root / "sweep.csv", COLUMNS)
    write_csv(means, root / "sweep-mean.csv", MEAN_COLUMNS)
    plot(means, root / "sweep.png", mode)
    print(f"sweep: {len(cells)} cells x {len(seeds.values)} seed(s) -> {root}/sweep.{{md,csv,png}}, "
          f"{root}/sweep-mean.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    return runner_main(add_arguments, __doc__.splitlines()[0], "privacy_sweep", argv)


if __name__ == "__main__":
    raise SystemExit(main())
