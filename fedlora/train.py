"""The local training loop in plain PyTorch (one step reads top to bottom here) and the batching it uses.
What is optimised (the loss) and how it is scored belong to the task (:mod:`fedlora.tasks`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlora.accel import autocast, count_batch, micro_batches, model_device, rng_devices
from fedlora.config import TrainConfig


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise once per call into padded tensors (dynamic padding to the longest text, capped)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def take_batch(enc: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = {k: v[idx] for k, v in enc.items()}
    # Trim padding columns no example in this batch uses: less compute per step, same result.
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` mini-batches drawn epoch by epoch from fresh permutations (no example repeats in an epoch)."""
    out: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=generator)
    pos = 0
    bs = min(batch_size, n)
    while len(out) < steps:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        out.append(perm[pos : pos + bs])
        pos += bs
    return out


# (model, inputs, targets, batch indices) -> (batch-mean loss, correct predictions, predictions counted).
class NonFiniteLoss(RuntimeError):
    """Local training reached a non-finite loss: the client stops and reports it instead of uploading NaN weights."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLoss(f"local training loss {loss.item()} is not finite at step {step + 1}; nothing uploaded "
                            "(the global state it started from, or train.lr, may be broken)")


BatchLoss = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, int, int]]


class Proximal:
    """FedProx's term (mu / 2) ||w - w_start||^2 over the trainable tensors (Li et al. 2020), w_start = the values
    the round started from (the global state, or a fresh adapter where the method starts fresh). Added as its
    gradient mu (w - w_start) to ``.grad``: for plain training before clipping, the same as adding it to the loss;
    under DP-SGD after the noise, since it reads no data (per-example clipping would not see it anyway)."""

    def __init__(self, params: Sequence[nn.Parameter], mu: float) -> None:
        self.mu = mu
        self.params = list(params)
        self.start = [p.detach().clone() for p in self.params] if mu > 0 else []

    def add_gradient(self) -> None:
        if self.mu <= 0:
            return
        with torch.no_grad():
            for p, p0 in zip(self.params, self.start, strict=True):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p - p0, alpha=self.mu)


def optimise(model: nn.Module, enc: dict[str, torch.Tensor], targets: torch.Tensor, loss_fn: BatchLoss,
             train: TrainConfig, seed: int) -> tuple[list[float], int, int]:
    """AdamW over the model's trainable parameters for ``train.local_steps`` steps of ``loss_fn``; returns the
    per-step losses and the summed (correct, counted) of ``loss_fn`` (examples or tokens, per task).

    ``seed`` fixes the batch order and every random draw inside the model (dropout), in a forked RNG: two
    clients (or rounds) never share dropout masks, the same seed gives the same result, and the caller's global
    RNG is left as it was. A fresh optimizer each round, as in the FedSVD and FLoRA reference code: optimizer
    moments of a previous global model would be stale after aggregation.

    ``train.micro-batch-size`` splits each batch into chunks whose gradients accumulate before the step, each
    chunk's mean loss weighted by its share of the batch: the same gradient as the whole batch (the loss is a
    mean of per-example losses), within float rounding. ``train.precision='bf16'`` autocasts the forward pass
    on CUDA (:mod:`fedlora.accel`). ``train.prox-mu`` > 0 adds FedProx's proximal term (:class:`Proximal`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    prox = Proximal(params, train.prox_mu)
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    losses: list[float] = []
    correct = counted = 0
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        model.train()
        for step, idx in enumerate(batch_order(len(targets), train.batch_size, train.local_steps, gen)):
            opt.zero_grad(set_to_none=True)
            chunks = micro_batches(idx, train.micro_batch_size)
            total = 0.0
            for chunk in chunks:
                count_batch(enc, chunk)
                with autocast(device, train.precision):
                    loss, c, k = loss_fn(model, enc, targets, chunk)
                check_finite(loss, step)
                (loss if len(chunks) == 1 else loss * (len(chunk) / len(idx))).backward()
                total += loss.item() if len(chunks) == 1 else loss.item() * len(chunk) / len(idx)
                correct, counted = correct + c, counted + k
            prox.add_gradient()
            if train.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            opt.step()
            losses.append(total)
    model.eval()
    return losses, correct, counted
