"""FedSVD: FFA-LoRA whose frozen A is re-derived every round from the SVD of the aggregated update.

Clients train B against a shared A; the server averages B (exact, as in FFA-LoRA) and re-factorises
``B_bar @ A_prev = U S Vh`` so that the next round's A = Vh_r has orthonormal rows aligned with the
directions the federation actually moved, and B = U_r S_r carries the whole update (docs/algorithms.md section 4).
The SVD goes through :func:`fedlora.aggregation.linalg.thin_svd`; no (d_out, d_in) matrix is formed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register
from fedlora.aggregation.linalg import thin_svd


@register
class FedSVD(Aggregator):
    name = "fedsvd"
    mode = "ffa"
    uploads = ("B",)
    linear = True

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer in naming.layers_of(state):
            a, b = naming.key(layer, "A"), naming.key(layer, "B")
            out[a], out[b] = refactor(self.weighted_mean([u.tensors[b] for u in updates], p), state[a])
        return out


def refactor(b_bar: torch.Tensor, a_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_new, B_new)`` with ``B_new @ A_new == b_bar @ a_prev`` and ``A_new`` (r, d_in) orthonormal rows.

    Valid for a non-orthonormal A_prev (round 0, kaiming init) and for ``b_bar == 0``: then A_new is an
    orthonormal basis of A_prev's row space and B_new is zero.
    """
    r, d_in = a_prev.shape
    d_out = b_bar.shape[0]
    if r > min(d_out, d_in):
        raise ValueError(
            f"fedsvd needs adapter.rank={r} <= min(d_out, d_in)={min(d_out, d_in)} of every layer"
        )
    u, s, vh = thin_svd(b_bar, a_prev, dtype=torch.float64)  # k = r
    return vh.to(torch.float32), (u * s).to(torch.float32)
