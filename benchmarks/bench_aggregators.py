"""Server-side cost of one aggregation round per method: time and peak memory, at LLaMA-7B adapter shapes.

Why: the server aggregates every adapted layer every round; this shows what each method costs at a real model's
shapes with 10 and 100 clients (FedSVD's thin SVD, LoRA-FAIR's per-layer solver, FLoRA's stacking, FlexLoRA's
SVD of the rank-sum product, FedEx-LoRA's residual factors), against the issue's targets, and what the naive dense
path (materialise the d_out x d_in update, dense SVD) would cost instead for FedSVD and FlexLoRA, and the dense
residual of FedEx-LoRA's own code (materialised, no SVD).

Every (shape, clients, method) cell runs in a fresh subprocess: inputs are built first, then the resident set's
high-water mark is reset (/proc/self/clear_refs), so "peak MB" is what the aggregation itself adds on top of its
inputs (torch's allocator is invisible to tracemalloc). Client updates are random views into one shared
Gaussian pool (distinct per client), which keeps 100 clients x 64 layers cheap to build; the cost of every
method depends on the shapes, not on the values (LoRA-FAIR's solver runs its full step budget on them).
Heterogeneous-rank methods (flora, flexlora, hetlora) get client ranks cycling through --ranks.

The dense SVD of one d x d layer does not depend on the method or the clients: it is timed once per shape in
its own subprocess (--dense-layers layers, scaled to all layers); materialising dW is timed in each cell.

Section "robust defaults and rules" (only with --robust: ~35 min at full shape): per method, the aggregation
alone, then what fedlora.strategy adds before it by default (fedlora.influence: one payload per client, capped
weights, delta norms against each client's payload, clip or reject), as a ratio to the aggregation (target: under
+20 %); for the linear methods also each robust.rule (median, trimmed_mean, multi_krum with f = clients // 10, at
least 1) as a ratio to the aggregation. Client 0 is an outlier (claims 100x its examples, 10x the delta), so the
weight cap and the clip (linear, FLoRA) or reject (FlexLoRA, HetLoRA, LoRA-FAIR) paths run. Each phase runs
once untimed for its memory (after malloc_trim), then the timed phases are interleaved within each repeat, so
the ratios see the same load. --layers N times N adapted layers instead of the shape's (every phase is linear in
the layers); --rules none times only the aggregation and the bounds.

Run: python benchmarks/bench_aggregators.py [--clients 10,100] [--shapes 7b] [--repeats 3] [--threads 1]
     python benchmarks/bench_aggregators.py --shapes minilm,bert-base --clients 10   # small shapes
     python benchmarks/bench_aggregators.py --methods flexlora --ranks 16 --clients 100  # rank sum 1,600
     python benchmarks/bench_aggregators.py --robust --clients 10,100 [--layers 64] [--rules none]  # alone
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, aggregator_class, available, get_aggregator
from fedlora.influence import bound_norms, bound_weights
from fedlora.robust import RobustConfig, robust_combine

# name -> (adapted layers, d_out = d_in, rank): q and v of every transformer block.
SHAPES = {"minilm": (12, 384, 8), "bert-base": (24, 768, 16), "7b": (64, 4096, 16)}
# The issue's targets: seconds for one aggregation of 100 clients at 7B shapes.
TARGET_S = {"flexlora": 60.0}
DEFAULT_TARGET_S = 10.0
DENSE = ("fedsvd", "flexlora")  # methods whose naive path is a dense SVD of the materialised update
RESIDUAL = ("fedex_lora",)  # methods whose naive path materialises a dense residual (no SVD)
POOL = 1 << 25  # floats in the shared Gaussian pool (128 MiB)
RULES = ("median", "trimmed_mean", "multi_krum")  # robust.rule values timed for the linear methods
BOUNDS_TARGET = 0.20  # the default bounds may add at most this share to the aggregation time
OUTLIER_CLAIM, OUTLIER_DELTA = 100, 10.0  # client 0's inflated num-examples and delta (robust section)


def header(threads: int) -> str:
    """Machine, date, torch and thread count: the context every benchmark table is printed with."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load avg {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return (f"{datetime.date.today()} | {cpu}, {os.cpu_count()} logical CPUs{load} | torch {torch.__version__}, "
            f"{threads} thread(s) | python {platform.python_version()}")


@dataclass
class Cell:
    shape: str
    method: str
    clients: int
    ranks: list[int]
    repeats: int
    budget_s: float
    threads: int
    dense: bool
    layers: int = 0  # adapted layers; 0: the shape's
    rules: tuple[str, ...] = RULES  # robust section: the rules timed for linear methods
    options: dict = field(default_factory=dict)  # --opt NAME=VALUE: method options (each method takes its own)


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def method_options(method: str, options: dict[str, str]) -> dict:
    """The --opt values that are fields of ``method``'s Options, converted to the fields' types."""
    fields = {f.name: f for f in dataclasses.fields(aggregator_class(method).Options)}
    return {k: type(fields[k].default)(v) for k, v in options.items() if k in fields}


def _reset_peak() -> int:
    """Reset VmHWM to the current resident set; returns that baseline in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _ranks_for(agg, cell: Cell, r: int) -> list[int]:
    """Client ranks: the shape's r, or --ranks cycled and capped at r (r is r_max for FlexLoRA/HetLoRA)."""
    if not agg.heterogeneous_ranks:
        return [r] * cell.clients
    return [min(cell.ranks[k % len(cell.ranks)], r) for k in range(cell.clients)]


def build(cell: Cell):
    """(aggregator, global state, client updates, per-client ranks) for one cell, deterministically."""
    n_layers, d, r = SHAPES[cell.shape]
    n_layers = cell.layers or n_layers
    gen = torch.Generator().manual_seed(0)
    options = method_options(cell.method, cell.options)
    agg = get_aggregator(cell.method, AggregatorConfig(rank=r, alpha=2 * r), **options)
    layers = [f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj" for i in range(n_layers)]
    init = {}
    for layer in layers:
        init[naming.key(layer, "A")] = torch.randn(r, d, generator=gen) / d**0.5
        init[naming.key(layer, "B")] = torch.zeros(d, r)
    init["classifier.weight"] = torch.randn(6, d, generator=gen) * 0.02
    state = agg.init_state(init)
    pool = torch.randn(POOL, generator=gen) * 0.01

    def draw(*shape: int) -> torch.Tensor:
        n = shape[0] * shape[1]
        start = int(torch.randint(0, POOL - n, (1,), generator=gen))
        return pool[start:start + n].view(*shape)

    ranks = _ranks_for(agg, cell, r)
    updates = []
    for k, rk in enumerate(ranks):
        tensors = {}
        for layer in layers:
            dims = {"A": (rk, d), "B": (d, rk), "R": (r, r)}
            for role in agg.round_uploads(1):  # RoLoRA: a B round (its A rounds cost the same at square shapes)
                tensors[naming.key(layer, role)] = draw(*dims[role])
        tensors.update({n: t + draw(*t.shape) for n, t in state.items() if naming.is_extra(n)})
        updates.append(ClientUpdate(k, tensors, 100 + 10 * k, rk))
    return agg, state, updates, ranks


def materialise(agg, state, updates, layer: str) -> torch.Tensor:
    """The naive path's first step: the (d_out, d_in) update of one layer as a dense float32 matrix."""
    p = agg.weights(updates)
    ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
    if agg.name == "fedsvd":  # B_bar @ A_prev
        return agg.weighted_mean([u.tensors[kb] for u in updates], p) @ state[ka]
    dw = torch.zeros(state[kb].shape[0], state[ka].shape[1])  # FlexLoRA: sum p_k s_k B_k A_k
    for u, pk in zip(updates, p, strict=True):
        dw.addmm_(u.tensors[kb], u.tensors[ka], alpha=pk * agg.config.scaling(u.rank))
    if agg.name == "fedex_lora":  # the paper's code: the residual sum p_k s B_k A_k - s B_bar A_bar, dense
        b_bar = agg.weighted_mean([u.tensors[kb] for u in updates], p)
        a_bar = agg.weighted_mean([u.tensors[ka] for u in updates], p)
        dw.addmm_(b_bar, a_bar, alpha=-agg.config.scaling(updates[0].rank))
    return dw


def run_cell(cell: Cell) -> dict:
    torch.set_num_threads(cell.threads)
    agg, state, updates, ranks = build(cell)
    base_kb = _reset_peak()
    times = []
    while len(times) < cell.repeats and (not times or sum(times) < cell.budget_s):
        t0 = time.perf_counter()
        out = agg.aggregate(state, updates)
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak_kb = _status_kb("VmHWM") - base_kb
        del out
    row = {"time_s": statistics.median(times), "runs": len(times), "peak_mb": peak_kb / 1024,
           "rank_sum": sum(ranks), "materialise_s": None}
    if cell.dense and cell.method in DENSE + RESIDUAL:
        n_layers = SHAPES[cell.shape][0]
        layer = naming.layers_of(state)[0]
        t0 = time.perf_counter()
        materialise(agg, state, updates, layer)
        row["materialise_s"] = (time.perf_counter() - t0) * n_layers
    return row


def krum_byzantine(clients: int) -> int:
    """multi_krum's f for a round of ``clients``: a tenth of them, at least 1, within n >= 2f + 3."""
    return max(1, min(clients // 10, (clients - 3) // 2))


def make_outlier(agg, state, u: ClientUpdate) -> ClientUpdate:
    """``u`` claiming OUTLIER_CLAIM x its examples, with OUTLIER_DELTA x its delta: against the state for a linear
    method, B (and the head's delta) scaled otherwise (the bench's B0 = 0, so the product delta scales too)."""
    tensors = {}
    for k, t in u.tensors.items():
        if agg.linear or naming.is_extra(k):
            tensors[k] = state[k] + OUTLIER_DELTA * (t - state[k])
        else:
            tensors[k] = t * OUTLIER_DELTA if naming.split(k)[1] == "B" else t
    return ClientUpdate(u.client_id, tensors, u.num_examples * OUTLIER_CLAIM, u.rank)


def default_bounds(agg, state, updates, rc: RobustConfig, payload_s: list[float] | None = None):
    """What fedlora.strategy's _bound does before aggregating: payloads, capped weights, bounded delta norms.
    Returns (kept updates, weight-capped notes, clipped notes, rejected notes); appends the seconds spent on the
    payloads to ``payload_s``."""
    t0 = time.perf_counter()
    by_rank = {r: agg.client_payload(state, r) for r in {u.rank for u in updates}}  # one per rank, as the strategy
    payloads = {u.client_id: by_rank[u.rank] for u in updates}
    if payload_s is not None:
        payload_s.append(time.perf_counter() - t0)
    capped_updates, capped = bound_weights(updates, {}, rc)
    kept, clipped, rejected, _ = bound_norms(agg, payloads, capped_updates, rc)
    return kept, capped, clipped, rejected


def _peak_mb(fn):
    """(fn(), MB the resident set grew by while it ran), after handing freed heap back to the OS (glibc
    malloc_trim), so that memory an earlier phase freed but the allocator kept does not hide this one's."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base_kb = _reset_peak()
    out = fn()
    return out, max(0, _status_kb("VmHWM") - base_kb) / 1024


def run_robust_cell(cell: Cell) -> dict:
    """Aggregation, default bounds and (linear methods) each robust rule of one cell: one untimed run of each for
    its peak memory (the bounds' run also gives the rules their inputs), then timed runs interleaved per repeat."""
    torch.set_num_threads(cell.threads)
    agg, state, updates, ranks = build(cell)
    updates[0] = make_outlier(agg, state, updates[0])
    rc = RobustConfig()
    f = krum_byzantine(cell.clients)
    payload_s: list[float] = []
    phases = {"aggregate": lambda: agg.aggregate(state, updates),
              "bounds": lambda: default_bounds(agg, state, updates, rc, payload_s)}
    peak_mb: dict[str, float] = {}
    out, peak_mb["aggregate"] = _peak_mb(phases["aggregate"])
    del out
    bounded, peak_mb["bounds"] = _peak_mb(phases["bounds"])
    kept = bounded[0]
    if agg.linear:
        reference = {k: state[k] for k in kept[0].tensors}
        for rule in cell.rules:
            config = RobustConfig(rule=rule, krum_byzantine=f)
            phases[rule] = lambda config=config: robust_combine(reference, kept, agg.weights(kept), config)
            out, peak_mb[rule] = _peak_mb(phases[rule])
            del out
    payload_s.clear()
    times: dict[str, list[float]] = {name: [] for name in phases}
    while len(times["aggregate"]) < cell.repeats and (
            not times["aggregate"] or sum(t[-1] for t in times.values()) < cell.budget_s):
        for name, fn in phases.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            del out
    return {"time_s": {name: statistics.median(t) for name, t in times.items()}, "runs": len(times["aggregate"]),
            "peak_mb": peak_mb, "rank_sum": sum(ranks), "krum_f": f, "payload_s": statistics.median(payload_s),
            "capped": len(bounded[1]), "clipped": len(bounded[2]), "rejected": len(bounded[3])}


def robust_section(args, clients: list[int], ranks: list[int], methods: list[str]) -> None:
    """The "robust defaults and rules" table: one subprocess per (shape, clients, method)."""
    rules = tuple(r for r in args.rules.split(",") if r and r != "none")
    if set(rules) - set(RULES):
        raise SystemExit(f"--rules: unknown {sorted(set(rules) - set(RULES))}; choose from {list(RULES)} or none")
    print(f"\nrobust defaults and rules: median of up to {args.repeats} interleaved repeats (fewer once one took "
          f"{args.budget:.0f} s); client 0 claims {OUTLIER_CLAIM}x its examples with a {OUTLIER_DELTA:g}x delta; "
          f"RobustConfig defaults (weight_cap={RobustConfig.weight_cap:g}, norm_bound={RobustConfig.norm_bound:g}); "
          "multi_krum f = clients // 10 (>= 1)")
    cols = (f"{'shape':9s} {'layers':>6s} {'clients':>7s} {'method':10s} {'rank sum':>8s} {'agg (s)':>8s} {'runs':>4s} "
            f"{'bounds (s)':>10s} {'+bounds':>8s} {'ok':>4s} {'payloads':>8s} {'cap/clip/rej':>12s} {'MB':>6s} "
            f"{'median (s)':>10s} {'x agg':>6s} {'trimmed (s)':>11s} {'x agg':>6s} {'f':>2s} {'krum (s)':>8s} "
            f"{'x agg':>6s} {'rules MB':>8s}")
    for shape in args.shapes.split(","):
        n_layers, d, r = SHAPES[shape]
        n_layers = args.layers or n_layers
        print(f"\n{shape}: {n_layers} layers of {d} x {d}, r = {r}")
        print(cols)
        for k in clients:
            for method in methods:
                cell = Cell(shape, method, k, ranks, args.repeats, args.budget, args.threads, dense=False,
                            layers=n_layers, rules=rules, options=args.options)
                row = subprocess_json(["--robust-cell", json.dumps(asdict(cell))])
                t, mb = row["time_s"], row["peak_mb"]
                extra = t["bounds"] / t["aggregate"]
                ok = "PASS" if extra < BOUNDS_TARGET else "FAIL"
                counts = f"{row['capped']}/{row['clipped']}/{row['rejected']}"
                line = (f"{shape:9s} {n_layers:6d} {k:7d} {method:10s} {row['rank_sum']:8d} {t['aggregate']:8.3f} "
                        f"{row['runs']:4d} {t['bounds']:10.3f} {extra:+8.0%} {ok:>4s} {row['payload_s']:8.3f} "
                        f"{counts:>12s} "
                        f"{mb['bounds']:6.0f}")
                for rule, width in zip(RULES, (10, 11, 8), strict=True):
                    if rule == "multi_krum":
                        line += f" {row['krum_f'] if rule in t else '-':>2}"
                    if rule in t:
                        line += f" {t[rule]:{width}.3f} {t[rule] / t['aggregate']:5.1f}x"
                    else:
                        line += f" {'-':>{width}s} {'-':>6s}"
                rules_mb = [mb[rule] for rule in RULES if rule in mb]
                line += f" {max(rules_mb):8.0f}" if rules_mb else f" {'-':>8s}"
                print(line, flush=True)
    print(f"\n+bounds = bounds time / aggregation time, what the defaults add to it (target < +{BOUNDS_TARGET:.0%}); "
          "payloads = seconds of the bounds spent building one payload per client; cap/clip/rej = clients "
          "weight-capped / clipped / rejected by the defaults; MB = resident-set growth of an untimed first run "
          "(after malloc_trim); rules (linear methods only) time robust_combine alone on the bounded updates, x agg = "
          "its time / the aggregation's.")


def run_dense_svd(shape: str, layers: int, threads: int) -> dict:
    """Seconds for a dense float32 SVD of every layer's d x d update, from ``layers`` measured layers."""
    torch.set_num_threads(threads)
    n_layers, d, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(layers):
        m = torch.randn(d, d, generator=gen)
        t0 = time.perf_counter()
        torch.linalg.svd(m, full_matrices=False)
        times.append(time.perf_counter() - t0)
    return {"svd_s": statistics.median(times) * n_layers, "per_layer_s": statistics.median(times)}


def subprocess_json(argv: list[str]) -> dict:
    """Run this script on one cell in a fresh interpreter (own memory high-water mark); return its JSON."""
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cell {argv} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="10,100", help="comma-separated client counts")
    p.add_argument("--shapes", default="7b", help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--methods", default=",".join(available()))
    p.add_argument("--ranks", default="4,8,16", help="client ranks, cycled, for flora/flexlora/hetlora")
    p.add_argument("--repeats", type=int, default=3, help="timed aggregations per cell (median)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="stop repeating a cell once its runs took this many seconds")
    p.add_argument("--dense-layers", type=int, default=1, help="layers the dense SVD is timed on (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE",
                   help="a method option (Options field, e.g. fair_norm=bf16), passed to the methods that have it; "
                        "repeatable")
    p.add_argument("--robust", action="store_true", help='run the "robust defaults and rules" section instead')
    p.add_argument("--layers", type=int, default=0,
                   help="adapted layers in the robust section (default 0: the shape's, 64 for 7b)")
    p.add_argument("--rules", default=",".join(RULES),
                   help="robust section: rules timed for the linear methods (comma-separated, or none)")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: JSON Cell, run in this subprocess
    p.add_argument("--dense-cell", help=argparse.SUPPRESS)  # internal: shape for the dense SVD
    p.add_argument("--robust-cell", help=argparse.SUPPRESS)  # internal: JSON Cell for the robust section
    args = p.parse_args()
    if args.cell:
        print(json.dumps(run_cell(Cell(**json.loads(args.cell)))))
        return
    if args.dense_cell:
        print(json.dumps(run_dense_svd(args.dense_cell, args.dense_layers, args.threads)))
        return
    if args.robust_cell:
        print(json.dumps(run_robust_cell(Cell(**json.loads(args.robust_cell)))))
        return
    clients = [int(c) for c in args.clients.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(available())
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {available()}")
    options = args.options = dict(o.split("=", 1) for o in args.opt)
    known = {f.name for m in available() for f in dataclasses.fields(aggregator_class(m).Options)}
    if set(options) - known:
        raise SystemExit(f"--opt: unknown {sorted(set(options) - known)}; method options are {sorted(known)}")
    print(header(args.threads))
    if options:
        print("method options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    if args.robust:
        robust_section(args, clients, ranks, methods)
        return
    print(f"one aggregation round, median of up to {args.repeats} runs (fewer once a cell took {args.budget:.0f} s); "
          f"heterogeneous ranks cycle {ranks}; peak = resident-set growth during the aggregation")
    cols = (f"{'shape':9s} {'clients':>7s} {'method':10s} {'rank sum':>8s} {'time (s)':>9s} {'runs':>4s} "
            f"{'peak MB':>8s} {'target':>7s} {'ok':>4s} {'dense (s)':>10s} {'dense/thin':>10s}")
    for shape in args.shapes.split(","):
        n_layers, d, r = SHAPES[shape]
        dense_svd = None
        if args.dense_layers > 0 and any(m in DENSE for m in methods):
            dense_svd = subprocess_json(["--dense-cell", shape, "--dense-layers", str(args.dense_layers),
                                         "--threads", str(args.threads)])
            print(f"\n{shape}: {n_layers} layers of {d} x {d}, r = {r}; dense float32 SVD of one {d} x {d} layer "
                  f"{dense_svd['per_layer_s']:.1f} s (median of {args.dense_layers}) -> "
                  f"{dense_svd['svd_s']:.0f} s for {n_layers} layers")
        else:
            print(f"\n{shape}: {n_layers} layers of {d} x {d}, r = {r}")
        print(cols)
        for k in clients:
            for method in methods:
                cell = Cell(shape, method, k, ranks, args.repeats, args.budget, args.threads,
                            dense=dense_svd is not None or method in RESIDUAL, options=options)
                row = subprocess_json(["--cell", json.dumps(asdict(cell))])
                target = TARGET_S.get(method, DEFAULT_TARGET_S)
                ok = "PASS" if row["time_s"] < target else "FAIL"
                dense, ratio = "-", "-"
                if row["materialise_s"] is not None:
                    dense_s = row["materialise_s"] + (dense_svd["svd_s"] if method in DENSE else 0.0)
                    dense, ratio = f"{dense_s:.0f}", f"{dense_s / row['time_s']:.0f}x"
                print(f"{shape:9s} {k:7d} {method:10s} {row['rank_sum']:8d} {row['time_s']:9.3f} {row['runs']:4d} "
                      f"{row['peak_mb']:8.0f} {target:6.0f}s {ok:>4s} {dense:>10s} {ratio:>10s}", flush=True)
    print("\ntarget: the issue's bound for 100 clients at 7B shapes (FlexLoRA 60 s, every other method 10 s); "
          "dense = materialise dW per layer + dense SVD (FedEx-LoRA: its dense residual, no SVD), scaled to all "
          "layers.")


if __name__ == "__main__":
    main()
