"""FlexLoRA: the global update is the best rank-r_max approximation of sum_k p_k s_k B_k A_k, and each client
receives its best rank-r_k approximation (Eckart-Young), computed from thin factors only."""

from __future__ import annotations

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from tests.lowrank_cases import ALPHA, F64, HEAD, SHAPES, ideal_update, random_updates

R_MAX = 8


def _agg(**kw):
    config = {k: kw.pop(k) for k in list(kw) if k in ("seed", "weighting")}
    return get_aggregator("flexlora", AggregatorConfig(rank=R_MAX, alpha=ALPHA, **config), **kw)


def _init(gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    gen = gen or torch.Generator().manual_seed(123)
    init = {HEAD: torch.ones(3, 16)}
    for layer, (d_out, d_in) in SHAPES.items():
        init[naming.key(layer, "A")] = torch.randn(R_MAX, d_in, generator=gen)
        init[naming.key(layer, "B")] = torch.zeros(d_out, R_MAX)
    return init






def _best(m: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation by a dense float64 SVD."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _product(state: dict[str, torch.Tensor], layer: str, scale: float = 1.0) -> torch.Tensor:
    return scale * state[naming.key(layer, "B")].to(F64) @ state[naming.key(layer, "A")].to(F64)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, atol=tol * expected.abs().max(), rtol=0)


def _orthonormal_rows(a: torch.Tensor) -> None:
    a = a.to(F64)
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=F64), atol=1e-5, rtol=0)


def test_flexlora_attributes_and_init_state() -> None:
    agg = _agg()
    assert (agg.mode, agg.uploads, agg.frozen) == ("lora", ("A", "B"), ())
    assert agg.heterogeneous_ranks and not agg.fresh_each_round
    init = _init()
    state = agg.init_state(init)
    assert set(state) == set(init)
    for layer, (d_out, _) in SHAPES.items():
        assert torch.equal(state[naming.key(layer, "A")], init[naming.key(layer, "A")])
        assert torch.equal(state[naming.key(layer, "B")], torch.zeros(d_out, R_MAX))
        payload = agg.client_payload(state, 2)
        assert torch.equal(payload[naming.key(layer, "A")], init[naming.key(layer, "A")][:2])
        assert torch.equal(payload[naming.key(layer, "B")], torch.zeros(d_out, 2))
    assert torch.equal(state[HEAD], torch.ones(3, 16))


def test_flexlora_global_is_best_rank_rmax_approximation() -> None:
    agg = _agg()
    updates = random_updates(torch.Generator().manual_seed(0))  # sum r_k = 14 > r_max: a real truncation
    new = agg.aggregate(agg.init_state(_init()), updates)
    for layer, (d_out, d_in) in SHAPES.items():
        assert new[naming.key(layer, "A")].shape == (R_MAX, d_in)
        assert new[naming.key(layer, "B")].shape == (d_out, R_MAX)
        assert new[naming.key(layer, "A")].dtype == torch.float32
        ideal = ideal_update(updates, layer)
        _close(_product(new, layer), _best(ideal, R_MAX))
        # and it is a genuine truncation, not the full sum
        assert (_product(new, layer) - ideal).norm() > 1e-3 * ideal.norm()
        _orthonormal_rows(new[naming.key(layer, "A")])
    total = sum(u.num_examples for u in updates)
    head = sum(u.num_examples / total * u.tensors[HEAD] for u in updates)
    torch.testing.assert_close(new[HEAD], head, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ranks", [(2, 2, 4), (2, 4)])
def test_flexlora_global_is_exact_when_total_rank_fits(ranks) -> None:
    agg = _agg()
    updates = random_updates(torch.Generator().manual_seed(1), ranks=ranks, num_examples=(3, 7, 9)[: len(ranks)])
    new = agg.aggregate(agg.init_state(_init()), updates)
    for layer in SHAPES:
        _close(_product(new, layer), ideal_update(updates, layer), tol=1e-5)
        _orthonormal_rows(new[naming.key(layer, "A")])  # completed with orthonormal rows when sum r_k < r_max
        k = sum(ranks)
        assert torch.all(new[naming.key(layer, "B")][:, k:] == 0)


def test_flexlora_payload_is_best_rank_rk_approximation() -> None:
    agg = _agg()
    state = agg.aggregate(agg.init_state(_init()), random_updates(torch.Generator().manual_seed(2)))
    for layer, (d_out, d_in) in SHAPES.items():
        dw = _product(state, layer)
        sigma = torch.linalg.svdvals(dw)
        for r in (1, 2, 4, 8):
            payload = agg.client_payload(state, r)
            a, b = payload[naming.key(layer, "A")], payload[naming.key(layer, "B")]
            assert a.shape == (r, d_in) and b.shape == (d_out, r)
            approx = (ALPHA / r) * b.to(F64) @ a.to(F64)
            _close(approx, _best(dw, r))
            err = (dw - approx).norm() ** 2
            torch.testing.assert_close(err, (sigma[r:] ** 2).sum(), atol=1e-5 * (sigma**2).sum(), rtol=0)
            _orthonormal_rows(a)
        assert set(agg.client_payload(state, 4)) == set(state)


def test_flexlora_payload_is_pure() -> None:
    agg = _agg()
    state = agg.aggregate(agg.init_state(_init()), random_updates(torch.Generator().manual_seed(3)))
    before = {k: v.clone() for k, v in state.items()}
    first = agg.client_payload(state, 4)
    second = agg.client_payload(state, 4)
    assert list(first) == list(second)
    for k in first:
        assert torch.equal(first[k], second[k])
    # mutating a payload leaves the state (and later payloads) alone
    for t in first.values():
        t.add_(1.0)
    for k, v in state.items():
        assert torch.equal(v, before[k])
    third = agg.client_payload(state, 4)
    for k in second:
        assert torch.equal(third[k], second[k])
    assert torch.equal(agg.client_payload(state, 4)[HEAD], before[HEAD])


def test_flexlora_check_rank_bounds() -> None:
    agg = _agg()
    for r in range(1, R_MAX + 1):
        agg.check_rank(r)
    for bad in (0, R_MAX + 1, 64):
        with pytest.raises(ValueError, match=rf"flexlora.*adapter\.rank={R_MAX}.*rank {bad}"):
            agg.check_rank(bad)
    state = agg.init_state(_init())
    with pytest.raises(ValueError, match="rank 9"):
        agg.client_payload(state, 9)
    with pytest.raises(ValueError, match="rank 0"):
        agg.client_payload(state, 0)


def test_flexlora_rejects_badrandom_updates() -> None:
    agg = _agg()
    state = agg.init_state(_init())
    updates = random_updates(torch.Generator().manual_seed(4))
    updates[1].rank = 3
    with pytest.raises(ValueError, match="client 1 .* rank 3"):
        agg.aggregate(state, updates)
    big = random_updates(torch.Generator().manual_seed(5), ranks=(2, 16), num_examples=(1, 1))
    with pytest.raises(ValueError, match="rank 16"):
        agg.aggregate(state, big)


def test_flexlora_product_ignores_client_order() -> None:
    agg = _agg()
    updates = random_updates(torch.Generator().manual_seed(6))
    a = agg.aggregate(agg.init_state(_init()), updates)
    b = agg.aggregate(agg.init_state(_init()), updates[::-1])
    for layer in SHAPES:
        _close(_product(a, layer), _product(b, layer), tol=1e-5)
    torch.testing.assert_close(a[HEAD], b[HEAD], atol=1e-6, rtol=1e-6)


def test_flexlora_round_trip_continues_from_truncations() -> None:
    """Clients that send back their payload unchanged reproduce (a truncation of) the global update."""
    agg = _agg()
    state = agg.aggregate(agg.init_state(_init()), random_updates(torch.Generator().manual_seed(7)))
    ranks = (8, 8)
    updates = []
    for cid, r in enumerate(ranks):
        payload = agg.client_payload(state, r)
        updates.append(ClientUpdate(cid, dict(payload), num_examples=5, rank=r))
    again = agg.aggregate(state, updates)
    for layer in SHAPES:
        _close(_product(again, layer), _product(state, layer), tol=1e-5)


def test_flexlora_uniform_weighting() -> None:
    agg = _agg(weighting="uniform")
    updates = random_updates(torch.Generator().manual_seed(8), ranks=(2, 4), num_examples=(1, 99))
    new = agg.aggregate(agg.init_state(_init()), updates)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        ideal = sum(0.5 * (ALPHA / u.rank) * u.tensors[kb].to(F64) @ u.tensors[ka].to(F64) for u in updates)
        _close(_product(new, layer), ideal, tol=1e-5)


def test_flexlora_auto_svd_switches_to_randomized_only_for_wide_stacks() -> None:
    agg = _agg()
    assert not agg.use_randomized(14) and agg.use_randomized(1600)
    assert not _agg(flex_svd="exact").use_randomized(1600) and _agg(flex_svd="randomized").use_randomized(14)
    with pytest.raises(ValueError, match="flex-svd"):
        _agg(flex_svd="fast")


def test_flexlora_randomized_svd_is_near_optimal_with_many_clients() -> None:
    """30 clients of rank 4 (stack width 120 > the sketch's 8 + 16): the randomized global update is within
    1 % of the best rank-r_max approximation's error, with orthonormal A rows, like the exact path."""
    ranks = (4,) * 30
    updates = random_updates(torch.Generator().manual_seed(5), ranks=ranks, num_examples=tuple(range(5, 35)))
    exact = _agg(flex_svd="exact")
    fast = _agg(flex_svd="randomized")
    new_exact = exact.aggregate(exact.init_state(_init()), updates)
    new_fast = fast.aggregate(fast.init_state(_init()), updates)
    for layer in SHAPES:
        ideal = ideal_update(updates, layer)
        optimal = (ideal - _product(new_exact, layer)).norm()
        assert (ideal - _product(new_fast, layer)).norm() <= 1.01 * optimal
        _orthonormal_rows(new_fast[naming.key(layer, "A")])
