"""Where and how a process computes: the device (``train.device``), bf16 autocast (``train.precision``), the
micro-batches of gradient accumulation, and the meter behind each round's peak memory and throughput.

Why these rules (docs/gpu.md):
- Only the model and a client's encoded batch live on the device. Adapter tensors leave it at the wire
  (:func:`fedlora.adapters.adapter_state` returns CPU float32 copies) and aggregation stays on the CPU in
  float32/float64, where every method is exact and none was measured faster on a GPU at the sizes sent.
- Autocast covers the forward pass only, and only on CUDA: the backward pass follows the forward's dtypes, the
  trainable tensors and AdamW's moments stay fp32, and the CPU path (tests, the demo, CI) stays exact and fast
  (bf16 matmuls are slower than fp32 on most CPUs).
"""

from __future__ import annotations

import contextlib
import contextvars
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedlora.config import ConfigError

if TYPE_CHECKING:
    from fedlora.tasks.base import Encoded

AUTOCAST_DEVICES = ("cuda",)  # device types on which train.precision='bf16' turns autocast on


def resolve_device(spec: str) -> torch.device:
    """``train.device`` as a torch device in this process; an unusable one is a :class:`ConfigError` naming the fix.

    ``auto`` = the first visible CUDA device, else the CPU. Under Flower's ray simulation a client sees only the
    GPUs ray gave it (``--gpus-per-client``), so ``auto`` is CPU there unless GPUs were given."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r}: cuda requested but no CUDA device is visible: set train.device=cpu "
                          "(or auto; in a ray simulation give clients GPUs with fedlora run --gpus-per-client)")
    device = torch.device("cuda:0" if spec == "cuda" else spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                          f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def rng_devices(device: torch.device) -> list[torch.device]:
    """The devices whose RNG ``torch.random.fork_rng`` must fork for code running on ``device`` (dropout on a GPU
    draws from that GPU's generator): seeded and restored like the CPU's, so a GPU run is as reproducible."""
    return [device] if device.type == "cuda" else []


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for a forward pass on ``device`` when ``precision='bf16'`` and the device type allows it;
    otherwise nothing (fp32)."""
    if precision == "bf16" and device.type in AUTOCAST_DEVICES:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(data: Encoded, device: torch.device) -> Encoded:
    """A client's (examples, inputs, targets) on ``device``, moved once per round (a no-op on the CPU)."""
    n, enc, targets = data
    if device.type == "cpu":
        return data
    return n, {k: v.to(device, non_blocking=True) for k, v in enc.items()}, targets.to(device, non_blocking=True)


def micro_batches(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The rows of one logical batch in chunks of at most ``size`` (0 = one chunk): gradient accumulation."""
    if size <= 0 or len(idx) <= size:
        return [idx]
    return list(torch.split(idx, size))


# ------------------------------------------------------------------------------------------------- the meter


@dataclass
class Usage:
    """What one client's local training cost: what the round line and metrics.jsonl show."""

    seconds: float = 0.0
    examples: int = 0  # example-passes (rows of every training batch)
    tokens: int = 0  # non-padding input tokens of those rows
    peak_memory_mb: float = 0.0  # CUDA: peak allocated on the device; CPU: the process's peak RSS so far

    def metrics(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {"examples_per_second": self.examples / s, "tokens_per_second": self.tokens / s,
                "peak_memory_mb": self.peak_memory_mb, "train_seconds": self.seconds}


_ACTIVE: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("fedlora_usage", default=None)


def count_batch(enc: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
    """Training loops call this for every batch; it counts into the active :func:`metered` block, if any."""
    usage = _ACTIVE.get()
    if usage is not None:
        usage.examples += len(idx)
        mask = enc.get("attention_mask")
        usage.tokens += int(mask[idx.to(mask.device)].sum()) if mask is not None else 0


@contextlib.contextmanager
def metered(device: torch.device) -> Iterator[Usage]:
    """Time, count and take the peak memory of the training inside the block."""
    usage = Usage()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    token = _ACTIVE.set(usage)
    t0 = time.perf_counter()
    try:
        yield usage
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        usage.seconds = time.perf_counter() - t0
        _ACTIVE.reset(token)
        usage.peak_memory_mb = peak_memory_mb(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
