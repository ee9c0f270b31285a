"""LoRA-FAIR: the server residual dB moves (B_bar + dB) A_bar towards sum p_k B_k A_k, never away."""

from __future__ import annotations

import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.aggregation.lora_fair import FairObjective

SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}
HEAD = "classifier.weight"
RANK = 4
NUM_EXAMPLES = (10, 30, 5, 55)
F64 = torch.float64


def _updates(gen: torch.Generator, zero_b: bool = False) -> list[ClientUpdate]:
    out = []
    for cid, n in enumerate(NUM_EXAMPLES):
        t = {HEAD: torch.randn(3, 16, generator=gen)}
        for layer, (d_out, d_in) in SHAPES.items():
            t[naming.key(layer, "A")] = torch.randn(RANK, d_in, generator=gen) / d_in**0.5
            t[naming.key(layer, "B")] = torch.randn(d_out, RANK, generator=gen) * (0.0 if zero_b else 0.1)
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=n, rank=RANK))
    return out


def _state() -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(t) for n, t in _updates(torch.Generator().manual_seed(99))[0].tensors.items()}


def _p() -> list[float]:
    return [n / sum(NUM_EXAMPLES) for n in NUM_EXAMPLES]


def _ideal(updates: list[ClientUpdate], layer: str) -> torch.Tensor:
    ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
    return sum(
        pk * u.tensors[kb].to(F64) @ u.tensors[ka].to(F64) for pk, u in zip(_p(), updates, strict=True)
    )


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


def _dense_loss(db: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor, ideal: torch.Tensor, lam: float):
    x = (b_bar.to(F64) + db) @ a_bar.to(F64)
    return 1 - _cos(x, ideal) + lam * float(db.norm())


def _run(updates: list[ClientUpdate], **kw) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    cfg = AggregatorConfig(rank=RANK)
    return (
        get_aggregator("lora_fair", cfg, **kw).aggregate(_state(), updates),
        get_aggregator("fedit", cfg).aggregate(_state(), updates),
    )


def test_factored_objective_matches_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = _updates(gen)
    fedit = get_aggregator("fedit", AggregatorConfig(rank=RANK)).aggregate(_state(), updates)
    for layer, (d_out, _) in SHAPES.items():
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        obj = FairObjective(
            fedit[ka],
            fedit[kb],
            [u.tensors[ka] for u in updates],
            [u.tensors[kb] for u in updates],
            _p(),
            lam=0.3,
        )
        db = 0.05 * torch.randn(d_out, RANK, generator=gen, dtype=F64)
        dense = torch.tensor(_dense_loss(db, fedit[kb], fedit[ka], _ideal(updates, layer), 0.3), dtype=F64)
        value, grad = obj.value_and_grad(db)
        torch.testing.assert_close(torch.tensor(value, dtype=F64), dense, atol=1e-10, rtol=0)
        leaf = db.clone().requires_grad_(True)  # gradient against autograd of the dense loss
        x = (fedit[kb].to(F64) + leaf) @ fedit[ka].to(F64)
        ideal = _ideal(updates, layer)
        (1 - (x * ideal).sum() / (x.norm() * ideal.norm()) + 0.3 * leaf.norm()).backward()
        torch.testing.assert_close(grad, leaf.grad, atol=1e-10, rtol=0)


def test_correction_improves_cosine_and_never_the_loss() -> None:
    updates = _updates(torch.Generator().manual_seed(1))
    for lam in (0.0, 0.01):
        fair, fedit = _run(updates, fair_lambda=lam)
        for layer in SHAPES:
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            ideal = _ideal(updates, layer)
            before = _cos(fedit[kb].to(F64) @ fedit[ka].to(F64), ideal)
            after = _cos(fair[kb].to(F64) @ fair[ka].to(F64), ideal)
            assert after > before + 1e-3
            db = fair[kb].to(F64) - fedit[kb].to(F64)
            assert _dense_loss(db, fedit[kb], fedit[ka], ideal, lam) <= 1 - before + 1e-7
            torch.testing.assert_close(fair[ka], fedit[ka], atol=0, rtol=0)  # A_g is the plain weighted mean


def test_without_penalty_reaches_the_best_cosine_in_the_row_space_of_a_bar() -> None:
    updates = _updates(torch.Generator().manual_seed(2))
    fair, _ = _run(updates, fair_lambda=0.0, fair_steps=500)
    for layer in SHAPES:
        a = fair[naming.key(layer, "A")].to(F64)
        ideal = _ideal(updates, layer)
        best = _cos(ideal @ a.T @ torch.linalg.solve(a @ a.T, a), ideal)  # projection onto rows of A_bar
        assert _cos(fair[naming.key(layer, "B")].to(F64) @ a, ideal) > best - 1e-4


def test_a_terrible_step_size_still_never_worsens_the_loss() -> None:
    updates = _updates(torch.Generator().manual_seed(3))
    fair, fedit = _run(updates, fair_lr=100.0, fair_steps=20)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        ideal = _ideal(updates, layer)
        db = fair[kb].to(F64) - fedit[kb].to(F64)
        at_zero = _dense_loss(torch.zeros_like(db), fedit[kb], fedit[ka], ideal, 0.01)
        assert _dense_loss(db, fedit[kb], fedit[ka], ideal, 0.01) <= at_zero + 1e-7


def test_identical_clients_need_no_correction() -> None:
    one = _updates(torch.Generator().manual_seed(4))[0].tensors
    same = [
        ClientUpdate(client_id=i, tensors=one, num_examples=n, rank=RANK) for i, n in enumerate(NUM_EXAMPLES)
    ]
    fair, fedit = _run(same, fair_lambda=0.0)
    for name in fair:
        assert torch.equal(fair[name], fedit[name])


def test_zero_ideal_update_needs_no_correction() -> None:
    fair, fedit = _run(_updates(torch.Generator().manual_seed(5), zero_b=True))
    for layer in SHAPES:
        assert torch.all(fair[naming.key(layer, "B")] == 0)
        assert torch.equal(fair[naming.key(layer, "A")], fedit[naming.key(layer, "A")])


def test_huge_penalty_gives_fedit() -> None:
    updates = _updates(torch.Generator().manual_seed(6))
    fair, fedit = _run(updates, fair_lambda=1e6)
    for name in fair:
        assert torch.equal(fair[name], fedit[name])
