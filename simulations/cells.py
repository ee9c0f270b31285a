"""One experiment cell = one in-process federation with a fixed run config; shared by compare and the sweep.

Runs go through the real ServerApp and ClientApp on :class:`fedlora.localgrid.LocalGrid` (no ray, one process),
so every method of a comparison sees the same model, partition and seed. A cell whose folder already holds a
finished run with the same config is reused: an interrupted experiment continues where it stopped.

``--seeds`` runs every cell once per seed, each into ``<cell>/seed-<s>/``; the tables report mean +- std over the
seeds (:func:`aggregate`, :func:`pm`). Without it a cell is one run with the config's seed in ``<cell>/`` itself,
as before seeds existed, and such a folder is still reused when its seed is one of a later ``--seeds``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError

IGNORED_ON_RESUME = ("output-dir", "resume")  # keys that may differ between a finished cell and its re-request
PM = "\u00b1"  # the +- of "mean +- std" in the markdown tables
TUNE_FRACTION = 0.15  # the share of train held out as the validation split that --tune-lr reads


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
    p.add_argument("--tune-lr", metavar="LR,LR,...",
                   help=f"give every {per} its own learning rate: the one of these with the best final accuracy on a "
                        f"validation split ({TUNE_FRACTION:g} of train, data.validation-fraction) at the first seed, "
                        "before its seeds run on test; tuning.csv lists every try ('off': train.lr as set)")
    p.add_argument("--seeds", metavar="S,S,...",
                   help=f"run every {per} once per seed, e.g. 0,1,2, and report mean +- std (default: the model "
                        "preset's count from the config's seed on: 3 for --real (42,43,44), 1 for tiny)")


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
    """One row per dict; a missing value (None) is an empty field."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


@dataclass(frozen=True)
class Seeds:
    """The seeds every cell runs for. ``per_seed_dirs`` puts each run in ``<cell>/seed-<s>/``; it is off only for
    the single-seed default, which keeps the layout from before ``--seeds`` (the run in ``<cell>/``)."""

    values: tuple[int, ...]
    per_seed_dirs: bool

    def dir(self, cell: Path, seed: int) -> Path:
        return cell / f"seed-{seed}" if self.per_seed_dirs else cell

    def label(self) -> str:
        return ",".join(map(str, self.values))


def parse_list(text: str, flag: str, convert: Callable[[str], Any], what: str, example: str, noun: str = "value",
               check: Callable[[Any], str | None] = lambda _: None, at_least: int = 1) -> tuple[Any, ...]:
    """The comma list of option ``flag``: each part ``convert``-ed (else "is not ``what``"), refused where ``check``
    says why, each listed once (a repeated value would be the same run twice), at least ``at_least`` of them; every
    error names the flag and shows ``example``."""
    use = f"e.g. '{flag} {example}'"
    out: list[Any] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = convert(part)
        except ValueError:
            raise ConfigError(f"{flag}: {part!r} is not {what}; use {use}") from None
        if (why := check(value)) is not None:
            raise ConfigError(f"{flag}: {part!r} {why}, {use}")
        if value in out:
            raise ConfigError(f"{flag} {text!r}: {noun} {part} appears twice; list each {noun} once, {use}")
        out.append(value)
    if not out:
        raise ConfigError(f"{flag} is empty; use {use}")
    if len(out) < at_least:
        raise ConfigError(f"{flag} {text!r}: give {at_least} or more to choose from, {use}")
    return tuple(out)


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2): whole numbers >= 0, each once."""
    return parse_list(text, "--seeds", int, "a whole number", "0,1,2", "seed",
                      lambda s: "is negative; seeds are whole numbers >= 0" if s < 0 else None)


def resolve_seeds(text: str | None, preset: dict[str, Any], base: dict[str, Any]) -> Seeds:
    """``--seeds`` if given, else the preset's ``seeds`` count (1 if it names none) from the config's seed on: 3
    for MiniLM (a spread needs more than one run), 1 for the tiny model, in the layout from before seeds. A single
    seed set as well (``--seed``, ``--set seed=``) is refused: which one would win is a guess."""
    from fedlora.config import FedLoraConfig

    if text is not None:
        seeds = parse_seeds(text)
        if "seed" in base:
            raise ConfigError(f"--seeds {text} and a single seed (seed={base['seed']}, from --seed or --set seed=...) "
                              "are both given; keep one (the seeds' runs set 'seed' themselves)")
        return Seeds(seeds, per_seed_dirs=True)
    seed = FedLoraConfig.from_run_config({"seed": base.get("seed", FedLoraConfig().run.seed)}).run.seed
    count = preset.get("seeds", 1)
    return Seeds(tuple(range(seed, seed + count)), per_seed_dirs=count > 1)


@dataclass(frozen=True)
class Job:
    """One (cell, seed) federation: ``tag`` names the cell in progress lines, ``cfg`` is its full validated run
    config (``output-dir`` = where it runs), ``cell`` the cell's own folder (the run's parent with --seeds)."""

    tag: str
    seed: int
    cell: Path
    cfg: dict[str, Any]
    clients: int = 0  # this job's number of clients (0 = the run's; the centralised reference has 1)


def run_jobs(jobs: list[Job], seeds: Seeds, num_clients: int) -> list[tuple[dict, Path]]:
    """Run or reuse every job in order; returns each one's (summary, folder). A (cell, seed) whose own folder has
    no finished run but whose cell folder holds one with the same config (seed included: a run from before
    ``--seeds``) reuses that one, so adding seeds to an old experiment re-runs nothing it already has."""
    done = []
    for i, job in enumerate(jobs, 1):
        out = Path(job.cfg["output-dir"])
        if out != job.cell and finished(out, job.cfg) is None and finished(job.cell, job.cfg) is not None:
            out = job.cell
        tag = f"[{i}/{len(jobs)}] {job.tag}" + (f" seed={job.seed}" if seeds.per_seed_dirs else "")
        done.append((run_or_reuse(tag, job.cfg["method.name"], job.cfg, out, job.clients or num_clients), out))
    return done


def parse_lrs(text: str) -> tuple[float, ...]:
    """'1e-3,5e-3,2e-2' -> (0.001, 0.005, 0.02): two or more learning rates > 0, each once."""
    return parse_list(text, "--tune-lr", float, "a number", "2e-3,5e-3,2e-2", "lr",
                      lambda lr: None if lr > 0 else "must be > 0", at_least=2)


def tune_lr(jobs: list[Job], lrs: tuple[float, ...], num_clients: int, group: Callable[[Job], str] | None = None,
            on: Callable[[Job], bool] | None = None) -> tuple[list[Job], list[dict[str, Any]]]:
    """Each cell at its own learning rate, chosen on a validation split carved from train (never on test).

    Jobs are grouped by ``group`` (default: the cell, its tag); each group's first job for which ``on`` holds (default:
    its first job, the first seed) runs once per lr in ``lrs`` with ``data.validation-fraction`` into
    ``<its cell>/tune/lr-<lr>/``. The highest final validation accuracy wins (ties: the lower validation loss), and
    every job of the group gets that ``train.lr``. Returns the jobs and one row per (group, lr), ``chosen`` marking
    the pick. One shared lr would favour whichever method it happens to suit."""
    from fedlora.config import FedLoraConfig

    group = group or (lambda job: job.tag)
    reps: dict[str, Job] = {}
    for job in jobs:
        if on is None or on(job):
            reps.setdefault(group(job), job)
    if missing := sorted({group(job) for job in jobs} - reps.keys()):
        raise ConfigError(f"--tune-lr: no run of {missing} to tune on")
    picks: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for key, job in reps.items():
        tried = []
        for lr in lrs:
            out = job.cell / "tune" / f"lr-{lr:g}"
            cfg = FedLoraConfig.from_run_config({**job.cfg, "train.lr": lr, "data.validation-fraction": TUNE_FRACTION,
                                                 "output-dir": str(out)}).to_run_config()
            s = run_or_reuse(f"{job.tag} tune lr={lr:g}", cfg["method.name"], cfg, out, job.clients or num_clients)
            tried.append({"cell": key, "tuned_on": job.tag, "lr": lr, "seed": job.seed,
                          "val_final_accuracy": s.get("final_accuracy"), "val_final_loss": s.get("final_loss")})
        best = max(tried, key=lambda r: (_or(r["val_final_accuracy"], -1.0), -_or(r["val_final_loss"], float("inf"))))
        picks[key] = best["lr"]
        rows += [{**r, "chosen": r is best} for r in tried]
        print(f"{key}: lr {best['lr']:g} (validation accuracy at " + ", ".join(
            f"{r['lr']:g}: {_f(r['val_final_accuracy'])}" for r in tried) + ")", flush=True)
    tuned = [Job(job.tag, job.seed, job.cell,
                 FedLoraConfig.from_run_config({**job.cfg, "train.lr": picks[group(job)]}).to_run_config(), job.clients)
             for job in jobs]
    return tuned, rows


TUNING_COLUMNS = ["cell", "tuned_on", "lr", "seed", "val_final_accuracy", "val_final_loss", "chosen"]


def _or(v: float | None, default: float) -> float:
    return default if v is None else float(v)


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) of the values present; std None for one value (undefined, not
    0: one seed says nothing about the spread), both None for none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate_columns(keys: list[str], spread: list[str], mean_only: list[str]) -> list[str]:
    """The aggregate CSV's header: the cell's keys, n and the seeds, ``<col>_mean``/``<col>_std`` for the columns
    that vary with the seed, and the mean alone (under the column's own name) for those that do not."""
    return [*keys, "n", "seeds", *(f"{c}_{s}" for c in spread for s in ("mean", "std")), *mean_only]


def aggregate(rows: list[dict[str, Any]], keys: list[str], spread: list[str],
              mean_only: list[str]) -> list[dict[str, Any]]:
    """One row per cell from the per-seed rows (those with equal ``keys``, in first-seen order): n, the seeds
    ('0;1;2'), mean and std (:func:`mean_std`) of each ``spread`` column, the mean of each ``mean_only`` one."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for group in groups.values():
        agg = {k: group[0][k] for k in keys} | {"n": len(group), "seeds": ";".join(str(r["seed"]) for r in group)}
        for c in spread:
            agg[f"{c}_mean"], agg[f"{c}_std"] = mean_std(r[c] for r in group)
        for c in mean_only:
            agg[c] = mean_std(r[c] for r in group)[0]
        out.append(agg)
    return out


def pm(row: dict[str, Any], col: str, spec: str = ".3f") -> str:
    """``mean +- std`` of an aggregate row's column for a table; the mean alone when the std is undefined (n=1)."""
    mean, std = row[f"{col}_mean"], row[f"{col}_std"]
    if mean is None:
        return "-"
    return format(mean, spec) if std is None else f"{mean:{spec}} {PM} {std:{spec}}"


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
