"""HetLoRA (Cho et al. 2024): heterogeneous ranks by truncation and zero-padding (spec section 9).

The server keeps a global rank-r_max LoRA (``config.rank`` is r_max, the largest client rank) stored, like
FlexLoRA, in "scaled" space: the global update is ``B_g A_g`` with no scaling factor. A client of rank r_k
receives the first r_k rows of A and columns of B with its scaling undone,
``A_k = A_g[:r_k]``, ``B_k = B_g[:, :r_k] / s_{r_k}`` (s = alpha / r), so ``s_{r_k} B_k A_k`` is exactly the
rank-r_k truncation of the global update. The payload is a pure function of (state, rank).

Aggregation: each upload is brought back to scaled space (``s_k B_k``), A_k is zero-padded to r_max rows
and s_k B_k to r_max columns, and the padded factors are averaged separately:

    A_g = sum_k w_k pad(A_k),   B_g = sum_k w_k pad(s_k B_k).

Padded rows/columns contribute exactly zero, so a rank-2 client only moves the first 2 rows of A_g and
columns of B_g. The weights are the paper's *sparsity-weighted* aggregation as read in the spec (exact form
UNCONFIRMED): per layer, ``w_k proportional to p_k * ||s_k B_k A_k||_F``, normalised to sum 1, with p_k from
:meth:`Aggregator.weights` (n_k or uniform per ``config.weighting``). The norm comes from the thin factors,
``||B A||_F^2 = tr((B^T B)(A A^T))``, never a (d_out, d_in) matrix. If every update of a layer is zero the
weights fall back to p_k. Setting ``norm_weighted = False`` on an instance gives the plain zero-padding
baseline (w_k = p_k, as in the FLoRA repo's zero-padding baseline).

Not implemented: the clients' self-pruning regulariser (rank-tail norm penalty and dropping trailing ranks).
``init_state`` keeps the injected init: A_g = init A, B_g = 0. Extras (the head) are averaged with p_k.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import ClientUpdate, register
from fedlora.aggregation.scaled_global import ScaledGlobalLoRA


@register
class HetLoRA(ScaledGlobalLoRA):
    name = "hetlora"
    norm_weighted: bool = True  # False: plain zero-padding with w_k = p_k

    def layer_weights(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], p: Sequence[float]) -> list[float]:
        """w_k for one layer from the clients' scaled factors ``(A_k, s_k B_k)`` and base weights p_k."""
        if not self.norm_weighted:
            return list(p)
        norms = []
        for a, sb in factors:
            sq = torch.trace((sb.T @ sb) @ (a @ a.T))
            norms.append(float(sq.clamp_min(0).sqrt()))
        raw = [pk * nk for pk, nk in zip(p, norms, strict=True)]
        total = sum(raw)
        if total <= 0:
            return list(p)
        return [w / total for w in raw]

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        r = self.config.rank
        for layer, (d_out, d_in) in self.layer_dims(state).items():
            factors = []
            for u in updates:
                a, b = self.client_factors(u, layer, d_out, d_in)
                factors.append((a, self.config.scaling(u.rank) * b))
            w = self.layer_weights(factors, p)
            a_g = torch.zeros(r, d_in, dtype=torch.float64)
            b_g = torch.zeros(d_out, r, dtype=torch.float64)
            for (a, sb), wk in zip(factors, w, strict=True):
                rk = a.shape[0]
                a_g[:rk] += wk * a  # rows rk..r_max: zero padding, contributes nothing
                b_g[:, :rk] += wk * sb
            out[naming.key(layer, "A")] = a_g.to(torch.float32)
            out[naming.key(layer, "B")] = b_g.to(torch.float32)
        return out
