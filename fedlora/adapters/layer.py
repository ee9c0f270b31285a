"""The low-rank adapter layer: y = W0 x + s * B (R) A dropout(x).

Why our own module rather than peft's ``lora.Linear``: LoRA-SB needs a trainable r x r matrix R between frozen
B and A, which peft 0.21 does not offer (its TinyLoRA/KaSA variants are different parameterisations), and one
module for all three modes gives the same tensor names, the same opacus behaviour (A, R, B are plain
``nn.Linear`` so opacus uses its fast Linear grad sampler) and the same merge code everywhere. peft stays the
interchange format: :mod:`fedlora.adapters.peft_io` writes adapters that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODES = ("lora", "ffa", "sb")
TRAINABLE = {"lora": ("A", "B"), "ffa": ("B",), "sb": ("R",)}  # roles each mode trains (by default: every round)


class LowRankLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (d_out x d_in) with a rank-r update.

    mode "lora": A (r, d_in) and B (d_out, r) trained.  "ffa": B trained, A frozen.
    "sb": B R A with only R (r, r) trained.  Scaling s = alpha / r, as in peft.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, mode: str = "lora", dropout: float = 0.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"adapter mode={mode!r} is not valid; use one of {MODES}")
        if rank < 1:
            raise ValueError(f"adapter.rank={rank} must be >= 1")
        self.base = base
        self.mode = mode
        self.rank = rank
        self.scaling = alpha / rank
        d_out, d_in = base.out_features, base.in_features  # a 4-bit base's weight is packed: not its shape
        dev, dt = base.weight.device, base.weight.dtype
        if not dt.is_floating_point:  # quantised base (fedlora.quantize): the adapter trains in fp32
            dt = torch.float32
        self.lora_A = nn.Linear(d_in, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, d_out, bias=False, device=dev, dtype=dt)
        self.lora_R = nn.Linear(rank, rank, bias=False, device=dev, dtype=dt) if mode == "sb" else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Merged factors (FLoRA, FedEx-LoRA) on a base that cannot absorb them (quantised): frozen, applied beside it.
        self.register_buffer("merged_A", None)
        self.register_buffer("merged_B", None)
        self.reset_adapter()
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.set_trainable()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that inspects ``layer.weight`` (e.g. HF init hooks) keeps working."""
        return self.base.weight

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """peft's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, R = 0."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.lora_A.in_features)
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            a.uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
            if self.lora_R is not None:
                self.lora_R.weight.zero_()

    def set_trainable(self, roles: tuple[str, ...] | None = None) -> None:
        """Train the factors of ``roles`` (default: those of the mode) and freeze the others; a role this layer
        lacks (R outside mode "sb") raises. RoLoRA alternates ("B",) and ("A",) on a "lora" layer."""
        roles = TRAINABLE[self.mode] if roles is None else roles
        missing = [r for r in roles if getattr(self, f"lora_{r}", None) is None]
        if missing:
            raise ValueError(f"cannot train {missing} of a mode={self.mode!r} adapter layer (it has no such factor)")
        for role in ("A", "B", "R"):
            mod = getattr(self, f"lora_{role}")
            if mod is not None:
                mod.weight.requires_grad_(role in roles)

    def delta_weight(self) -> torch.Tensor:
        """s * B (R) A, the dense update (d_out, d_in); only for merging, never for the wire."""
        b = self.lora_B.weight
        if self.lora_R is not None:
            b = b @ self.lora_R.weight
        return self.scaling * (b @ self.lora_A.weight)

    @property
    def quantized_base(self) -> bool:
        """The base is a bitsandbytes 4/8-bit layer (fedlora.quantize): nothing can be added to its weight."""
        return type(self.base).__module__.startswith("bitsandbytes")

    def add_merged(self, merged_b: torch.Tensor, merged_a: torch.Tensor) -> None:
        """Add a frozen update MB @ MA to the base: into the weight when it is a plain float tensor (exact, no
        extra compute), else (a quantised base) as frozen factors applied in :meth:`forward`."""
        w = self.base.weight
        if not self.quantized_base:
            w.add_((merged_b.to(torch.float32) @ merged_a.to(torch.float32)).to(w.dtype))
            return
        dev = self.lora_A.weight.device
        a, b = merged_a.to(dev, torch.float32), merged_b.to(dev, torch.float32)
        if self.merged_A is not None:
            a, b = torch.cat([self.merged_A, a]), torch.cat([self.merged_B, b], dim=1)
        self.merged_A, self.merged_B = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(self.dropout(x))
        if self.lora_R is not None:
            h = self.lora_R(h)
        out = self.base(x) + self.lora_B(h) * self.scaling
        if self.merged_A is not None:
            out = out + nn.functional.linear(nn.functional.linear(x, self.merged_A), self.merged_B)
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode}, rank={self.rank}, scaling={self.scaling:g}"
