"""Local training and evaluation loops in plain PyTorch: one step reads top to bottom here."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


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


BatchLoss = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, int, int]]


def classification_loss(model: nn.Module, enc: dict[str, torch.Tensor], labels: torch.Tensor, idx: torch.Tensor
                        ) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy, correct predictions, examples) of the mini-batch ``idx``."""
    logits = model(**take_batch(enc, idx)).logits
    loss = nn.functional.cross_entropy(logits, labels[idx])
    return loss, int((logits.argmax(-1) == labels[idx]).sum()), len(idx)


def optimise(
    model: nn.Module,
    enc: dict[str, torch.Tensor],
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    loss_fn: BatchLoss = classification_loss,
) -> tuple[list[float], int, int]:
    """AdamW over the model's trainable parameters for ``steps`` steps of ``loss_fn``; returns the per-step
    losses and the summed (correct, counted) of ``loss_fn`` (examples or tokens, per task).

    A fresh optimizer each round, as in the FedSVD and FLoRA reference code: optimizer moments of a previous
    global model would be stale after aggregation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    correct = counted = 0
    for idx in batch_order(len(labels), batch_size, steps, gen):
        loss, c, k = loss_fn(model, enc, labels, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(loss.item())
        correct, counted = correct + c, counted + k
    model.eval()
    return losses, correct, counted


def train_local(
    model: nn.Module,
    enc: dict[str, torch.Tensor],
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Classification: :func:`optimise` on the adapters + head; loss, accuracy, first/last loss."""
    losses, correct, seen = optimise(model, enc, labels, steps, batch_size, lr, weight_decay, max_grad_norm, seed)
    return {"train_loss": sum(losses) / len(losses), "train_accuracy": correct / max(seen, 1),
            "first_loss": losses[0], "last_loss": losses[-1]}


@torch.no_grad()
def evaluate(
    model: nn.Module, enc: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int = 64
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over all examples."""
    model.eval()
    total_loss, correct = 0.0, 0
    n = len(labels)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        logits = model(**take_batch(enc, idx)).logits
        total_loss += float(nn.functional.cross_entropy(logits, labels[idx], reduction="sum"))
        correct += int((logits.argmax(-1) == labels[idx]).sum())
    return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1)}
