"""Every federated LoRA method on the same model, data, partition and seed: accuracy, exactness and bytes.

    fedlora compare                                  # all methods, tiny random model, a few minutes
    fedlora compare --real                           # the pretrained MiniLM on the built-in Austen data
    fedlora compare --methods fedit,fed_sb,fedsvd --partition dirichlet --alpha 0.3 --rounds 5
    fedlora compare --ranks 2,4,8                    # heterogeneous client ranks for flora/flexlora/hetlora
    fedlora compare --methods fedit,fedit+int8       # a method with its messages compressed (wire.*) beside it
    fedlora compare --methods fedit,fedit+adam       # ... or with a server optimiser (method.server-opt)
    fedlora compare --methods fedit,ffa,centralised  # + one client on all the data, for the same total steps

Each method runs as one in-process federation (:mod:`simulations.cells`) into ``<output>/<method>/`` (config,
per-round metrics, checkpoint, adapter), or with ``--seeds 0,1,2`` once per seed into
``<output>/<method>/seed-<s>/``. ``compare.md`` holds one row per method: final and best test accuracy and final
test loss (mean +- std over the seeds, with their count n), train-message bytes down and up per round and in total,
server aggregation time per round, wall time, and the exactness error ``||aggregated dW - sum_k p_k s B_k A_k|| /
||sum_k p_k s B_k A_k||`` (worst round; per round in the CSV), and for a ``method+codec`` entry (wire.upload and
wire.download set to the codec: bfloat16, float16, int8) the worst relative rounding the codec added; below it,
which methods are within the seed spread of the best one. With federated evaluation (``--set fraction-evaluate=...``
> 0) the ``own-data acc`` column is the clients' mean accuracy on their own held-out data in the last round, each
with the model it trains (FedSA-LoRA: its own B): the metric of a personalising method, whose server model alone is
only the shared part. ``compare.csv`` has one row per (method, seed), ``compare-mean.csv`` one per method (n,
``<col>_mean``, ``<col>_std``). ``compare.png`` plots test accuracy against the round and against the cumulative
bytes on the wire, one line per method (mean, shaded +- std).
Finished (method, seed) runs with the same config are reused (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
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
    mean_std,
    metrics,
    parse_lrs,
    pm,
    preset_base,
    resolve_seeds,
    run_jobs,
    runner_main,
    tune_lr,
    write_csv,
)

COLUMNS = ["method", "seed", "partition", "initial_accuracy", "final_accuracy", "best_accuracy", "final_loss",
           "client_accuracy",
           "bytes_down_per_round", "bytes_up_per_round", "bytes_total", "aggregate_ms_per_round",
           "exactness_max", "exactness_per_round", "wire_error_max", "rounds", "lr", "wall_seconds"]
# compare-mean.csv: mean and std of what the seed changes; the mean alone of what it does not (bytes, rounds: the
# same for every seed of a config) or what is a cost rather than a result.
KEYS = ["method", "partition"]
SPREAD = ["initial_accuracy", "final_accuracy", "best_accuracy", "final_loss", "client_accuracy"]
MEAN_ONLY = ["bytes_down_per_round", "bytes_up_per_round", "bytes_total", "aggregate_ms_per_round", "exactness_max",
             "wire_error_max", "rounds", "lr", "wall_seconds"]
MEAN_COLUMNS = aggregate_columns(KEYS, SPREAD, MEAN_ONLY)

# Per-model settings, overridable with --rounds/--num-clients/--set. The tiny random BERT is for a quick look;
# MiniLM keeps the config defaults tuned for it (as `make demo`) without federated eval (the server's test
# accuracy is what the table compares), over 3 seeds: a gap between methods means little without the spread
# (about an hour per seed for all methods on 2 CPU cores; --seeds 42 for one).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"rounds": 3, "num_clients": 4,
             "overrides": {"train.local-steps": 10, "model.max-length": 32, "data.max-eval-examples": 200,
                           "fraction-evaluate": 0.0}},
    "minilm": {"rounds": 3, "num_clients": 4, "seeds": 3, "overrides": {"fraction-evaluate": 0.0}},
}
DEFAULT_PRESET = {"rounds": 3, "num_clients": 4, "overrides": {"fraction-evaluate": 0.0}}


CENTRALISED = "centralised"  # the reference row: one client holding the union of the clients' data


def centralised_config(base: dict[str, Any], out: Path, num_clients: int) -> dict[str, Any]:
    """The centralised LoRA reference: FedIT's client on all of the clients' training data together (one client,
    one partition), for the federation's total number of optimizer steps (rounds x sampled clients x local steps,
    as ``train.local-steps`` x sampled clients per round), same batch size, learning rate and evaluation. Its AdamW
    restarts each round, as every fedlora client's does."""
    cfg = FedLoraConfig.from_run_config({k: v for k, v in base.items()})
    sampled = max(1, round(cfg.run.fraction_train * num_clients))
    return FedLoraConfig.from_run_config({
        **base, "method.name": "fedit", "output-dir": str(out), "min-nodes": 1, "fraction-train": 1.0,
        "train.local-steps": cfg.train.local_steps * sampled}).to_run_config()


def method_config(base: dict[str, Any], entry: str, out: Path, ranks: str, num_clients: int = 0) -> dict[str, Any]:
    """One ``--methods`` entry's full, validated run config: ``method``, optionally with ``+codec`` (its messages in
    that wire codec both ways) and ``+optimiser`` (method.server-opt), or ``centralised`` (the reference,
    :func:`centralised_config`, for a federation of ``num_clients``); ``ranks`` goes only to methods that take
    per-client ranks."""
    from fedlora.aggregation import available, get_aggregator
    from fedlora.server_opt import SERVER_OPTS
    from fedlora.wire import CODECS

    if entry == CENTRALISED:
        return centralised_config(base, out, num_clients)
    method, *variants = entry.split("+")
    if method not in available():
        raise ConfigError(f"--methods: {method!r} is not a known aggregator; choose from {available()}")
    cfg = {**base, "method.name": method, "output-dir": str(out)}
    for variant in variants:
        if variant in CODECS:
            cfg["wire.upload"] = cfg["wire.download"] = variant
        elif variant in SERVER_OPTS[1:]:
            cfg["method.server-opt"] = variant
        else:
            raise ConfigError(f"--methods: {entry!r}: after '+' comes a wire codec {list(CODECS)} or a server "
                              f"optimiser {list(SERVER_OPTS[1:])}, e.g. 'fedit+adam' or 'fedit+int8'")
    if ranks and get_aggregator(method).heterogeneous_ranks:
        cfg["adapter.ranks"] = ranks
        top = max(int(r) for r in ranks.split(","))
        cfg["adapter.rank"] = max(top, int(cfg.get("adapter.rank", FedLoraConfig().adapter.rank)))
    return FedLoraConfig.from_run_config(cfg).to_run_config()


def row(method: str, seed: int, partition: str, summary: dict, history: list[dict], lr: float | None = None
        ) -> dict[str, Any]:
    trained = [r for r in history if r.get("round", 0) > 0]
    down = [r["bytes_down"] for r in trained]
    up = [r["bytes_up"] for r in trained]
    agg_ms = [1000 * r.get("aggregate_seconds", 0.0) for r in trained]
    exact = [r["exactness"] for r in trained if r.get("exactness") is not None]
    wire = [e for r in trained for e in (r.get("wire_error_down"), r.get("wire_error_up")) if e is not None]
    n = max(1, len(trained))
    own = [r["client_accuracy_mean"] for r in trained if r.get("client_accuracy_mean") is not None]
    return {"method": method, "seed": seed, "partition": partition, "initial_accuracy": summary.get("initial_accuracy"),
            "final_accuracy": summary.get("final_accuracy"), "best_accuracy": summary.get("best_accuracy"),
            "final_loss": summary.get("final_loss"), "client_accuracy": own[-1] if own else None,
            "bytes_down_per_round": sum(down) / n,
            "bytes_up_per_round": sum(up) / n, "bytes_total": sum(down) + sum(up),
            "aggregate_ms_per_round": sum(agg_ms) / n, "exactness_max": max(exact) if exact else None,
            "exactness_per_round": ";".join(f"{e:.3e}" for e in exact),
            "wire_error_max": max(wire) if wire else None, "rounds": len(trained), "lr": lr,
            "wall_seconds": summary.get("wall_seconds")}


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _kb(v: float) -> str:
    return f"{v / 1e3:,.1f} kB" if v < 1e6 else f"{v / 1e6:,.2f} MB"


def table(rows: list[dict]) -> str:
    """The markdown table of the aggregate rows (one per method): results as mean +- std over the n seeds."""
    lines = ["| method | n | final acc | best acc | final loss | down / round | up / round | total bytes | "
             "aggregate ms / round | exactness (worst round) | wire rounding | own-data acc | lr | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']} | {pm(r, 'final_accuracy')} | {pm(r, 'best_accuracy')} | "
                     f"{pm(r, 'final_loss')} | {_kb(r['bytes_down_per_round'])} | {_kb(r['bytes_up_per_round'])} | "
                     f"{_kb(r['bytes_total'])} | {r['aggregate_ms_per_round']:.1f} | "
                     f"{_f(r['exactness_max'], '.1e')} | {_f(r['wire_error_max'], '.1e')} | "
                     f"{pm(r, 'client_accuracy')} | {_f(r.get('lr'), 'g')} | {_f(r['wall_seconds'], '.0f')} |")
    return "\n".join(lines)


def spread_note(rows: list[dict], col: str = "final_accuracy") -> str:
    """Which methods' mean ``col`` is within the seed spread of the best one (a gap no larger than the larger of
    the two stds) and which fall below it by more: a reading aid, not a significance test. Empty without a std."""
    scored = [r for r in rows if r[f"{col}_mean"] is not None]
    if not scored:
        return ""
    best = max(scored, key=lambda r: r[f"{col}_mean"])
    if best[f"{col}_std"] is None:
        return ""
    within, below = [], []
    for r in scored:
        if r is not best:
            gap = best[f"{col}_mean"] - r[f"{col}_mean"]
            (within if gap <= max(best[f"{col}_std"], r[f"{col}_std"] or 0.0) else below).append(r["method"])
    name = col.replace("_", " ").replace("accuracy", "acc")
    return (f"Best {name}: {best['method']} ({pm(best, col)}, n={best['n']}); within one std of it: "
            f"{', '.join(within) or 'none'}; below it by more than the seed spread: {', '.join(below) or 'none'}.")


def per_round(runs: list[list[dict]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds, mean cumulative train bytes (down + up), mean and std (0 for one seed) of the test accuracy over
    the seeds' histories, round by round."""
    acc: dict[int, list[float]] = {}
    total: dict[int, list[float]] = {}
    for hist in runs:
        cum = 0
        for h in hist:
            if h["round"] > 0:
                cum += h["bytes_down"] + h["bytes_up"]
            acc.setdefault(h["round"], []).append(h["global_accuracy"])
            total.setdefault(h["round"], []).append(cum)
    rounds = sorted(acc)
    stats = [mean_std(acc[r]) for r in rounds]
    return (rounds, [mean_std(total[r])[0] for r in rounds], [m for m, _ in stats], [s or 0.0 for _, s in stats])


def line_styles(n: int) -> list[dict[str, str]]:
    """``n`` distinct (colour, line style, marker) keyword sets: matplotlib's 10-colour cycle repeats, so past 10
    lines (a full compare has 12 and more) the line style changes every 10 and the marker every 40: 160 distinct."""
    dashes, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    return [{"color": f"C{i % 10}", "linestyle": dashes[(i // 10) % 4], "marker": markers[(i // 40) % 4]}
            for i in range(n)]


def plot(histories: dict[str, list[list[dict]]], path: Path, title: str) -> None:
    """Accuracy vs round (left) and vs cumulative train bytes, down + up, on a log axis (right): the mean over
    the seeds, with a band of +- one std where there is more than one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, runs), style in zip(histories.items(), line_styles(len(histories)), strict=True):
        rounds, cum, acc, std = (np.asarray(v, dtype=float) for v in per_round(runs))
        ax1.plot(rounds, acc, **style, label=method if len(runs) == 1 else f"{method} (n={len(runs)})")
        trained = rounds > 0
        ax2.plot(cum[trained], acc[trained], **style)
        if len(runs) > 1:
            ax1.fill_between(rounds, acc - std, acc + std, color=style["color"], alpha=0.15, linewidth=0)
            ax2.fill_between(cum[trained], (acc - std)[trained], (acc + std)[trained], color=style["color"],
                             alpha=0.15, linewidth=0)
    seeded = any(len(runs) > 1 for runs in histories.values())
    ax1.set(xlabel="round", ylabel="test accuracy" + (" (mean, band = +- 1 std)" if seeded else ""), title=title)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g} MB"))
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.set(xlabel="cumulative bytes on the wire (train, down + up, log)", ylabel="test accuracy",
            title="accuracy vs communication")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The comparison's options on ``p`` (its own parser or a ``fedlora compare`` subparser); sets ``func=run``."""
    from fedlora.aggregation import available

    p.add_argument("--methods", default=",".join(available()),
                   help="aggregators, comma-separated (default: all); 'method+adam' / 'method+int8' add a server "
                        f"optimiser / a wire codec; '{CENTRALISED}' adds the centralised LoRA reference")
    add_common_arguments(p, real_help="the pretrained MiniLM with its settings", per="method")
    p.add_argument("--data", help="austen (built in) | a local data folder")
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="dirichlet")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (smaller = more skewed)")
    p.add_argument("--ranks", default="", help="per-client ranks for flora/flexlora/hetlora, e.g. 2,4,8")
    p.add_argument("--seed", type=int, help="the one seed of every method (default: the config's); see --seeds")
    p.add_argument("--output", default="runs/compare", help="folder for the methods' runs and compare.md/csv/png")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    quiet_flower()
    extra: dict[str, Any] = {"data.partition": args.partition, "data.dirichlet-alpha": args.alpha}
    if args.data:
        extra["data.source"] = args.data
    if args.seed is not None:
        extra["seed"] = args.seed
    model, rounds, num_clients, base = preset_base(args, PRESETS, DEFAULT_PRESET, extra)
    seeds = resolve_seeds(args.seeds, PRESETS.get(model, DEFAULT_PRESET), base)
    root = Path(args.output)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods is empty; use e.g. 'fedit,fed_sb' or leave it out for all")
    # Every run's config is validated before the first one runs: a typo fails now, not after an hour. Seed by
    # seed: an interrupted comparison has every method at the first seeds.
    jobs = [Job(m, seed, root / m, method_config({**base, "seed": seed}, m, seeds.dir(root / m, seed), args.ranks,
                                                 num_clients), clients=1 if m == CENTRALISED else 0)
            for seed in seeds.values for m in methods]
    partition = "iid" if base["data.partition"] == "iid" else f"dirichlet({float(base['data.dirichlet-alpha']):g})"
    lrs = parse_lrs(args.tune_lr) if args.tune_lr not in (None, "off") else ()
    if len(seeds.values) > 1 or lrs:
        print(f"compare: {len(methods)} methods x {len(seeds.values)} seeds = {len(jobs)} runs"
              + (f", after {len(methods)} x {len(lrs)} learning-rate tries on validation" if lrs else "")
              + " (finished ones are reused)", flush=True)
    if lrs:
        jobs, tried = tune_lr(jobs, lrs, num_clients)
        write_csv(tried, root / "tuning.csv", TUNING_COLUMNS)

    lr_of = {(job.tag, job.seed): job.cfg["train.lr"] for job in jobs}
    results = {(job.tag, job.seed): done for job, done in zip(jobs, run_jobs(jobs, seeds, num_clients), strict=True)}
    histories = {m: [metrics(results[m, seed][1]) for seed in seeds.values] for m in methods}
    rows = [row(m, seed, partition, results[m, seed][0], hist, lr_of[m, seed])
            for m in methods for seed, hist in zip(seeds.values, histories[m], strict=True)]
    means = aggregate(rows, KEYS, SPREAD, MEAN_ONLY)

    md, note = table(means), spread_note(means)
    seed_text = f"seed{'s' if len(seeds.values) > 1 else ''} {seeds.label()}"
    header = f"model {model}, {num_clients} clients, {rounds} rounds, partition {partition}, {seed_text}"
    print(header)
    print(md)
    if note:
        print(note)
    (root / "compare.md").write_text(f"{header}\n\n{md}\n" + (f"\n{note}\n" if note else ""))
    write_csv(rows, root / "compare.csv", COLUMNS)
    write_csv(means, root / "compare-mean.csv", MEAN_COLUMNS)
    plot(histories, root / "compare.png", f"{model}, {num_clients} clients, {partition}")
    print(f"compare: {len(methods)} methods x {len(seeds.values)} seed(s) -> {root}/compare.{{md,csv,png}}, "
          f"{root}/compare-mean.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    return runner_main(add_arguments, __doc__.splitlines()[0], "compare", argv)


if __name__ == "__main__":
    raise SystemExit(main())
