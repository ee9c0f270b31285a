"""Put low-rank adapters into a transformers model by target-module patterns, and freeze the rest."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from fedlora.adapters.layer import LowRankLinear


def matches(name: str, patterns: Sequence[str]) -> bool:
    """peft-like matching: a pattern matches a module whose path ends in ``.pattern`` or equals it, or
    (when it contains regex characters) whose full path it ``re.fullmatch``-es."""
    for pat in patterns:
        if name == pat or name.endswith("." + pat):
            return True
        if any(c in pat for c in "*[]()|\\+?") and re.fullmatch(pat, name):
            return True
    return False


def inject_adapters(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    mode: str = "lora",
    dropout: float = 0.0,
    head: Sequence[str] = (),
) -> list[str]:
    """Wrap every ``nn.Linear`` whose path matches ``targets``; freeze all base weights; keep ``head`` modules
    trainable (a newly initialised task head). Returns the wrapped layers' paths.

    Freezing happens before wrapping so only adapter parameters created here (and the head) train.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LowRankLinear) and matches(name, targets):
            if name and matches(name, head):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LowRankLinear(module, rank, alpha, mode, dropout))
            wrapped.append(name)
    if not wrapped:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"adapter.target-modules={','.join(targets)!r} matched no nn.Linear layer; "
            f"this model's linear layer names are {linear}"
        )
    if head:
        found = False
        for name, module in model.named_modules():
            if name and matches(name, head):
                found = True
                for p in module.parameters():
                    p.requires_grad_(True)
        if not found:
            raise ValueError(f"adapter.head={','.join(head)!r} matched no module; set it to '' for no head")
    return wrapped


def adapter_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
