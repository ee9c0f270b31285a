"""Fed-SB: LoRA-SB's ``W0 + s B R A`` with B, A shared and frozen; clients train and send only R (r, r).

Since B and A are identical everywhere, ``B (sum p_k R_k) A == sum p_k B R_k A``: averaging R is exact
and the uplink is r^2 per layer, independent of d and of the number of clients (docs/algorithms.md sections 5, 6).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, ServerContext, register


@dataclass
class SBOptions:
    sb_init: str = field(default="orthogonal", metadata={"help": "Fed-SB factors: orthogonal (seeded) | "
                                                                 "gradient (LoRA-SB, server data)"})
    sb_init_examples: int = field(default=64, metadata={"help": "Fed-SB gradient init: server examples"})

    def validate(self) -> None:
        if self.sb_init not in ("orthogonal", "gradient"):
            raise ValueError(f"method.sb-init={self.sb_init!r} must be 'orthogonal' or 'gradient'")
        if self.sb_init_examples < 1:
            raise ValueError(f"method.sb-init-examples={self.sb_init_examples!r} must be >= 1")


@register
class FedSB(Aggregator):
    name = "fed_sb"
    mode = "sb"
    uploads = ("R",)
    frozen = ("A", "B")
    linear = True
    Options = SBOptions

    def init_state(self, init: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Per layer: random orthonormal B (d_out, r) and A (r, d_in), R = 0 (r, r); extras kept.

        Factors come from a generator seeded by (config.seed, layer name), so a run is reproducible and
        each layer gets its own subspace. The gradient-based LoRA-SB init is :func:`sb_factors_from_gradient`.
        """
        r = self.config.rank
        out: OrderedDict[str, torch.Tensor] = OrderedDict(
            (n, t.detach().to(torch.float32).clone()) for n, t in init.items() if naming.is_extra(n)
        )
        for layer, (d_out, d_in) in self.layer_dims(init).items():
            if r > min(d_out, d_in):
                raise ValueError(
                    f"fed_sb needs adapter.rank={r} <= min(d_out, d_in)={min(d_out, d_in)} "
                    f"for layer {layer!r}; lower adapter.rank"
                )
            gen = torch.Generator().manual_seed(_layer_seed(self.config.seed, layer))
            out[naming.key(layer, "A")] = _orthonormal_columns(d_in, r, gen).T.contiguous()
            out[naming.key(layer, "B")] = _orthonormal_columns(d_out, r, gen)
            out[naming.key(layer, "R")] = torch.zeros(r, r)
        return out

    def server_init(self, state: OrderedDict[str, torch.Tensor], context: ServerContext
                    ) -> OrderedDict[str, torch.Tensor]:
        """``sb_init='gradient'``: LoRA-SB's init, B, R, A from a rank-r SVD of one approximate full fine-tuning
        step -lr * sign(G), G the base-weight gradient on ``sb_init_examples`` examples the server holds (the
        paper's code uses the pooled training set). The factors then reach clients once, like any frozen tensor."""
        if self.options.sb_init != "gradient":
            return state
        out = OrderedDict(state)
        r = self.config.rank
        for layer, grad in context.base_gradients(self.options.sb_init_examples).items():
            b, r_mat, a = sb_factors_from_gradient(grad, r, context.lr, self.config.scaling(r))
            out[naming.key(layer, "B")], out[naming.key(layer, "R")], out[naming.key(layer, "A")] = b, r_mat, a
        return out

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer in naming.layers_of(state):
            for role in ("A", "B"):
                out[naming.key(layer, role)] = state[naming.key(layer, role)].to(torch.float32).clone()
            k = naming.key(layer, "R")
            out[k] = self.weighted_mean([u.tensors[k] for u in updates], p)
        return out


def sb_factors_from_gradient(
    grad: torch.Tensor, rank: int, step: float, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB init ``(B, R, A)``: ``scaling * B @ R @ A`` = best rank-r approximation of -step*sign(grad).

    grad: (d_out, d_in). The sign step mimics one Adam step of full fine-tuning; an exact truncated SVD
    (not the randomized one of the official code) makes the result deterministic. B (d_out, r) has
    orthonormal columns, A (r, d_in) orthonormal rows, R (r, r) = diag(S_r) / scaling.
    """
    d_out, d_in = grad.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank={rank} must be in [1, min(d_out, d_in)={min(d_out, d_in)}]")
    approx = -step * torch.sign(grad.detach().to(torch.float64))
    u, s, vh = torch.linalg.svd(approx, full_matrices=False)
    r_mat = torch.diag(s[:rank]) / scaling
    return u[:, :rank].to(torch.float32), r_mat.to(torch.float32), vh[:rank].to(torch.float32)


def _layer_seed(seed: int, layer: str) -> int:
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(layer.encode())) % (2**63)


def _orthonormal_columns(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """(n, r) with orthonormal columns: Q of a Gaussian matrix, signs fixed so it is unique."""
    q, rr = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64), mode="reduced")
    q = q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0)
    return q.to(torch.float32)
