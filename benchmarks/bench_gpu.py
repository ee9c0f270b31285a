"""Local training on an accelerator: fedlora's client round against a plain peft + torch loop, bf16 against fp32,
DP-SGD against plain steps, and peak memory with and without a 4-bit base; one table, every ratio from one run.

Why: a GPU is only worth it if fedlora's round runs at the speed of the loop a user would write by hand (target
>= 0.95x its tokens/s), bf16 pays, DP-SGD's per-example clipping costs little on adapters (target <= 1.3x a
plain step) and a 4-bit base frees the memory QLoRA promises. What is timed:

- fedlora: ``fedlora.client.fit`` for one client (a causal LM, one novel of the built-in Austen data), i.e. the
  model build and the data move excluded, the training inside the round's usage meter (docs/gpu.md);
  tokens/s = non-padding input tokens / seconds of training. Each configuration is run once to warm up (CUDA
  context, kernels, the tokenised partition) and then timed.
- peft loop: the same base model (``Task.base_model``), peft's LoRA on the same targets, rank and alpha, AdamW at
  the same lr, the same batches in the same order and the same loss function, timed the same way.
- DP-SGD: the same fedlora round with ``privacy.mode=sample`` (opacus, noise 1.0): seconds per step against the
  plain round's; its Poisson batches vary around the same expected size.
- Memory: peak CUDA memory allocated in the round (on a CPU: the base's parameter bytes as stored, since a
  process's peak RSS never goes down).

Run (GPU): python benchmarks/bench_gpu.py --model smollm2 [--steps 30 --batch 8 --max-length 128]
Run (CPU, a quick check of the script itself): python benchmarks/bench_gpu.py --model tiny --steps 3
``--random-weights FOLDER``: a model folder (config.json + tokenizer files) whose weights are drawn at random
(seeded) into a temporary folder: the same shapes and speed without carrying the weights (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fedlora.accel import autocast, resolve_device, to_device
from fedlora.client import fit
from fedlora.config import FedLoraConfig
from fedlora.quantize import quantized_bytes
from fedlora.tasks import get_task
from fedlora.train import batch_order

CLIENTS = 6  # data.partition=label: one novel per client, as in the README's SmolLM2 run


def random_weights_folder(src: str, seed: int = 0) -> str:
    """A copy of the model folder ``src`` (config + tokenizer) with seeded random weights, saved as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dst = Path(tempfile.mkdtemp(prefix="fedlora-random-model-"))
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy(f, dst / f.name)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
    return str(dst)


def config(args: argparse.Namespace, **extra) -> FedLoraConfig:
    return FedLoraConfig.from_run_config({
        "model.name": args.model, "model.task": "causal_lm", "model.max-length": args.max_length,
        "data.partition": "label", "train.local-steps": args.steps, "train.batch-size": args.batch,
        "train.lr": 0.002, "train.device": args.device, "adapter.rank": 8, **extra})


def fedlora_round(cfg: FedLoraConfig) -> dict[str, float]:
    """Usage of one client's training inside fedlora's round (after a warm-up round)."""
    fit(cfg, {}, 0, CLIENTS, server_round=1)
    m = fit(cfg, {}, 0, CLIENTS, server_round=2).metrics
    return {"tokens_per_second": m["tokens_per_second"], "peak_memory_mb": m["peak_memory_mb"],
            "seconds_per_step": m["train_seconds"] / cfg.train.local_steps}


def peft_loop(cfg: FedLoraConfig) -> dict[str, float]:
    """The hand-written baseline: peft LoRA on the task's base model, the same batches, loss and optimizer."""
    from peft import LoraConfig, get_peft_model

    task, device = get_task(cfg), resolve_device(cfg.train.device)
    a, t = cfg.adapter, cfg.train
    n, enc, targets = to_device(task.client_data("train", 0, CLIENTS), device)
    out = {}
    for _ in ("warm-up", "timed"):
        model = get_peft_model(task.base_model().to(device), LoraConfig(
            r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets(), task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        order = batch_order(n, t.batch_size, t.local_steps, torch.Generator().manual_seed(1))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        tokens, t0 = 0, time.perf_counter()
        model.train()
        for idx in order:
            tokens += int(enc["attention_mask"][idx.to(device)].sum())
            opt.zero_grad(set_to_none=True)
            with autocast(device, t.precision):
                loss = task.batch_loss(model, enc, targets, idx)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            opt.step()
            loss.item()  # fedlora's loop reads every step's loss too
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        out = {"tokens_per_second": tokens / seconds, "seconds_per_step": seconds / t.local_steps,
               "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0}
    return out


def base_bytes(cfg: FedLoraConfig) -> float:
    return quantized_bytes(get_task(cfg).build_model("lora", cfg.adapter.rank)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a local causal-LM folder")
    ap.add_argument("--random-weights", metavar="FOLDER", help="random weights in the shapes of this model folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--no-quant", action="store_true", help="skip the 4-bit rows (no bitsandbytes)")
    ap.add_argument("--json", help="also write the measurements here")
    args = ap.parse_args()
    if args.random_weights:
        args.model = random_weights_folder(args.random_weights)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    print(f"bench_gpu: model={args.random_weights or args.model}{' (random weights)' if args.random_weights else ''} "
          f"device={device}{' ' + torch.cuda.get_device_name(device) if gpu else ''} torch={torch.__version__} "
          f"steps={args.steps} batch={args.batch} max-length={args.max_length}", flush=True)

    r: dict[str, dict[str, float]] = {}
    r["fedlora fp32"] = fedlora_round(config(args))
    r["peft loop fp32"] = peft_loop(config(args))
    r["fedlora bf16"] = fedlora_round(config(args, **{"train.precision": "bf16"}))
    r["peft loop bf16"] = peft_loop(config(args, **{"train.precision": "bf16"}))
    r["fedlora DP-SGD fp32"] = fedlora_round(config(args, **{"privacy.mode": "sample",
                                                            "privacy.noise-multiplier": 1.0}))
    quant = not args.no_quant
    if quant:
        r["fedlora nf4 base fp32"] = fedlora_round(config(args, **{"model.quantization": "nf4"}))
        r["fedlora nf4 base bf16"] = fedlora_round(config(args, **{"model.quantization": "nf4",
                                                                  "train.precision": "bf16"}))
    sizes = {"full": base_bytes(config(args))}
    if quant:
        sizes["nf4"] = base_bytes(config(args, **{"model.quantization": "nf4"}))

    print("\n| configuration | tokens/s | s/step | peak memory (MiB) |\n| --- | ---: | ---: | ---: |")
    for name, m in r.items():
        peak = f"{m['peak_memory_mb']:.0f}" if gpu else "(RSS)"
        print(f"| {name} | {m['tokens_per_second']:.0f} | {m['seconds_per_step']:.4f} | {peak} |")
    ratios = {
        "fedlora / peft loop, tokens/s, fp32 (target >= 0.95)": r["fedlora fp32"]["tokens_per_second"]
        / r["peft loop fp32"]["tokens_per_second"],
        "fedlora / peft loop, tokens/s, bf16 (target >= 0.95)": r["fedlora bf16"]["tokens_per_second"]
        / r["peft loop bf16"]["tokens_per_second"],
        "bf16 / fp32 speed-up, fedlora": r["fedlora bf16"]["tokens_per_second"]
        / r["fedlora fp32"]["tokens_per_second"],
        "DP-SGD / plain, seconds per step (target <= 1.3)": r["fedlora DP-SGD fp32"]["seconds_per_step"]
        / r["fedlora fp32"]["seconds_per_step"],
    }
    if quant and gpu:
        ratios["peak memory nf4 / full base, fp32"] = (r["fedlora nf4 base fp32"]["peak_memory_mb"]
                                                       / r["fedlora fp32"]["peak_memory_mb"])
    if quant:
        ratios["base parameter bytes nf4 / full"] = sizes["nf4"] / sizes["full"]
    print("\n| ratio | value |\n| --- | ---: |")
    for name, v in ratios.items():
        print(f"| {name} | {v:.3f} |")
    print("\nbase parameters as stored: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": r, "ratios": ratios, "base_mib": sizes,
                                               "device": str(device), "model": args.random_weights or args.model},
                                              indent=2))


if __name__ == "__main__":
    main()
