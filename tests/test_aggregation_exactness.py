"""The exactness metric: ~0 for exact methods, the known FedIT gap for FedIT, computed from thin factors."""

from __future__ import annotations

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.aggregation.exactness import exactness_error

SHAPES = {"l0": (24, 16), "l1": (12, 20)}
R = 4


def _setup(method: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    agg = get_aggregator(method, AggregatorConfig(rank=R, alpha=8.0, seed=1))
    init = {}
    for layer, (d_out, d_in) in SHAPES.items():
        init[naming.key(layer, "A")] = torch.randn(R, d_in, generator=gen) / d_in**0.5
        init[naming.key(layer, "B")] = torch.zeros(d_out, R)
    init["classifier.weight"] = torch.randn(3, 8, generator=gen)
    state = agg.init_state(init)
    updates = []
    for k in range(3):
        tensors = {"classifier.weight": torch.randn(3, 8, generator=gen)}
        for layer, (d_out, d_in) in SHAPES.items():
            dims = {"A": (R, d_in), "B": (d_out, R), "R": (R, R)}
            for role in agg.round_uploads(1):
                tensors[naming.key(layer, role)] = torch.randn(*dims[role], generator=gen)
        updates.append(ClientUpdate(k, tensors, 10 * (k + 1), R))
    return agg, state, updates


@pytest.mark.parametrize("method", ["ffa", "flora", "fed_sb", "fedsvd", "fedex_lora", "rolora"])
def test_exact_methods_score_zero(method):
    agg, state, updates = _setup(method)
    new = agg.aggregate(state, updates)
    assert exactness_error(agg, state, new, updates) < 1e-5
    # a second round on top of the first (FLoRA and FedEx-LoRA: the old merged factors are the clients' base)
    new2 = agg.aggregate(new, updates)
    assert exactness_error(agg, new, new2, updates) < 1e-5


def test_fedit_error_matches_the_dense_gap():
    agg, state, updates = _setup("fedit")
    new = agg.aggregate(state, updates)
    p = agg.weights(updates)
    s = agg.config.scaling(R)
    num = den = 0.0
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        ideal = sum(pk * s * u.tensors[kb].double() @ u.tensors[ka].double() for u, pk in zip(updates, p, strict=True))
        got = s * new[kb].double() @ new[ka].double()
        num += float(((got - ideal) ** 2).sum())
        den += float((ideal**2).sum())
    expected = (num / den) ** 0.5
    assert expected > 0.05  # FedIT is visibly inexact on independent random clients
    assert exactness_error(agg, state, new, updates) == pytest.approx(expected, rel=1e-6)


def test_lora_fair_is_closer_than_fedit():
    fedit, state, updates = _setup("fedit")
    fair = get_aggregator("lora_fair", AggregatorConfig(rank=R, alpha=8.0), fair_lambda=0.0, fair_steps=300)
    e_fedit = exactness_error(fedit, state, fedit.aggregate(state, updates), updates)
    e_fair = exactness_error(fair, state, fair.aggregate(state, updates), updates)
    assert e_fair < e_fedit
