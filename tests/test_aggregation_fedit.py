"""FedIT: exact means of A and B, and the exact form of its inexactness."""

from __future__ import annotations

import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator

SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}  # layer -> (d_out, d_in)
HEAD = "classifier.weight"
RANK = 4
NUM_EXAMPLES = (10, 30, 5, 55)
F64 = torch.float64


def _updates(gen: torch.Generator, num_examples=NUM_EXAMPLES) -> list[ClientUpdate]:
    out = []
    for cid, n in enumerate(num_examples):
        t = {HEAD: torch.randn(3, 16, generator=gen)}
        for layer, (d_out, d_in) in SHAPES.items():
            t[naming.key(layer, "A")] = torch.randn(RANK, d_in, generator=gen)
            t[naming.key(layer, "B")] = torch.randn(d_out, RANK, generator=gen)
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=n, rank=RANK))
    return out


def _state() -> dict[str, torch.Tensor]:
    return {
        name: torch.zeros_like(t)
        for name, t in _updates(torch.Generator().manual_seed(99))[0].tensors.items()
    }


def _p(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def test_fedit_is_the_weighted_mean_of_every_tensor() -> None:
    updates = _updates(torch.Generator().manual_seed(0))
    new = get_aggregator("fedit", AggregatorConfig(rank=RANK)).aggregate(_state(), updates)
    p = _p(updates)
    assert set(new) == set(_state())
    for name, t in new.items():
        expected = sum(pk * u.tensors[name].to(F64) for pk, u in zip(p, updates, strict=True))
        torch.testing.assert_close(t.to(F64), expected, atol=1e-6, rtol=1e-6)


def test_fedit_gap_is_the_pairwise_cross_term() -> None:
    updates = _updates(torch.Generator().manual_seed(1))
    new = get_aggregator("fedit", AggregatorConfig(rank=RANK)).aggregate(_state(), updates)
    p = _p(updates)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        a = [u.tensors[ka].to(F64) for u in updates]
        b = [u.tensors[kb].to(F64) for u in updates]
        ideal = sum(pk * bk @ ak for pk, ak, bk in zip(p, a, b, strict=True))
        gap = new[kb].to(F64) @ new[ka].to(F64) - ideal
        cross = -0.5 * sum(
            p[j] * p[k] * (b[j] - b[k]) @ (a[j] - a[k]) for j in range(len(p)) for k in range(len(p))
        )
        assert gap.norm() > 0.1 * ideal.norm()  # FedIT really is inexact here
        torch.testing.assert_close(gap, cross, atol=1e-5 * ideal.abs().max(), rtol=0)


def test_fedit_identical_clients_give_identical_result() -> None:
    one = _updates(torch.Generator().manual_seed(2), num_examples=(7,))[0]
    same = [
        ClientUpdate(client_id=i, tensors=one.tensors, num_examples=n, rank=RANK)
        for i, n in enumerate((3, 9, 1))
    ]
    new = get_aggregator("fedit", AggregatorConfig(rank=RANK)).aggregate(_state(), same)
    for name, t in new.items():
        torch.testing.assert_close(t, one.tensors[name], atol=1e-6, rtol=1e-6)


def test_fedit_uniform_weighting_ignores_num_examples() -> None:
    updates = _updates(torch.Generator().manual_seed(3))
    new = get_aggregator("fedit", AggregatorConfig(rank=RANK, weighting="uniform")).aggregate(
        _state(), updates
    )
    for name, t in new.items():
        expected = torch.stack([u.tensors[name] for u in updates]).mean(0)
        torch.testing.assert_close(t, expected, atol=1e-6, rtol=1e-6)
