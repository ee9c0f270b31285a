"""Byzantine-robust combination of one round's client updates, for methods whose aggregate is linear.

For a ``linear`` method (FedIT, FFA-LoRA, Fed-SB, FedSVD before its re-factorisation) the new state is a
weighted mean of the uploads, so a rule on the deltas ``upload_k - reference`` can stand in for that mean:
median and trimmed mean return one synthetic update that any linear aggregator passes through unchanged;
multi-Krum drops outliers and lets the aggregator average the survivors with its normal weights.

Why not Flower's FedMedian / FedTrimmedAvg / Krum / MultiKrum / Bulyan (flwr 1.42): they are FedAvg
strategies over the one ArrayRecord every node received, while fedlora sends per-node payloads and clients
upload only the roles their method trains, so the strategies do not fit; their helpers (``trim_mean``,
``compute_distances``) are a few numpy lines that would drag Flower into this pure module, and
``select_multikrum`` assumes each row's own zero sorts first (ties break it), so we keep our own.
For non-linear methods (FLoRA, FlexLoRA, HetLoRA, LoRA-FAIR, FedEx-LoRA) a coordinate-wise rule on factors is
meaningless: ``B A`` is invariant to ``B -> B M, A -> M^-1 A``. There only product norms make sense, see
:func:`product_delta_norm` (e.g. to clip or screen ``s_k B_k A_k``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora.aggregation.base import ClientUpdate

RULES = ("mean", "median", "trimmed_mean", "multi_krum")
F64 = torch.float64


@dataclass
class RobustConfig:
    """Run-config keys ``robust.*``: the default bounds on one client's influence (fedlora.influence), the rule
    that combines the round's updates, and the divergence guard."""

    weight_cap: float = field(default=2.0, metadata={"help": "a client's num-examples counts at most this times "
                                                             "the round's median claim (0 = no cap)"})
    pin_examples: bool = field(default=True, metadata={"help": "a node's weight never exceeds the first "
                                                               "num-examples it reported"})
    norm_bound: float = field(default=2.0, metadata={"help": "updates whose delta norm exceeds this times the "
                                                             "round's median are clipped or rejected (0 = off)"})
    max_delta_norm: float = field(default=0.0, metadata={"help": "absolute bound on each update's delta norm "
                                                                 "(0 = none)"})
    divergence_factor: float = field(default=3.0, metadata={"help": "roll a round back when the server loss is "
                                                                    "non-finite or above this times the last "
                                                                    "good one (0 = off)"})
    rule: str = field(default="mean", metadata={"help": "mean | median | trimmed_mean | multi_krum (linear "
                                                        "methods: fedit, ffa, fed_sb, fedsvd)"})
    trim_fraction: float = field(default=0.1, metadata={"help": "trimmed_mean: share cut at each end, [0, 0.5)"})
    krum_byzantine: int = field(default=1, metadata={"help": "multi_krum: f, Byzantine clients tolerated "
                                                             "(needs n >= 2f + 3)"})
    krum_keep: int = field(default=0, metadata={"help": "multi_krum: updates kept and averaged (0 = n - f)"})

    def validate(self) -> None:
        """Raise ValueError naming the ``robust.*`` key, the value and the fix."""
        for key, value in (("weight-cap", self.weight_cap), ("norm-bound", self.norm_bound),
                           ("max-delta-norm", self.max_delta_norm), ("divergence-factor", self.divergence_factor)):
            if not value >= 0:
                raise ValueError(f"robust.{key}={value!r} must be >= 0 (0 = off)")
        if 0 < self.weight_cap < 1:
            raise ValueError(f"robust.weight-cap={self.weight_cap!r} must be >= 1 (a multiple of the median claim) "
                             "or 0 (off)")
        if 0 < self.divergence_factor <= 1:
            raise ValueError(f"robust.divergence-factor={self.divergence_factor!r} must be > 1 (a jump factor of the "
                             "server loss) or 0 (off)")
        if self.rule not in RULES:
            raise ValueError(f"robust.rule={self.rule!r} is not valid; choose one of {list(RULES)}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"robust.trim-fraction={self.trim_fraction} must be in [0, 0.5) (the fraction cut at "
                             "each end of every coordinate); e.g. 0.1")
        if self.krum_byzantine < 0:
            raise ValueError(f"robust.krum-byzantine={self.krum_byzantine} must be >= 0 (the number of Byzantine "
                             "clients multi-Krum tolerates)")
        if self.krum_keep < 0:
            raise ValueError(f"robust.krum-keep={self.krum_keep} must be >= 0 (0 keeps n - f updates)")


@dataclass
class RobustResult:
    """What the (unchanged) aggregator then averages, and JSON-able facts for metrics.jsonl."""

    updates: list[ClientUpdate]
    info: dict[str, Any] = field(default_factory=dict)


def robust_combine(reference: Mapping[str, Tensor], updates: Sequence[ClientUpdate], weights: Sequence[float],
                   config: RobustConfig) -> RobustResult:
    """Combine one round's updates with ``config.rule``, all on deltas against ``reference``.

    ``weights`` (the aggregator's p_k) are only checked: median and trimmed mean are unweighted on purpose,
    since a Byzantine client can claim any num_examples; multi-Krum leaves the weights to the aggregator.
    """
    config.validate()
    names = _check(reference, updates)
    if len(weights) != len(updates):
        raise ValueError(f"robust_combine got {len(weights)} weights for {len(updates)} client updates")
    if config.rule == "mean":
        return RobustResult(list(updates), {"rule": "mean"})
    if config.rule == "multi_krum":
        return _multi_krum(reference, updates, names, config)
    out: dict[str, Tensor] = {}
    cut = math.floor(config.trim_fraction * len(updates) + 1e-9)  # floor, immune to 0.29 * 100 = 28.999...
    for name in names:
        d = torch.stack([u.tensors[name].to(F64) for u in updates]) - reference[name].to(F64)
        robust = coordinate_median(d) if config.rule == "median" else trimmed_mean(d, cut)
        out[name] = (reference[name].to(F64) + robust).to(torch.float32)
    synthetic = ClientUpdate(client_id=-1, tensors=out, num_examples=sum(u.num_examples for u in updates),
                             rank=updates[0].rank)
    info: dict[str, Any] = {"rule": config.rule}
    if config.rule == "trimmed_mean":
        info["trimmed_per_end"] = cut
    return RobustResult([synthetic], info)


def coordinate_median(stacked: Tensor) -> Tensor:
    """True median over dim 0 (mean of the two middle values for even n; torch.median takes the lower).

    Sort-based, because torch.quantile refuses inputs above 2^24 elements."""
    n = stacked.shape[0]
    s = stacked.sort(dim=0).values
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def trimmed_mean(stacked: Tensor, cut: int) -> Tensor:
    """Mean over dim 0 after dropping the ``cut`` smallest and ``cut`` largest values of every coordinate."""
    n = stacked.shape[0]
    if 2 * cut >= n:
        raise ValueError(f"robust.trim-fraction cuts {cut} of {n} updates at each end, leaving none; lower it")
    if cut == 0:
        return stacked.mean(dim=0)
    return stacked.sort(dim=0).values[cut:n - cut].mean(dim=0)


def krum_scores(flat: Tensor, byzantine: int) -> Tensor:
    """score_k = sum of squared L2 distances from row k of ``flat`` (n, D) to its n - f - 2 nearest other rows.

    Distances come from the Gram matrix of the centred rows (||a-b||^2 = |a|^2 + |b|^2 - 2 a.b; centring does
    not change them but keeps the cancellation small), clamped at 0; a row's own distance is excluded."""
    x = flat.to(F64)
    x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    dist.fill_diagonal_(float("inf"))
    k = flat.shape[0] - byzantine - 2
    return dist.sort(dim=1).values[:, :k].sum(dim=1)


def _multi_krum(reference: Mapping[str, Tensor], updates: Sequence[ClientUpdate], names: list[str],
                config: RobustConfig) -> RobustResult:
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): keep the m updates with the lowest scores."""
    n, f = len(updates), config.krum_byzantine
    if n < 2 * f + 3:
        raise ValueError(f"robust.krum-byzantine={f} needs at least 2f + 3 = {2 * f + 3} clients per round, but "
                         f"this round had {n}; lower robust.krum-byzantine or sample more clients")
    m = config.krum_keep or n - f
    if m > n:
        raise ValueError(f"robust.krum-keep={m} exceeds the {n} clients of this round; lower it (0 keeps n - f)")
    ref = torch.cat([reference[k].to(F64).flatten() for k in names])
    flat = torch.stack([torch.cat([u.tensors[k].to(F64).flatten() for k in names]) for u in updates]) - ref
    scores = krum_scores(flat, f).tolist()
    order = sorted(range(n), key=lambda i: (scores[i], updates[i].client_id))
    kept = sorted((updates[i] for i in order[:m]), key=lambda u: u.client_id)
    info = {"rule": "multi_krum", "krum_selected": [u.client_id for u in kept],
            "krum_scores": {u.client_id: s for u, s in zip(updates, scores, strict=True)}}
    return RobustResult(kept, info)


def _check(reference: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> list[str]:
    """Sorted tensor names, after checking every update carries exactly the reference's names and shapes."""
    if not updates:
        raise ValueError("robust_combine needs at least one client update")
    want = set(reference)
    for u in updates:
        if set(u.tensors) != want:
            raise ValueError(f"client {u.client_id} uploaded tensors {sorted(set(u.tensors) ^ want)} that differ "
                             "from the reference (pass the reference restricted to the uploaded names)")
        for k, t in u.tensors.items():
            if t.shape != reference[k].shape:
                raise ValueError(f"client {u.client_id} uploaded {k} of shape {tuple(t.shape)}, reference has "
                                 f"{tuple(reference[k].shape)}")
    return sorted(want)


def product_delta_norm(a: Tensor, b: Tensor, scaling: float, a0: Tensor | None = None, b0: Tensor | None = None,
                       scaling0: float | None = None) -> float:
    """|| scaling B A - scaling0 B0 A0 ||_F without forming the (d_out, d_in) matrix (|| scaling B A || alone
    when a0, b0 are None); scaling0 defaults to scaling.

    With L = [s B, -s0 B0] (d_out, r + r0) and R = [A; A0] (r + r0, d_in): ||L R||^2 = sum((L^T L) * (R R^T)),
    two small Gram matrices. The square is clamped at 0: for a difference far below ||B A|| the cancellation
    limits its relative accuracy to about 1e-16 ||B A||^2 / ||diff||^2."""
    if (a0 is None) != (b0 is None):
        raise ValueError("product_delta_norm needs both a0 and b0, or neither")
    left, right = [scaling * b.to(F64)], [a.to(F64)]
    if a0 is not None and b0 is not None:
        left.append(-(scaling if scaling0 is None else scaling0) * b0.to(F64))
        right.append(a0.to(F64))
    lm, rm = torch.cat(left, dim=1), torch.cat(right, dim=0)
    sq = float(((lm.T @ lm) * (rm @ rm.T)).sum())
    return max(sq, 0.0) ** 0.5
