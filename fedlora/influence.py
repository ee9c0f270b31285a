"""Bounds on what one client can do to a round, on by default for every method (README "Threat model").

Two levers decide a client's effect on the aggregate: its weight and the size of its update.
- Weight: the claimed ``num-examples`` counts at most ``robust.weight-cap`` times the round's median claim, and
  (``robust.pin-examples``) never more than the first value the node reported: a client cannot buy the round
  by claiming millions of examples, nor grow its share later.
- Size: each update is measured as a delta against the state the client started from (the payload it was
  sent), never as raw tensors. Deltas above ``robust.norm-bound`` times the round's median delta norm (and
  above ``robust.max-delta-norm`` when set) are clipped, or rejected where clipping is not exact.

How the delta is measured follows the method. For a ``linear`` method the uploads are averaged as they are,
so the delta is ``upload - payload`` over all uploaded tensors, and clipping ``payload + f (upload - payload)``
is exact. Otherwise the server combines products, so each layer's delta is ``s B A - s B0 A0``, its norm taken
from thin factors (:func:`fedlora.robust.product_delta_norm`, never a (d_out, d_in) matrix), plus the head's
delta. A method whose clients start from fresh adapters (FLoRA: B0 = 0) is clipped exactly by scaling B and
the head's delta; for the others (FlexLoRA, HetLoRA, LoRA-FAIR, FedEx-LoRA) no rank-r factor pair has the clipped
product, so an over-bound update is rejected. (FedEx-LoRA's delta is the change of the client's adapter product
from the global one; the folded residual is part of the base it started from and does not count.)

Median: of the round's claims, and of its non-zero delta norms (a free rider's zero says nothing about the
scale of honest updates and would pull the bound under them). With 3 or more values the ordinary median; with
2, the smaller one, so that one liar of two cannot raise the bound to half its own norm. No non-zero norm: no
relative bound.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from fedlora import naming
from fedlora.aggregation import Aggregator, ClientUpdate
from fedlora.robust import RobustConfig, product_delta_norm


def robust_median(values: Sequence[float]) -> float:
    """The median of 3 or more values, the smaller of 2 (see the module docstring)."""
    ordered = sorted(values)
    return statistics.median(ordered) if len(ordered) >= 3 else ordered[0]


def bound_weights(updates: Sequence[ClientUpdate], first_claim: dict[int, int], config: RobustConfig
                  ) -> tuple[list[ClientUpdate], list[str]]:
    """Updates with ``num_examples`` capped (records each node's first claim in ``first_claim``), and one note per
    capped client."""
    if not updates:
        return [], []
    claims = [u.num_examples for u in updates]
    median = robust_median(claims)
    cap = config.weight_cap * median if config.weight_cap > 0 else math.inf
    out, notes = [], []
    for u in updates:
        pinned = first_claim.setdefault(u.client_id, u.num_examples) if config.pin_examples else u.num_examples
        n = int(min(u.num_examples, pinned, cap))
        if n < u.num_examples:
            why = (f"first reported {pinned}" if n == pinned else
                   f"robust.weight-cap={config.weight_cap:g} x median claim {median:g}")
            notes.append(f"node {u.client_id}: num-examples {u.num_examples} counted as {n} ({why})")
        out.append(dataclasses.replace(u, num_examples=max(n, 1)))
    return out, notes


def delta_norm(agg: Aggregator, payload: Mapping[str, torch.Tensor], update: ClientUpdate) -> float:
    """L2 size of ``update`` against the ``payload`` its client started from (see the module docstring)."""
    extras = [k for k in update.tensors if naming.is_extra(k)]
    if agg.linear:
        keys = list(update.tensors)
    else:
        keys = extras
    # float32 differences, one pass each: the sum of squares is accumulated in a Python float (float64)
    sq = sum(float(torch.linalg.vector_norm(update.tensors[k] - payload[k])) ** 2 for k in keys)
    if not agg.linear:
        s = agg.config.scaling(update.rank)
        for layer in naming.layers_of(update.tensors):
            a, b = update.tensors[naming.key(layer, "A")], update.tensors[naming.key(layer, "B")]
            if agg.fresh_each_round:
                sq += product_delta_norm(a, b, s) ** 2
            else:
                a0, b0 = payload[naming.key(layer, "A")], payload[naming.key(layer, "B")]
                sq += product_delta_norm(a, b, s, a0, b0) ** 2
    return math.sqrt(sq)


def clip(agg: Aggregator, payload: Mapping[str, torch.Tensor], update: ClientUpdate, factor: float
         ) -> ClientUpdate | None:
    """``update`` with its delta scaled by ``factor`` (< 1), or None where that is not exact (then: reject)."""
    if agg.linear:
        tensors = {k: payload[k] + factor * (t - payload[k]) for k, t in update.tensors.items()}
    elif agg.fresh_each_round:  # product s B A from B0 = 0: scaling B scales it exactly
        tensors = {k: (payload[k] + factor * (t - payload[k]) if naming.is_extra(k) else
                       t * factor if naming.split(k)[1] == "B" else t) for k, t in update.tensors.items()}
    else:
        return None
    return dataclasses.replace(update, tensors=tensors)


def bound_norms(agg: Aggregator, payloads: Mapping[int, Mapping[str, torch.Tensor]],
                updates: Sequence[ClientUpdate], config: RobustConfig
                ) -> tuple[list[ClientUpdate], list[str], list[str], float | None]:
    """(kept updates, notes on clipped ones, notes on rejected ones, the round's median delta norm)."""
    if not updates or (config.norm_bound <= 0 and config.max_delta_norm <= 0):
        return list(updates), [], [], None
    norms = [delta_norm(agg, payloads[u.client_id], u) for u in updates]
    moved = [x for x in norms if x > 0]
    median = robust_median(moved) if moved else 0.0
    bound = math.inf
    if config.norm_bound > 0 and median > 0:
        bound = config.norm_bound * median
    if config.max_delta_norm > 0:
        bound = min(bound, config.max_delta_norm)
    kept, clipped, rejected = [], [], []
    for u, norm in zip(updates, norms, strict=True):
        if norm <= bound:
            kept.append(u)
            continue
        why = (f"delta norm {norm:.4g} > bound {bound:.4g} (robust.norm-bound={config.norm_bound:g} x median "
               f"{median:.4g}, robust.max-delta-norm={config.max_delta_norm:g})")
        bounded = clip(agg, payloads[u.client_id], u, bound / norm)
        if bounded is None:
            rejected.append(f"node {u.client_id}: {why}; rejected (method {agg.name!r}: a clipped product has no "
                            "exact factors at this rank)")
        else:
            kept.append(bounded)
            clipped.append(f"node {u.client_id}: {why}; clipped to the bound")
    return kept, clipped, rejected, median
