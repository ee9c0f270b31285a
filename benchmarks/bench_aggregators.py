"""Server-side cost of one aggregation round per method, on adapter shapes of real models.

Why: the server aggregates every adapted layer every round; this shows what each method costs relative to
FedIT's plain weighted mean (FedSVD's thin SVD, LoRA-FAIR's per-layer solver, FLoRA's stacking), and what
each client sends up per round, measured in one run on random client updates.

Run: python benchmarks/bench_aggregators.py [--clients 10] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, available, get_aggregator

# (name, adapted layers, d_out = d_in, rank): MiniLM q/v, a BERT-base q/v, a 7B-class q/v.
SHAPES = [("MiniLM q,v", 12, 384, 8), ("BERT-base q,v", 24, 768, 16), ("7B-class q,v", 64, 4096, 16)]


def make_updates(agg, state, layers, d, r, clients, gen):
    updates = []
    for k in range(clients):
        tensors = {}
        for layer in layers:
            dims = {"A": (r, d), "B": (d, r), "R": (r, r)}
            for role in agg.uploads:
                tensors[naming.key(layer, role)] = torch.randn(*dims[role], generator=gen) * 0.01
        tensors.update({n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in state.items()
                        if naming.is_extra(n)})
        updates.append(ClientUpdate(k, tensors, 100 + 10 * k, r))
    return updates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clients} clients, median of {args.repeats}")
    print(f"{'shape':16s} {'method':10s} {'aggregate (ms)':>15s} {'vs fedit':>9s} {'up/client (MB)':>15s}")
    for label, n_layers, d, r in SHAPES:
        layers = [f"layer.{i}.attn.q" for i in range(n_layers)]
        base_ms = None
        for name in ["fedit"] + [m for m in available() if m != "fedit"]:
            agg = get_aggregator(name, AggregatorConfig(rank=r, alpha=2 * r, fair_steps=100))
            init = {}
            for layer in layers:
                init[naming.key(layer, "A")] = torch.randn(r, d, generator=gen) / d**0.5
                init[naming.key(layer, "B")] = torch.zeros(d, r)
            init["classifier.weight"] = torch.randn(6, d, generator=gen) * 0.02
            state = agg.init_state(init)
            updates = make_updates(agg, state, layers, d, r, args.clients, gen)
            agg.aggregate(state, updates)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                agg.aggregate(state, updates)
                times.append(time.perf_counter() - t0)
            ms = 1000 * statistics.median(times)
            base_ms = base_ms or ms
            up = sum(t.numel() * 4 for t in updates[0].tensors.values()) / 1e6
            print(f"{label:16s} {name:10s} {ms:15.1f} {ms / base_ms:8.1f}x {up:15.3f}")


if __name__ == "__main__":
    main()
