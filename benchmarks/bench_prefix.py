"""DP-SGD example-gradients per second on MiniLM: adapters everywhere, on the top layers, and on the top layers with
the frozen prefix cached (``train.cache-frozen-layers``).

Why: DP-SGD needs many example-gradients (large logical batches), and a 2-core CPU gives few; with adapters on the top
layers only, the frozen lower layers' output is the same every step, so caching it leaves each step only the top
layers' forward and backward. Each configuration runs ``--steps`` DP-SGD steps (opacus hooks, Poisson batches of
expected size ``--batch``) on the same client's data; the cached one's one-off prefix pass is timed separately.
Configurations alternate over ``--repeats`` rounds so machine noise hits all alike; medians are reported.

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_prefix.py [--model minilm] [--steps 8] [--batch 32] [--top 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_aggregators import header

import fedlora.prefix as prefix
from fedlora.config import FedLoraConfig
from fedlora.privacy.accountant import ClientAccountant
from fedlora.privacy.dpsgd import train_local_dp
from fedlora.tasks import get_task


def setup(model: str, targets: str, cache: bool, args: argparse.Namespace):
    cfg = FedLoraConfig.from_run_config({"model.name": model, "model.max-length": args.max_length,
                                         "adapter.target-modules": targets, "train.cache-frozen-layers": cache,
                                         "train.local-steps": args.steps, "train.batch-size": args.batch})
    task = get_task(cfg)
    net = task.build_model("lora", cfg.adapter.rank)
    n, enc, targets_ = task.client_data("train", 0, 4)
    keep = torch.arange(min(n, args.examples))
    data = (len(keep), {k: v[keep] for k, v in enc.items()}, targets_[keep])
    return cfg, task, net, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--examples", type=int, default=512, help="the client's training examples used")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--top", type=int, default=2, help="adapted layers at the top")
    p.add_argument("--layers", type=int, default=6, help="encoder layers of the model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    top = "|".join(str(i) for i in range(args.layers - args.top, args.layers))
    configs = {f"all {args.layers} layers": ("query,value", False),
               f"top {args.top} layers": (rf".*layer\.({top})\..*(query|value)", False),
               f"top {args.top}, cached prefix": (rf".*layer\.({top})\..*(query|value)", True)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    prefix_s = []
    for _ in range(args.repeats):
        for label, (targets, cache) in configs.items():
            cfg, task, net, data = setup(args.model, targets, cache, args)
            if cache:
                prefix._CACHE.clear()
                t0 = time.perf_counter()
                data = task.training_inputs(net, data)
                prefix_s.append(time.perf_counter() - t0)
            n, enc, y = data
            t0 = time.perf_counter()
            train_local_dp(net, enc, y, cfg.train, clip=1.0, noise_multiplier=1.0, accountant=ClientAccountant(),
                           seed=0, loss_fn=task.batch_loss)
            times[label].append(time.perf_counter() - t0)
    print(f"{args.model}: DP-SGD, {args.steps} steps x expected batch {args.batch}, max length {args.max_length}, "
          f"{args.examples} examples; median of {args.repeats}")
    base = statistics.median(times[next(iter(configs))])
    print(f"{'adapters':28s} {'s / step':>9s} {'example-grads / s':>18s} {'speed-up':>9s}")
    for label, ts in times.items():
        t = statistics.median(ts) / args.steps
        print(f"{label:28s} {t:9.3f} {args.batch / t:18.1f} {base / args.steps / t:8.2f}x")
    print(f"one-off prefix pass over {args.examples} examples: {statistics.median(prefix_s):.2f} s")


if __name__ == "__main__":
    main()
