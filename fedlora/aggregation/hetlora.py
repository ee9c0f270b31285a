"""HetLoRA (Cho et al. 2024): heterogeneous ranks by truncation and zero-padding (docs/algorithms.md section 9).

The server keeps a global rank-r_max LoRA (``config.rank`` is r_max, the largest client rank) stored, like
FlexLoRA, in "scaled" space: the global update is ``B_g A_g`` with no scaling factor. A client of rank r_k
receives the first r_k rows of A and columns of B with its scaling undone,
``A_k = A_g[:r_k]``, ``B_k = B_g[:, :r_k] / s_{r_k}`` (s = alpha / r), so ``s_{r_k} B_k A_k`` is exactly the
rank-r_k truncation of the global update. The payload is a pure function of (state, rank).

Aggregation: each upload is brought back to scaled space (``s_k B_k``), A_k is zero-padded to r_max rows
and s_k B_k to r_max columns, and the padded factors are averaged separately:

    A_g = sum_k w_k pad(A_k),   B_g = sum_k w_k pad(s_k B_k).

Padded rows/columns contribute exactly zero, so a rank-2 client only moves the first 2 rows of A_g and
columns of B_g. The weights are the paper's *sparsity-weighted* aggregation as read in docs/algorithms.md
section 9 (exact form UNCONFIRMED): per layer, ``w_k proportional to p_k * ||s_k B_k A_k||_F``, normalised
to sum 1, with p_k from :meth:`Aggregator.weights` (n_k or uniform per ``config.weighting``). The norm comes
from the thin factors,
``||B A||_F^2 = tr((B^T B)(A A^T))``, never a (d_out, d_in) matrix. If every update of a layer is zero the
weights fall back to p_k. ``method.het-norm-weighted = false`` gives the plain zero-padding baseline
(w_k = p_k, as in the FLoRA repo's zero-padding baseline).

Not implemented: the clients' self-pruning regulariser (rank-tail norm penalty and dropping trailing ranks).
``init_state`` keeps the injected init: A_g = init A, B_g = 0. Extras (the head) are averaged with p_k.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedlora import naming
from fedlora.aggregation.base import ClientUpdate, register
from fedlora.aggregation.scaled_global import ScaledGlobalLoRA


@dataclass
class HetOptions:
    het_norm_weighted: bool = field(default=True, metadata={"help": "HetLoRA: weights p_k ||s_k B_k A_k|| "
                                                                    "(false: plain zero-padding, w_k = p_k)"})

    def validate(self) -> None:
        """A bool has no invalid value."""


@register
class HetLoRA(ScaledGlobalLoRA):
    name = "hetlora"
    Options = HetOptions

    @staticmethod
    def sq_norms(a: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        """||sB_k A_k||_F^2 for stacks a (n, r, d_in), sb (n, d_out, r), from r x r Grams (float64):
        ||B A||_F^2 = sum((B^T B) * (A A^T)), never a (d_out, d_in) matrix."""
        gram_b = torch.bmm(sb.transpose(1, 2), sb).double()
        gram_a = torch.bmm(a, a.transpose(1, 2)).double()
        return (gram_b * gram_a).sum(dim=(1, 2))

    def layer_weights(self, sq_norms: torch.Tensor, p: Sequence[float]) -> list[float]:
        """w_k for one layer from the squared norms ||s_k B_k A_k||_F^2 of the clients' updates and p_k."""
        if not self.options.het_norm_weighted:
            return list(p)
        raw = [pk * float(nk) for pk, nk in zip(p, sq_norms.clamp_min(0).sqrt(), strict=True)]
        total = sum(raw)
        if total <= 0:
            return list(p)
        return [w / total for w in raw]

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        """Clients of equal rank are stacked, so a layer costs a few batched products per distinct rank
        rather than a Python loop over clients (100 clients x 64 layers at 4096 x 16 was 16 s that way)."""
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        r = self.config.rank
        groups: dict[int, list[int]] = {}
        for i, u in enumerate(updates):
            groups.setdefault(u.rank, []).append(i)
        for layer, (d_out, d_in) in self.layer_dims(state).items():
            stacks = {}
            sq = torch.zeros(len(updates), dtype=torch.float64)
            for rk, idx in groups.items():
                pairs = [self.client_factors(updates[i], layer, d_out, d_in, dtype=torch.float32) for i in idx]
                a = torch.stack([a for a, _ in pairs])  # (n, rk, d_in)
                sb = torch.stack([b for _, b in pairs]) * self.config.scaling(rk)  # (n, d_out, rk)
                sq[idx] = self.sq_norms(a, sb)
                stacks[rk] = (idx, a, sb)
            w = torch.tensor(self.layer_weights(sq, p), dtype=torch.float64)
            a_g = torch.zeros(r, d_in, dtype=torch.float64)
            b_g = torch.zeros(d_out, r, dtype=torch.float64)
            for rk, (idx, a, sb) in stacks.items():
                wk = w[idx].to(torch.float32)
                # rows/columns rk..r_max get nothing: zero padding contributes exactly zero
                a_g[:rk] += torch.tensordot(wk, a, dims=1).double()
                b_g[:, :rk] += torch.tensordot(wk, sb, dims=1).double()
            out[naming.key(layer, "A")] = a_g.to(torch.float32)
            out[naming.key(layer, "B")] = b_g.to(torch.float32)
        return out
