"""FedSVD: average B, then re-factorise B_bar @ A_prev into orthonormal A and B = U S."""

from __future__ import annotations

import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator

SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}
HEAD = "classifier.weight"
RANK = 4
NUM_EXAMPLES = (10, 30, 5, 55)
F64 = torch.float64


def _agg():
    return get_aggregator("fedsvd", AggregatorConfig(rank=RANK))


def _init(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """PEFT-like round 0: kaiming-uniform A (not orthonormal), B = 0."""
    init = {HEAD: torch.zeros(3, 16)}
    for layer, (d_out, d_in) in SHAPES.items():
        init[naming.key(layer, "A")] = (torch.rand(RANK, d_in, generator=gen) * 2 - 1) / d_in**0.5
        init[naming.key(layer, "B")] = torch.zeros(d_out, RANK)
    return init


def _updates(gen: torch.Generator, zero: bool = False) -> list[ClientUpdate]:
    out = []
    for cid, n in enumerate(NUM_EXAMPLES):
        t = {HEAD: torch.randn(3, 16, generator=gen)}
        for layer, (d_out, _) in SHAPES.items():
            b = torch.randn(d_out, RANK, generator=gen)
            t[naming.key(layer, "B")] = torch.zeros_like(b) if zero else b
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=n, rank=RANK))
    return out


def _b_bar(updates: list[ClientUpdate], kb: str) -> torch.Tensor:
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * u.tensors[kb].to(F64) for u in updates)


def _check_round(
    state: dict[str, torch.Tensor], updates: list[ClientUpdate], new: dict[str, torch.Tensor]
) -> None:
    for layer, (d_out, _) in SHAPES.items():
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        a_new, b_new = new[ka].to(F64), new[kb].to(F64)
        assert a_new.shape == state[ka].shape and b_new.shape == (d_out, RANK)
        torch.testing.assert_close(a_new @ a_new.T, torch.eye(RANK, dtype=F64), atol=1e-5, rtol=0)
        target = _b_bar(updates, kb) @ state[ka].to(F64)
        torch.testing.assert_close(
            b_new @ a_new, target, atol=1e-5 * max(float(target.abs().max()), 1.0), rtol=0
        )
        gram = b_new.T @ b_new  # columns of B orthogonal, norms = descending singular values
        sigma = torch.linalg.svdvals(target)[:RANK]
        torch.testing.assert_close(
            gram, torch.diag(sigma**2), atol=1e-4 * max(float(sigma[0]) ** 2, 1.0), rtol=0
        )


def test_fedsvd_first_round_from_kaiming_a() -> None:
    gen = torch.Generator().manual_seed(0)
    agg = _agg()
    state = agg.init_state(_init(gen))
    assert (
        state[naming.key("enc.0.q", "A")] @ state[naming.key("enc.0.q", "A")].T - torch.eye(RANK)
    ).abs().max() > 0.1
    updates = _updates(gen)
    new = agg.aggregate(state, updates)
    assert set(new) == set(state)
    _check_round(state, updates, new)


def test_fedsvd_later_round_and_idempotence() -> None:
    gen = torch.Generator().manual_seed(1)
    agg = _agg()
    state = agg.aggregate(agg.init_state(_init(gen)), _updates(gen))
    updates = _updates(gen)
    new = agg.aggregate(state, updates)
    _check_round(state, updates, new)
    # one client sending the current B back changes nothing but the factor signs
    echo = {HEAD: new[HEAD]} | {naming.key(lay, "B"): new[naming.key(lay, "B")] for lay in SHAPES}
    again = agg.aggregate(new, [ClientUpdate(client_id=0, tensors=echo, num_examples=1, rank=RANK)])
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        torch.testing.assert_close(again[kb] @ again[ka], new[kb] @ new[ka], atol=1e-5, rtol=0)


def test_fedsvd_zero_update_keeps_a_orthonormal() -> None:
    gen = torch.Generator().manual_seed(2)
    agg = _agg()
    state = agg.init_state(_init(gen))
    updates = _updates(gen, zero=True)
    new = agg.aggregate(state, updates)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        assert torch.all(new[kb] == 0)
        torch.testing.assert_close(new[ka] @ new[ka].T, torch.eye(RANK), atol=1e-5, rtol=0)
        # A_new spans the row space of A_prev: projecting A_prev onto it loses nothing
        a_prev = state[ka]
        torch.testing.assert_close(a_prev @ new[ka].T @ new[ka], a_prev, atol=1e-5, rtol=0)
    _check_round(state, updates, new)


def test_fedsvd_declares_b_up_and_nothing_frozen() -> None:
    agg = _agg()
    assert agg.mode == "ffa" and agg.uploads == ("B",) and agg.frozen == ()
