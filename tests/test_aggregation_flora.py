"""FLoRA: stacking makes the server update exactly sum_k p_k s_k B_k A_k, for any ranks and rounds."""

from __future__ import annotations

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, get_aggregator
from tests.lowrank_cases import ALPHA, F64, HEAD, SHAPES, ideal_update, random_updates


def _agg():
    return get_aggregator("flora", AggregatorConfig(rank=8, alpha=ALPHA))


def _init() -> dict[str, torch.Tensor]:
    init = {HEAD: torch.ones(3, 16)}
    for layer, (d_out, d_in) in SHAPES.items():
        init[naming.key(layer, "A")] = torch.randn(8, d_in)
        init[naming.key(layer, "B")] = torch.zeros(d_out, 8)
    return init






def _product(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    return state[naming.key(layer, "MB")].to(F64) @ state[naming.key(layer, "MA")].to(F64)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=tol * expected.abs().max(), rtol=0)


def test_flora_init_state_holds_empty_merged_factors_and_extras() -> None:
    state = _agg().init_state(_init())
    assert set(state) == {HEAD} | {naming.key(layer, r) for layer in SHAPES for r in ("MA", "MB")}
    for layer, (d_out, d_in) in SHAPES.items():
        assert state[naming.key(layer, "MA")].shape == (0, d_in)
        assert state[naming.key(layer, "MB")].shape == (d_out, 0)
        assert torch.all(_product(state, layer) == 0)
    assert torch.equal(state[HEAD], torch.ones(3, 16))


def test_flora_one_round_is_exact_with_heterogeneous_ranks() -> None:
    agg = _agg()
    updates = random_updates(torch.Generator().manual_seed(0))
    new = agg.aggregate(agg.init_state(_init()), updates)
    for layer, (d_out, d_in) in SHAPES.items():
        assert new[naming.key(layer, "MA")].shape == (14, d_in)
        assert new[naming.key(layer, "MB")].shape == (d_out, 14)
        _close(_product(new, layer), ideal_update(updates, layer))
    total = sum(u.num_examples for u in updates)
    head = sum(u.num_examples / total * u.tensors[HEAD] for u in updates)
    torch.testing.assert_close(new[HEAD], head, atol=1e-6, rtol=1e-6)


def test_flora_rounds_accumulate() -> None:
    agg = _agg()
    gen = torch.Generator().manual_seed(1)
    first, second = random_updates(gen), random_updates(gen, ranks=(4, 2, 2), num_examples=(1, 1, 8))
    state = agg.aggregate(agg.aggregate(agg.init_state(_init()), first), second)
    for layer in SHAPES:
        _close(_product(state, layer), ideal_update(first, layer) + ideal_update(second, layer))


def test_flora_product_ignores_client_order() -> None:
    agg = _agg()
    updates = random_updates(torch.Generator().manual_seed(2))
    a = agg.aggregate(agg.init_state(_init()), updates)
    b = agg.aggregate(agg.init_state(_init()), updates[::-1])
    for layer in SHAPES:
        assert not torch.equal(a[naming.key(layer, "MA")], b[naming.key(layer, "MA")])
        _close(_product(a, layer), _product(b, layer))


def test_flora_recompresses_when_width_outgrows_the_layer() -> None:
    agg = _agg()
    gen = torch.Generator().manual_seed(3)
    state = agg.init_state(_init())
    ideal = {layer: torch.zeros(d_out, d_in, dtype=F64) for layer, (d_out, d_in) in SHAPES.items()}
    for _ in range(3):  # 32 new columns per round: exceeds min(d) = 48 and 32
        updates = random_updates(gen, ranks=(8, 8, 8, 8), num_examples=(3, 5, 7, 11))
        state = agg.aggregate(state, updates)
        for layer, (d_out, d_in) in SHAPES.items():
            ideal[layer] += ideal_update(updates, layer)
            m = state[naming.key(layer, "MA")].shape[0]
            assert m <= min(d_out, d_in)
            assert state[naming.key(layer, "MB")].shape == (d_out, m)
            _close(_product(state, layer), ideal[layer])
    assert state[naming.key("enc.1.v", "MA")].shape[0] == 32  # full rank after recompression


def test_flora_payload_is_merged_factors_for_any_rank() -> None:
    agg = _agg()
    state = agg.aggregate(agg.init_state(_init()), random_updates(torch.Generator().manual_seed(4)))
    for rank in (1, 2, 64):
        assert list(agg.client_payload(state, rank)) == list(state)
    assert agg.fresh_each_round and agg.heterogeneous_ranks and agg.uploads == ("A", "B")


def test_flora_rejects_a_rank_that_does_not_match_the_tensors() -> None:
    agg = _agg()
    updates = random_updates(torch.Generator().manual_seed(5))
    updates[1].rank = 3
    with pytest.raises(ValueError, match="client 1 .* rank 3"):
        agg.aggregate(agg.init_state(_init()), updates)
