"""Framework overhead: a fedlora federation vs the same local training steps in a plain PyTorch loop.

Why: a federated run should cost little more than its local training. (a) is the plain loop: build the model
once, then fedlora.train.optimise on each client's encoded data for N clients x R rounds x S steps, with the
batch orders the simulation uses. (b) is the real federation of N clients x R rounds x S local steps on the
in-process grid (fedlora.localgrid.LocalGrid: real ServerApp/ClientApp functions, every message round-tripped
through Flower's encoding), federated evaluation off. The server's global evaluation cannot be switched off (it
runs before round 1 and after every round); it is kept small (--eval-examples) and reported separately.

Where (b)'s time goes: library functions are wrapped with timers in this process (exclusive time: a timed call
inside another is subtracted from its parent), so the buckets add up to the wall time and "other" is Flower's
strategy loop, update validation and everything not wrapped. (a) and (b) alternate --repeats times with the
per-process caches (data, partitions, tokenisers) cleared before each; medians of (a), and of (b) the run with
the median wall time (so its buckets add up).

Run: python benchmarks/bench_overhead.py [--model tiny|minilm] [--clients 3] [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from bench_aggregators import header

import client.app as client_app_module
import fedlora.adapters.peft_io as peft_io
import fedlora.client as fl_client
import fedlora.localgrid as localgrid
import fedlora.report as report
import fedlora.server as fl_server
import fedlora.strategy as strategy
import fedlora.tasks.base as tasks_base
import fedlora.tasks.classification as classification
import fedlora.train as train
from fedlora.cli import quiet_flower
from fedlora.client import round_seed
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.tasks import Task, get_task

# (module, attribute, bucket): leaf-ish library calls of a federated round, timed exclusively.
WRAP = [
    (fl_server, "initial_state", "server start-up (model build, init state)"),
    (Task, "server_dataset", "global evaluation"),
    (fl_server, "global_evaluator", "global evaluation"),  # encodes the server's held-out set once
    (Task, "build_model", "model builds (server and every client round)"),
    (fl_server, "load_adapter_state", "global evaluation"),
    (classification.ClassificationTask, "evaluate", "global evaluation"),  # federated evaluation is off
    (Task, "client_data", "client data (tokenise, cached per process)"),
    (fl_client, "reset_adapters", "client adapter load / extract"),
    (fl_client, "load_adapter_state", "client adapter load / extract"),
    (fl_client, "adapter_state", "client adapter load / extract"),
    (train, "optimise", "local training"),
    (client_app_module, "to_record", "to_record / from_record"),
    (client_app_module, "from_record", "to_record / from_record"),
    (strategy, "to_record", "to_record / from_record"),
    (strategy, "decode_update", "decode + validate updates"),
    (localgrid, "roundtrip", "wire encode + decode (grid transport)"),
    (strategy, "message_wire_bytes", "byte counting (serialise again)"),
    (strategy, "exactness_error", "exactness metric"),
    (strategy, "save_checkpoint", "checkpoint"),
    (peft_io, "save_peft_adapter", "export PEFT adapter + report"),
    (report.Reporter, "finish", "export PEFT adapter + report"),
]


class Timers:
    """Exclusive wall time per bucket across nested wrapped calls."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._child: list[float] = []

    def wrap(self, fn: Callable, bucket: str) -> Callable:
        def timed(*args, **kwargs):
            self._child.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                inner = self._child.pop()
                self.total[bucket] += elapsed - inner
                if self._child:
                    self._child[-1] += elapsed
        return timed


@contextlib.contextmanager
def instrumented(timers: Timers, aggregator_cls: type):
    wraps = [*WRAP, (aggregator_cls, "aggregate", "aggregation")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in wraps]
    for obj, name, bucket in wraps:
        setattr(obj, name, timers.wrap(getattr(obj, name), bucket))
    try:
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def clear_caches() -> None:
    """Forget loaded data, partitions, tokenised partitions and tokenizers: each measurement pays its own."""
    for cache in (tasks_base._DATASETS, tasks_base._PARTITIONS, tasks_base._ENCODED):
        cache.clear()
    classification._tokenizer.cache_clear()


def run_config(args: argparse.Namespace, out: Path) -> dict:
    return {"model.name": args.model, "num-server-rounds": args.rounds, "train.local-steps": args.steps,
            "train.batch-size": args.batch_size, "model.max-length": args.max_length, "method.name": args.method,
            "data.max-eval-examples": args.eval_examples, "fraction-evaluate": 0.0, "data.partition": "iid",
            "output-dir": str(out)}


def plain_loop(args: argparse.Namespace) -> dict[str, float]:
    """(a): one model, N x R calls of optimise with the simulation's data, batch and dropout seeds."""
    clear_caches()
    cfg = FedLoraConfig.from_run_config(run_config(args, Path(tempfile.gettempdir())))
    t0 = time.perf_counter()
    task = get_task(cfg)
    model = task.build_model(make_aggregator(cfg).mode, cfg.adapter.rank)
    t_build = time.perf_counter()
    data = [task.client_data("train", pid, args.clients) for pid in range(args.clients)]
    t_data = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        for pid, (_, enc, labels) in enumerate(data):
            train.optimise(model, enc, labels, task.batch_loss, cfg.train, seed=round_seed(cfg.run.seed, rnd, pid))
    t_end = time.perf_counter()
    return {"total": t_end - t0, "build": t_build - t0, "data": t_data - t_build, "train": t_end - t_data}


def simulation(args: argparse.Namespace, root: Path) -> tuple[float, dict[str, float], list[dict]]:
    """(b): the federation on the in-process grid; (wall s, exclusive s per bucket, metrics.jsonl rows)."""
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from server.app import make_server_app

    clear_caches()
    out = root / "sim"
    shutil.rmtree(out, ignore_errors=True)
    cfg = FedLoraConfig.from_run_config(run_config(args, out)).to_run_config()
    timers = Timers()
    aggregator_cls = type(make_aggregator(FedLoraConfig.from_run_config(cfg)))
    with instrumented(timers, aggregator_cls), contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        grid = localgrid.LocalGrid(make_client_app(cfg), args.clients)
        make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, dict(timers.total), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny | minilm")
    p.add_argument("--method", default="fedit")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="local steps per client per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=32, help="server-side test examples per evaluation")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="runs/bench-overhead")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    quiet_flower()
    root = Path(args.output)
    total_steps = args.clients * args.rounds * args.steps
    print(header(args.threads))
    print(f"model {args.model}, method {args.method}: {args.clients} clients x {args.rounds} rounds x {args.steps} "
          f"local steps = {total_steps} steps of batch {args.batch_size}, max length {args.max_length}; "
          f"global evaluation on {args.eval_examples} examples x {args.rounds + 1}; median of {args.repeats}")
    plain_loop(argparse.Namespace(**{**vars(args), "rounds": 1, "steps": 2}))  # warm-up: imports, kernels, page cache
    plain, sims = [], []
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        plain.append(plain_loop(args))
        sims.append(simulation(args, root))
    a = {k: statistics.median(x[k] for x in plain) for k in plain[0]}
    wall, buckets, _ = sorted(sims, key=lambda s: s[0])[len(sims) // 2]  # the median run, whole (buckets add up)
    evaluation = buckets.get("global evaluation", 0.0)  # its model builds are in the model builds bucket
    data_b = buckets.get("client data (tokenise, cached per process)", 0.0)
    b = wall - evaluation
    ratio, ratio_no_data = b / a["total"], (b - data_b) / (a["total"] - a["data"])

    def verdict(x: float) -> str:
        return "PASS" if x <= 1.15 else "FAIL"

    print(f"\n(a) plain loop: {a['total']:.2f} s = model build {a['build']:.2f} + data {a['data']:.2f} + "
          f"training {a['train']:.2f} ({1000 * a['train'] / total_steps:.1f} ms/step)")
    print(f"(b) federation: {wall:.2f} s wall, {b:.2f} s without the server's global evaluation ({evaluation:.2f} s)")
    print(f"ratio (b) without global evaluation / (a):            {ratio:.3f}x  (target <= 1.15x: {verdict(ratio)})")
    print(f"same, data preparation (tokenising) left out of both: {ratio_no_data:.3f}x  "
          f"(target <= 1.15x: {verdict(ratio_no_data)})")
    print(f"with the global evaluation: {wall / a['total']:.3f}x;  local training alone (b)/(a): "
          f"{buckets.get('local training', 0.0) / a['train']:.3f}x")
    # Noise-robust: everything in (b) that is not training, data preparation or global evaluation, against
    # (b)'s own training time (a loaded machine moves (a) and (b)'s training by more than the overhead).
    train_b = buckets.get("local training", 0.0)
    framework = wall - train_b - data_b - evaluation
    print(f"framework time in (b) (all but local training, data preparation, global evaluation): {framework:.2f} s "
          f"= {100 * framework / train_b:.1f}% of (b)'s local training -> {1 + framework / train_b:.3f}x "
          f"(target <= 1.15x: {verdict(1 + framework / train_b)})")
    print(f"\nwhere (b)'s {wall:.2f} s go (exclusive time, in the run with the median wall time of {args.repeats}):")
    print(f"{'part':45s} {'s':>8s} {'% of (b)':>9s} {'per round (s)':>14s}")
    other = wall - sum(buckets.values())
    parts = sorted(buckets.items(), key=lambda kv: -kv[1]) + [("other (Flower loop, validation, logging)", other)]
    for name, s in parts:
        print(f"{name:45s} {s:8.3f} {100 * s / wall:8.1f}% {s / args.rounds:14.3f}")
    extra = b - a["total"]
    print(f"\n(b) - (a) without evaluation: {extra:+.2f} s; model builds (server and clients): "
          f"{buckets.get('model builds (server and every client round)', 0.0):.2f} s for "
          f"{args.clients * args.rounds} client rounds vs {a['build']:.2f} s for one build in (a)")


if __name__ == "__main__":
    main()
