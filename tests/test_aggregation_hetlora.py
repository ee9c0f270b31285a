"""HetLoRA: truncation down, zero-padding up; padded slots contribute nothing and the average is weighted by
the norm of each client's update (p_k * ||s_k B_k A_k||_F, normalised)."""

from __future__ import annotations

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator

SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}
HEAD = "classifier.weight"
ALPHA = 16.0  # s = 8, 4, 2 for ranks 2, 4, 8: powers of two, so un/re-scaling is exact in float32
R_MAX = 8
F64 = torch.float64


def _agg(**kw):
    return get_aggregator("hetlora", AggregatorConfig(rank=R_MAX, alpha=ALPHA, **kw))


def _init() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    init = {HEAD: torch.ones(3, 16)}
    for layer, (d_out, d_in) in SHAPES.items():
        init[naming.key(layer, "A")] = torch.randn(R_MAX, d_in, generator=gen)
        init[naming.key(layer, "B")] = torch.zeros(d_out, R_MAX)
    return init


def _orth(gen: torch.Generator, n: int, r: int) -> torch.Tensor:
    """(n, r) with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=F64))
    return q


def _updates(gen, ranks=(2, 4, 8), num_examples=(10, 30, 5), norms=None) -> list[ClientUpdate]:
    """Random clients; with ``norms`` given, client k's update s_k B_k A_k has Frobenius norm norms[k] per layer."""
    out = []
    for cid, (r, n) in enumerate(zip(ranks, num_examples, strict=True)):
        t = {HEAD: torch.randn(3, 16, generator=gen)}
        for layer, (d_out, d_in) in SHAPES.items():
            if norms is None:
                a = torch.randn(r, d_in, generator=gen) / d_in**0.5
                b = torch.randn(d_out, r, generator=gen) * 0.1
            else:  # A orthonormal rows, B = c U / s with orthonormal U: ||s B A||_F = c sqrt(r)
                a = _orth(gen, d_in, r).T
                b = norms[cid] / r**0.5 * _orth(gen, d_out, r) / (ALPHA / r)
            t[naming.key(layer, "A")] = a.to(torch.float32)
            t[naming.key(layer, "B")] = b.to(torch.float32)
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=n, rank=r))
    return out


def _padded_mean(updates: list[ClientUpdate], layer: str, w: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: sum_k w_k pad(A_k), sum_k w_k pad(s_k B_k)."""
    d_out, d_in = SHAPES[layer]
    a_g, b_g = torch.zeros(R_MAX, d_in, dtype=F64), torch.zeros(d_out, R_MAX, dtype=F64)
    for u, wk in zip(updates, w, strict=True):
        a = torch.cat([u.tensors[naming.key(layer, "A")].to(F64), torch.zeros(R_MAX - u.rank, d_in, dtype=F64)])
        b = torch.cat([u.tensors[naming.key(layer, "B")].to(F64), torch.zeros(d_out, R_MAX - u.rank, dtype=F64)], 1)
        a_g += wk * a
        b_g += wk * (ALPHA / u.rank) * b
    return a_g, b_g


def _check(state, layer, a_ref, b_ref) -> None:
    torch.testing.assert_close(state[naming.key(layer, "A")].to(F64), a_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state[naming.key(layer, "B")].to(F64), b_ref, atol=1e-6, rtol=1e-5)


def test_hetlora_attributes_and_init_state() -> None:
    agg = _agg()
    assert (agg.mode, agg.uploads, agg.frozen) == ("lora", ("A", "B"), ())
    assert agg.heterogeneous_ranks and not agg.fresh_each_round
    init = _init()
    state = agg.init_state(init)
    assert set(state) == set(init)
    for layer in SHAPES:
        assert torch.equal(state[naming.key(layer, "A")], init[naming.key(layer, "A")])
        assert torch.all(state[naming.key(layer, "B")] == 0)
        payload = agg.client_payload(state, 4)
        assert torch.equal(payload[naming.key(layer, "A")], init[naming.key(layer, "A")][:4])
        assert payload[naming.key(layer, "B")].shape == (SHAPES[layer][0], 4)


def test_hetlora_weights_are_proportional_to_update_norms() -> None:
    agg = _agg()
    c = (1.0, 3.0, 0.5)
    updates = _updates(torch.Generator().manual_seed(0), norms=c)
    p = [10 / 45, 30 / 45, 5 / 45]
    raw = [pk * ck for pk, ck in zip(p, c, strict=True)]
    w = [x / sum(raw) for x in raw]
    new = agg.aggregate(agg.init_state(_init()), updates)
    for layer in SHAPES:
        _check(new, layer, *_padded_mean(updates, layer, w))
    head = sum(pk * u.tensors[HEAD] for pk, u in zip(p, updates, strict=True))  # the head uses p_k
    torch.testing.assert_close(new[HEAD], head, atol=1e-6, rtol=1e-6)


def test_hetlora_norm_weights_per_layer_from_factors() -> None:
    agg = _agg()
    updates = _updates(torch.Generator().manual_seed(1))
    p = agg.weights(updates)
    for layer in SHAPES:
        norms = [
            float(((ALPHA / u.rank) * u.tensors[naming.key(layer, "B")].to(F64)
                   @ u.tensors[naming.key(layer, "A")].to(F64)).norm())
            for u in updates
        ]
        raw = [pk * nk for pk, nk in zip(p, norms, strict=True)]
        expected = [x / sum(raw) for x in raw]
        sq = torch.cat([agg.sq_norms(u.tensors[naming.key(layer, "A")][None],
                                     (ALPHA / u.rank) * u.tensors[naming.key(layer, "B")][None]) for u in updates])
        assert agg.layer_weights(sq, p) == pytest.approx(expected, rel=1e-6)


def test_hetlora_equal_norms_at_full_rank_is_plain_weighted_mean() -> None:
    agg = _agg()
    updates = _updates(torch.Generator().manual_seed(2), ranks=(8, 8, 8), norms=(2.0, 2.0, 2.0))
    new = agg.aggregate(agg.init_state(_init()), updates)
    payload = agg.client_payload(new, R_MAX)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        a_mean = sum(u.num_examples / 45 * u.tensors[ka].to(F64) for u in updates)
        b_mean = sum(u.num_examples / 45 * u.tensors[kb].to(F64) for u in updates)
        torch.testing.assert_close(payload[ka].to(F64), a_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(payload[kb].to(F64), b_mean, atol=1e-6, rtol=1e-5)


def test_hetlora_plain_zero_padding_when_not_norm_weighted() -> None:
    agg = get_aggregator("hetlora", AggregatorConfig(rank=R_MAX, alpha=ALPHA, weighting="uniform"),
                         het_norm_weighted=False)
    updates = _updates(torch.Generator().manual_seed(3), norms=(1.0, 5.0, 0.1))
    new = agg.aggregate(agg.init_state(_init()), updates)
    for layer in SHAPES:
        _check(new, layer, *_padded_mean(updates, layer, [1 / 3] * 3))
    weighted = _agg(weighting="uniform").aggregate(agg.init_state(_init()), updates)  # the default differs
    assert any(not torch.allclose(new[k], weighted[k]) for k in new)


def test_hetlora_padded_slots_contribute_zero() -> None:
    agg = _agg()
    gen = torch.Generator().manual_seed(4)
    alone = agg.aggregate(agg.init_state(_init()), _updates(gen, ranks=(2,), num_examples=(7,)))
    for layer in SHAPES:
        assert torch.all(alone[naming.key(layer, "A")][2:] == 0)
        assert torch.all(alone[naming.key(layer, "B")][:, 2:] == 0)
    # Rotating the rank-2 client's factors (A -> Q A, B -> B Q^T) keeps its update and norm, hence the weights:
    # only the first 2 rows of A_g / columns of B_g may change.
    updates = _updates(gen)
    q = _orth(gen, 2, 2).to(torch.float32)
    rotated = [ClientUpdate(u.client_id, dict(u.tensors), u.num_examples, u.rank) for u in updates]
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        rotated[0].tensors[ka] = q @ updates[0].tensors[ka]
        rotated[0].tensors[kb] = updates[0].tensors[kb] @ q.T
    x = agg.aggregate(agg.init_state(_init()), updates)
    y = agg.aggregate(agg.init_state(_init()), rotated)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        torch.testing.assert_close(x[ka][2:], y[ka][2:], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x[kb][:, 2:], y[kb][:, 2:], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(x[ka][:2], y[ka][:2], atol=1e-4)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_hetlora_truncate_of_pad_is_identity(rank: int) -> None:
    agg = _agg()
    updates = _updates(torch.Generator().manual_seed(5 + rank), ranks=(rank,), num_examples=(3,))
    state = agg.aggregate(agg.init_state(_init()), updates)
    payload = agg.client_payload(state, rank)
    assert set(payload) == set(updates[0].tensors)
    for name, t in updates[0].tensors.items():
        assert torch.equal(payload[name], t), name


def test_hetlora_zero_updates_fall_back_to_p() -> None:
    agg = _agg()
    updates = _updates(torch.Generator().manual_seed(9), ranks=(2, 8), num_examples=(1, 3))
    for u in updates:
        for layer in SHAPES:
            u.tensors[naming.key(layer, "B")] = torch.zeros_like(u.tensors[naming.key(layer, "B")])
    new = agg.aggregate(agg.init_state(_init()), updates)
    for layer in SHAPES:
        _check(new, layer, *_padded_mean(updates, layer, [0.25, 0.75]))


def test_hetlora_check_rank_and_bad_updates() -> None:
    agg = _agg()
    for r in range(1, R_MAX + 1):
        agg.check_rank(r)
    for bad in (0, R_MAX + 1):
        with pytest.raises(ValueError, match=rf"hetlora.*adapter\.rank={R_MAX}.*rank {bad}"):
            agg.check_rank(bad)
    state = agg.init_state(_init())
    updates = _updates(torch.Generator().manual_seed(10))
    updates[2].rank = 4
    with pytest.raises(ValueError, match="client 2 .* rank 4"):
        agg.aggregate(state, updates)


def test_hetlora_payload_is_pure() -> None:
    agg = _agg()
    state = agg.aggregate(agg.init_state(_init()), _updates(torch.Generator().manual_seed(11)))
    before = {k: v.clone() for k, v in state.items()}
    first = agg.client_payload(state, 4)
    for t in first.values():
        t.add_(1.0)
    second = agg.client_payload(state, 4)
    for k, v in state.items():
        assert torch.equal(v, before[k])
    for layer in SHAPES:
        assert torch.equal(second[naming.key(layer, "A")], before[naming.key(layer, "A")][:4])
        assert torch.equal(second[naming.key(layer, "B")], before[naming.key(layer, "B")][:, :4] / (ALPHA / 4))
