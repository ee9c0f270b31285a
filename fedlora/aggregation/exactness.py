"""How far a method's new global update is from the ideal one, sum_k p_k s_k B_k (R_k) A_k.

Every quantity is a sum of low-rank products L Rt, so the relative Frobenius error is computed from r x r
Gram products (<L1 Rt1, L2 Rt2> = sum((L1^T L2) * (Rt1 Rt2^T))), never from a d_out x d_in matrix. Exact
methods (FFA, FLoRA, Fed-SB, FedSVD, FedEx-LoRA) give ~1e-7 (float32); FedIT shows its mean(B) mean(A) gap;
LoRA-FAIR how much of it the correction removes; FlexLoRA its truncation.

Merged factors (MA, MB: FLoRA's cumulative update, FedEx-LoRA's folded residual) are part of the base every client
of the round trained on, so the old state's merged product is subtracted from the new global update: what is
compared with the ideal is the change of the model beyond that base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate

Terms = list[tuple[torch.Tensor, torch.Tensor]]


def _inner(x: Terms, y: Terms) -> float:
    return sum(float(((l1.T @ l2) * (r1 @ r2.T)).sum()) for l1, r1 in x for l2, r2 in y)


def merged_terms(state: dict[str, torch.Tensor], layer: str) -> Terms:
    """The merged factors of ``layer`` (MB @ MA, scale 1) as a term; none where the state has none."""
    ma, mb = state.get(naming.key(layer, "MA")), state.get(naming.key(layer, "MB"))
    return [] if ma is None else [(mb.double(), ma.double())]


def global_terms(agg: Aggregator, state: dict[str, torch.Tensor], layer: str) -> Terms:
    """The global update of ``layer`` as low-rank terms (scaling included): merged factors and/or the adapter."""
    get = {role: state.get(naming.key(layer, role)) for role in naming.ROLES}
    terms = merged_terms(state, layer)
    if get["B"] is not None:
        b = get["B"].double()
        if get["R"] is not None:
            b = b @ get["R"].double()
        terms.append((agg.global_scaling(state, layer) * b, get["A"].double()))
    return terms


def client_terms(agg: Aggregator, state: dict[str, torch.Tensor], update: ClientUpdate, layer: str) -> Terms:
    """One client's update s_k B_k (R_k) A_k; factors it did not upload (frozen) come from the old state."""
    def role(r: str) -> torch.Tensor | None:
        k = naming.key(layer, r)
        t = update.tensors.get(k, state.get(k))
        return None if t is None else t.double()

    b, a, r = role("B"), role("A"), role("R")
    if r is not None:
        b = b @ r
    return [(agg.config.scaling(update.rank) * b, a)]


def exactness_error(
    agg: Aggregator, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> float:
    """||G - sum_k p_k C_k|| / ||sum_k p_k C_k|| over all layers, with G the new global update less the old merged
    factors (the base the clients trained on; see the module docstring)."""
    p = agg.weights(updates)
    num = den = 0.0
    for layer in naming.layers_of(new):
        g = global_terms(agg, new, layer) + [(-lf, rf) for lf, rf in merged_terms(old, layer)]
        ideal = [(pk * lf, rf) for u, pk in zip(updates, p, strict=True) for lf, rf in client_terms(agg, old, u, layer)]
        diff = g + [(-lf, rf) for lf, rf in ideal]
        num += max(_inner(diff, diff), 0.0)
        den += max(_inner(ideal, ideal), 0.0)
    return math.sqrt(num / den) if den > 0 else 0.0
