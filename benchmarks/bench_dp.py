"""Cost of a DP-SGD step (opacus, per-example clipping + noise) against a plain step, per adapter mode.

Why: sample-level DP is paid on every client step; this shows the factor it costs with our adapters (opacus'
"hooks" mode, per-example gradients of the trainable A/R/B and head only) on the tiny random BERT and on the
pretrained MiniLM. A step = forward + backward + optimizer step on a fixed batch of real Austen text (the same
batches for both, so the DP side's Poisson batch-size variation is left out), medians after warm-up, every
configuration measured in one run, interleaved step by step so machine noise hits all alike.

Run: python benchmarks/bench_dp.py [--steps 15] [--threads 1] [--models tiny,minilm]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from fedlora.config import FedLoraConfig
from fedlora.data import load_dataset
from fedlora.models import load_tokenizer
from fedlora.privacy import ClientAccountant, dp_session
from fedlora.tasks import get_task
from fedlora.train import encode, take_batch

MODES = ("lora", "ffa", "sb")


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable:
    def step(batch: dict[str, torch.Tensor], y: torch.Tensor) -> None:  # as fedlora.train.optimise
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(**batch).logits, y).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def dp_step(model: nn.Module, dp_opt) -> Callable:
    def step(batch: dict[str, torch.Tensor], y: torch.Tensor) -> None:  # as fedlora.privacy.train_local_dp
        dp_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(**batch).logits, y).backward()
        dp_opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--models", default="tiny,minilm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("austen", "train")
    rounds = args.warmup + args.steps
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: rounds * args.batch_size]
    texts = [ds.texts[i] for i in order.tolist()]
    labels = torch.tensor([ds.labels[i] for i in order.tolist()])

    setups: list[tuple[str, str, str, int, Callable, list]] = []  # (model, mode, kind, trainable, step, batches)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            cfg = FedLoraConfig()
            cfg.model.name, cfg.model.max_length, cfg.adapter.rank = name, args.max_length, args.rank
            try:
                tok = load_tokenizer(name)
                task = get_task(cfg)
                models = {(mode, kind): task.build_model(mode, args.rank) for mode in MODES for kind in ("plain", "dp")}
            except (ValueError, OSError, ImportError) as e:
                notes.append(f"skipped model {name!r}: {e}")
                continue
            enc = encode(tok, texts, args.max_length)
            batches = [(take_batch(enc, torch.arange(i * args.batch_size, (i + 1) * args.batch_size)),
                        labels[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(rounds)]
            for mode in MODES:
                for kind in ("plain", "dp"):
                    model = models[(mode, kind)]
                    params = [q for q in model.parameters() if q.requires_grad]
                    opt = torch.optim.AdamW(params, lr=1e-3)
                    if kind == "plain":
                        model.train()
                        step = plain_step(model, opt, params)
                    else:
                        dp_opt, _ = stack.enter_context(dp_session(
                            model, len(texts), args.batch_size, clip=1.0, noise_multiplier=1.0,
                            accountant=ClientAccountant("rdp"), optimizer=opt, seed=0))
                        step = dp_step(model, dp_opt)
                    setups.append((name, mode, kind, sum(q.numel() for q in params), step, batches))
        times: dict[int, list[float]] = {k: [] for k in range(len(setups))}
        for i in range(rounds):
            for k, (_, _, _, _, step, batches) in enumerate(setups):
                t0 = time.perf_counter()
                step(*batches[i])
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)

    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size} x <= {args.max_length} tokens "
          f"(Austen train, padding trimmed per batch), rank {args.rank} on query/value + head, median of "
          f"{args.steps} steps after {args.warmup} warm-up, all interleaved in one run; DP: opacus hooks, sigma 1, C 1")
    print(f"{'model':8s} {'mode':5s} {'tokens':>6s} {'trainable':>10s} {'no DP (ms)':>11s} {'DP-SGD (ms)':>12s} "
          f"{'DP / no DP':>11s}")
    med = {(s[0], s[1], s[2]): 1000 * statistics.median(times[k]) for k, s in enumerate(setups)}
    for name, mode, kind, trainable, _, batches in setups:
        if kind == "plain":
            width = statistics.median(b["input_ids"].shape[1] for b, _ in batches)
            a, b = med[(name, mode, "plain")], med[(name, mode, "dp")]
            print(f"{name:8s} {mode:5s} {width:6.0f} {trainable:10d} {a:11.1f} {b:12.1f} {b / a:10.2f}x")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
