"""Fed-SB: shared frozen B, A make averaging R exact; deterministic init; LoRA-SB gradient init."""

from __future__ import annotations

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.aggregation.fed_sb import sb_factors_from_gradient

SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80), "enc.2.q": (64, 48)}
HEAD = "classifier.weight"
RANK = 6
NUM_EXAMPLES = (10, 30, 5, 55)
F64 = torch.float64


def _agg(seed: int = 0, **kw):
    return get_aggregator("fed_sb", AggregatorConfig(rank=RANK, seed=seed, **kw))


def _init() -> dict[str, torch.Tensor]:
    init = {HEAD: torch.ones(3, 16)}
    for layer, (d_out, d_in) in SHAPES.items():
        init[naming.key(layer, "A")] = torch.randn(RANK, d_in)
        init[naming.key(layer, "B")] = torch.zeros(d_out, RANK)
    return init


def _updates(gen: torch.Generator) -> list[ClientUpdate]:
    out = []
    for cid, n in enumerate(NUM_EXAMPLES):
        t = {HEAD: torch.randn(3, 16, generator=gen)}
        for layer in SHAPES:
            t[naming.key(layer, "R")] = torch.randn(RANK, RANK, generator=gen)
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=n, rank=RANK))
    return out


def test_fed_sb_init_is_orthonormal_with_zero_r() -> None:
    state = _agg().init_state(_init())
    assert torch.equal(state[HEAD], torch.ones(3, 16))
    eye = torch.eye(RANK)
    for layer, (d_out, d_in) in SHAPES.items():
        a, b, r = (state[naming.key(layer, role)] for role in ("A", "B", "R"))
        assert a.shape == (RANK, d_in) and b.shape == (d_out, RANK) and r.shape == (RANK, RANK)
        torch.testing.assert_close(b.T @ b, eye, atol=1e-6, rtol=0)
        torch.testing.assert_close(a @ a.T, eye, atol=1e-6, rtol=0)
        assert torch.all(r == 0)


def test_fed_sb_init_is_deterministic_per_seed_and_layer() -> None:
    one, again, other = _agg(0).init_state(_init()), _agg(0).init_state(_init()), _agg(1).init_state(_init())
    for name in one:
        assert torch.equal(one[name], again[name])
    a0, a2 = naming.key("enc.0.q", "A"), naming.key("enc.2.q", "A")
    assert not torch.allclose(one[a0], other[a0])
    assert not torch.allclose(one[a0], one[a2])  # same shape, different layer: a different subspace


def test_fed_sb_average_of_r_is_exact() -> None:
    agg = _agg()
    state = agg.init_state(_init())
    updates = _updates(torch.Generator().manual_seed(0))
    new = agg.aggregate(state, updates)
    p = [n / sum(NUM_EXAMPLES) for n in NUM_EXAMPLES]
    assert set(new) == set(state)
    for layer in SHAPES:
        ka, kb, kr = (naming.key(layer, role) for role in ("A", "B", "R"))
        assert torch.equal(new[ka], state[ka]) and torch.equal(new[kb], state[kb])
        a, b = state[ka].to(F64), state[kb].to(F64)
        ideal = sum(pk * b @ u.tensors[kr].to(F64) @ a for pk, u in zip(p, updates, strict=True))
        torch.testing.assert_close(b @ new[kr].to(F64) @ a, ideal, atol=1e-5 * ideal.abs().max(), rtol=0)
    head = sum(pk * u.tensors[HEAD] for pk, u in zip(p, updates, strict=True))
    torch.testing.assert_close(new[HEAD], head, atol=1e-6, rtol=1e-6)


def test_fed_sb_uniform_weighting_is_the_plain_mean() -> None:
    agg = _agg(weighting="uniform")
    updates = _updates(torch.Generator().manual_seed(1))
    new = agg.aggregate(agg.init_state(_init()), updates)
    kr = naming.key("enc.0.q", "R")
    torch.testing.assert_close(
        new[kr], torch.stack([u.tensors[kr] for u in updates]).mean(0), atol=1e-6, rtol=0
    )


def test_fed_sb_rejects_rank_above_layer_size() -> None:
    with pytest.raises(ValueError, match="adapter.rank=40 <= min"):
        get_aggregator("fed_sb", AggregatorConfig(rank=40)).init_state(_init())


@pytest.mark.parametrize(("scaling", "step"), [(1.0, 1e-3), (2.0, 0.5)])
def test_sb_factors_from_gradient_is_best_rank_r_of_sign_step(scaling: float, step: float) -> None:
    grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    b, r, a = sb_factors_from_gradient(grad, rank=RANK, step=step, scaling=scaling)
    assert b.shape == (64, RANK) and r.shape == (RANK, RANK) and a.shape == (RANK, 48)
    target = -step * torch.sign(grad.to(F64))
    u, s, vh = torch.linalg.svd(target)
    best = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK]
    got = scaling * b.to(F64) @ r.to(F64) @ a.to(F64)
    torch.testing.assert_close(got, best, atol=1e-5 * best.abs().max(), rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(RANK), atol=1e-6, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(RANK), atol=1e-6, rtol=0)
    assert torch.count_nonzero(r - torch.diag(torch.diagonal(r))) == 0
