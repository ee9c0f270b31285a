"""Next-token loss, perplexity and greedy generation for a causal LM, in plain PyTorch.

The training loss is a per-example mean: each sequence's mean next-token NLL over its own target tokens, then
the mean over the batch. That is what DP-SGD needs (opacus clips the gradient of each example's loss as a
whole; a token-level mean over the whole batch would weight an example by its token count and make its
clipped contribution depend on the other examples), and the same objective is used without DP so the two runs
optimise the same thing. Evaluation is token-level (sum of NLL / number of target tokens), so perplexity =
exp(loss) is the standard corpus perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlora.accel import model_device
from fedlora.causal_lm.data import IGNORE, eos_id
from fedlora.train import take_batch


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of predicting ``labels[:, t+1]`` from position t, and the mask of target tokens.

    logits (B, T, V), labels (B, T) with -100 where no loss is taken -> (nll (B, T-1), valid (B, T-1))."""
    targets = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE,
                                      reduction="none")
    return nll, targets != IGNORE


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's mean NLL over its target tokens."""
    nll, valid = token_nll(logits, labels)
    per_example = nll.sum(1) / valid.sum(1).clamp(min=1)
    return per_example.mean()


def forward(model: nn.Module, enc: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the rows ``idx``, padding columns no row uses trimmed."""
    batch = take_batch(enc, idx)
    labels = batch.pop("labels")
    return model(**batch).logits, labels


def batch_loss(model: nn.Module, enc: dict[str, torch.Tensor], _labels: torch.Tensor, idx: torch.Tensor
               ) -> tuple[torch.Tensor, int, int]:
    """(loss, correctly predicted target tokens, target tokens) of one batch; the loss_fn of DP-SGD."""
    logits, labels = forward(model, enc, idx)
    loss = lm_loss(logits, labels)
    with torch.no_grad():
        targets = labels[:, 1:]
        valid = targets != IGNORE
        correct = int(((logits[:, :-1].argmax(-1) == targets) & valid).sum())
    return loss, correct, int(valid.sum())


@torch.no_grad()
def evaluate_lm(model: nn.Module, enc: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, float]:
    """Token-level mean NLL ("loss"), perplexity = exp(loss), next-token accuracy, number of target tokens."""
    model.eval()
    total, correct, tokens = 0.0, 0, 0
    n = len(enc["input_ids"])
    for start in range(0, n, batch_size):
        logits, labels = forward(model, enc, torch.arange(start, min(start + batch_size, n)))
        nll, valid = token_nll(logits, labels)
        total += float(nll[valid].sum())
        correct += int(((logits[:, :-1].argmax(-1) == labels[:, 1:]) & valid).sum())
        tokens += int(valid.sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(tokens, 1),
            "tokens": float(tokens)}


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[Sequence[int]],
             max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations (decoded, prompt excluded) of each prompt, one at a time (no padding to get wrong)."""
    model.eval()
    eos = eos_id(tokenizer)
    out: list[str] = []
    for ids in prompt_ids:
        x = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                           use_cache=True)
        out.append(tokenizer.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip())
    return out
