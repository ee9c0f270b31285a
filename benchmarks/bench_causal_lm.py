"""Local training throughput of a causal LM (SmolLM2-135M by default): a plain loop vs a fedlora client round,
each without and with DP-SGD; tokens per second and peak memory.

Why: a client's round is what a federation pays per node; this separates the cost of the model itself (plain
loop: forward + backward + AdamW on fixed 8 x 128-token batches of packed Austen text, LoRA on q/k/v/o) from
what a fedlora round adds (building the model from the cached weights, loading the payload, batching, extracting
the upload) and from DP-SGD (opacus hooks: per-sequence gradients, clipping, noise). Every configuration runs in
its own fresh process (so its peak RSS is its own), one after another in one invocation; the round is timed
after a warm-up round (which tokenises the partition once, as a long-lived client would).

Run: python benchmarks/bench_causal_lm.py [--model smollm2] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("plain", "plain+dp", "round", "round+dp")


def _cfg(args: argparse.Namespace, dp: bool):
    from fedlora.config import FedLoraConfig

    overrides = {"model.task": "causal_lm", "model.name": args.model, "model.max-length": args.seq,
                 "data.packing": not dp, "data.partition": "label", "train.batch-size": args.batch,
                 "train.local-steps": args.steps, "train.lr": 1e-3, "adapter.rank": args.rank,
                 "adapter.alpha": 2.0 * args.rank, "num-server-rounds": 2}
    if dp:  # DP-SGD protects documents, so no packing; the batches below are full 128-token windows anyway
        overrides.update({"privacy.mode": "sample", "privacy.noise-multiplier": 1.0, "privacy.clip": 1.0})
    return FedLoraConfig.from_run_config(overrides)


def _batches(args: argparse.Namespace, n: int) -> dict[str, torch.Tensor]:
    """``n`` batches worth of full windows (batch x seq, every token a target) from packed Austen text."""
    from fedlora.causal_lm.data import encode_lm, load_lm_dataset
    from fedlora.tasks import get_task

    ds = load_lm_dataset("austen", "train")
    enc = encode_lm(get_task(_cfg(args, False)).tokenizer(), ds.subset(range(600)), args.seq, packing=True)
    need = n * args.batch
    assert len(enc["input_ids"]) >= need, "raise the number of paragraphs"
    return {k: v[:need] for k, v in enc.items()}


def run_one(args: argparse.Namespace, config: str) -> dict[str, float]:
    """Tokens/s and peak RSS of one configuration (called in a fresh process)."""
    from fedlora.causal_lm.train import batch_loss
    from fedlora.client import fit
    from fedlora.components import make_aggregator
    from fedlora.tasks import get_task

    torch.set_num_threads(args.threads)
    dp = config.endswith("+dp")
    cfg = _cfg(args, dp)
    agg = make_aggregator(cfg)
    tokens_per_step = args.batch * args.seq
    if config.startswith("round"):
        from fedlora.server import initial_state

        payload = dict(initial_state(cfg, agg))
        privacy = None
        times = []
        for r in range(1 + args.repeats):  # round 1 = warm-up (tokenises the partition)
            t0 = time.perf_counter()
            res = fit(cfg, payload, 0, 6, r + 1, agg, privacy)
            if r:
                times.append(time.perf_counter() - t0)
            privacy = res.privacy_state
        step_time = statistics.median(times) / args.steps
        if dp:  # one paragraph per row (no packing under DP): expected tokens of a Poisson batch of mean size B
            _, enc, _ = get_task(cfg).client_data("train", 0, 6)
            tokens_per_step = args.batch * float(enc["attention_mask"].sum(1).float().mean())
    else:
        model = get_task(cfg).build_model(agg.mode, args.rank)
        enc = _batches(args, args.warmup + args.steps)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        times = []
        if dp:
            from fedlora.privacy import ClientAccountant, dp_session

            ctx = dp_session(model, 10_000, args.batch, 1.0, 1.0, ClientAccountant("rdp"), opt, seed=0)
            dp_opt, _ = ctx.__enter__()
        for i in range(args.warmup + args.steps):
            idx = torch.arange(i * args.batch, (i + 1) * args.batch)
            t0 = time.perf_counter()
            if dp:
                dp_opt.zero_grad(set_to_none=True)
                batch_loss(model, enc, enc["labels"], idx)[0].backward()
                dp_opt.step()
            else:
                opt.zero_grad(set_to_none=True)
                batch_loss(model, enc, enc["labels"], idx)[0].backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if dp:
            ctx.__exit__(None, None, None)
        step_time = statistics.median(times)
    return {"tokens_per_s": tokens_per_step / step_time, "step_s": step_time,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local causal-LM folder")
    p.add_argument("--steps", type=int, default=5, help="timed steps (plain) / local steps per round (round)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=CONFIGS, help=argparse.SUPPRESS)  # child process: one configuration
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_one(args, args.only)))
        return
    passthrough = sys.argv[1:]
    results = {}
    for config in CONFIGS:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--only", config], capture_output=True,
                             text=True, check=True)
        results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"torch {torch.__version__}, {args.threads} thread(s), model {args.model}, batch {args.batch} x {args.seq} "
          f"tokens, LoRA r={args.rank} on q/k/v/o; plain: median of {args.steps} steps after {args.warmup} warm-up; "
          f"round: fedlora.client.fit with {args.steps} local steps, median of {args.repeats} round(s) after a "
          "warm-up round, packed windows; DP: opacus hooks, sigma 1, C 1 (round+dp: one paragraph per row, "
          f"Poisson batches of expected size {args.batch}, expected tokens); each configuration in a fresh process")
    base = results["plain"]["tokens_per_s"]
    print(f"| {'configuration':13s} | {'tokens/s':>8s} | {'s / step':>8s} | {'vs plain':>8s} | "
          f"{'peak RSS (MiB)':>14s} |")
    print(f"|{'-' * 15}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    for config, r in results.items():
        print(f"| {config:13s} | {r['tokens_per_s']:8.0f} | {r['step_s']:8.2f} | {r['tokens_per_s'] / base:7.2f}x | "
              f"{r['peak_rss_mib']:14.0f} |")


if __name__ == "__main__":
    main()
