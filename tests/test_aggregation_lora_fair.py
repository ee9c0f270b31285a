"""LoRA-FAIR: the server residual dB moves (B_bar + dB) A_bar towards sum p_k B_k A_k, never away."""

from __future__ import annotations

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator, lora_fair
from fedlora.aggregation.linalg import stacked_gram_trace
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


# -- the fast paths against a straightforward reference ------------------------------------------------------------
# _reference_fair is the method written plainly: dense float64 dW = sum p_k B_k A_k, P = dW A_bar^T, the restricted
# coordinates Q of [B_bar, P], and Adam run layer by layer, as the implementation before the tiled Grams did.


def _reference_fair(updates: list[ClientUpdate], lam=0.01, steps=200, lr=1e-2) -> dict[str, torch.Tensor]:
    total = sum(u.num_examples for u in updates)
    p = [u.num_examples / total for u in updates]
    out = {}
    for layer in naming.layers_of(updates[0].tensors):
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        a_bar, b_bar = torch.zeros_like(updates[0].tensors[ka]), torch.zeros_like(updates[0].tensors[kb])
        for pk, u in zip(p, updates, strict=True):  # float32, as Aggregator.weighted_mean
            a_bar += pk * u.tensors[ka]
            b_bar += pk * u.tensors[kb]
        ideal = sum(pk * u.tensors[kb].to(F64) @ u.tensors[ka].to(F64) for pk, u in zip(p, updates, strict=True))
        bound = sum(pk * float(u.tensors[kb].norm() * u.tensors[ka].norm()) for pk, u in zip(p, updates, strict=True))
        b64, a64 = b_bar.to(F64), a_bar.to(F64)
        norm = float(ideal.norm())
        if norm <= 1e-6 * bound:
            out[kb] = b_bar
            continue
        q, _ = torch.linalg.qr(torch.cat([b64, ideal @ a64.T], dim=1), mode="reduced")
        zb, zp, c = q.T @ b64, q.T @ ideal @ a64.T, a64 @ a64.T
        step_lr = lr * max(float(zb.pow(2).mean().sqrt()), 1e-12)
        z, m, v = torch.zeros_like(zb), torch.zeros_like(zb), torch.zeros_like(zb)
        best_z, best, prev = z.clone(), float("inf"), float("nan")
        for step in range(steps + 1):
            bt = zb + z
            inner, xx, zn = float((zp * bt).sum()), float((bt @ c * bt).sum()), float(z.norm())
            denom = norm * xx**0.5
            value = 1 - inner / denom + lam * zn
            if value < best:
                best_z, best = z.clone(), value
            if (step == 0 and value < 1e-12) or abs(prev - value) < 1e-9 or step == steps:
                break
            prev = value
            grad = (inner / xx) * (bt @ c) / denom - zp / denom + (lam * z / zn if zn > 0 else 0)
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            z = z - step_lr / (1 - 0.9 ** (step + 1)) * m / ((v / (1 - 0.999 ** (step + 1))).sqrt() + 1e-8)
        out[kb] = (b64 + q @ best_z).to(torch.float32)
    return out


def _clients(seed: int, k: int, shapes: dict[str, tuple[int, int]], rank: int, drift: float | None = None):
    """k clients with distinct example counts; drift=None: independent factors, else a shared pair plus drift."""
    gen = torch.Generator().manual_seed(seed)
    shared = {layer: (torch.randn(rank, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, rank, generator=gen))
              for layer, (d_out, d_in) in shapes.items()}
    out = []
    for cid in range(k):
        t = {}
        for layer, (d_out, d_in) in shapes.items():
            a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            b = torch.randn(d_out, rank, generator=gen)
            if drift is not None:
                a, b = shared[layer][0] + drift * a, shared[layer][1] + drift * b
            t[naming.key(layer, "A")], t[naming.key(layer, "B")] = a, 0.1 * b
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=5 + 7 * cid, rank=rank))
    return out


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.to(F64) - y.to(F64)).norm() / y.to(F64).norm())


@pytest.mark.parametrize("tiles", [None, {"float32": 12, "float64": 12, "bf16": 8}])
@pytest.mark.parametrize("drift", [None, 0.05, 0.5])
@pytest.mark.parametrize("norm", ["float32", "float64"])
def test_fast_paths_equal_the_reference(monkeypatch, norm, drift, tiles) -> None:
    """The default float32 and the float64 path give the reference's B_g (and A_g = FedIT's) to 1e-5, with many
    clients (m = K r > the tile, so the tiled Gram runs) and, with small tiles, many tiles per layer."""
    if tiles:
        monkeypatch.setattr(lora_fair, "_TILE", tiles)
    shapes = {"enc.0.q": (48, 40), "enc.1.v": (40, 56)}
    updates = _clients(10, 70, shapes, rank=4, drift=drift)
    cfg = AggregatorConfig(rank=4)
    fair = get_aggregator("lora_fair", cfg, fair_norm=norm).aggregate(_state_for(updates), updates)
    fedit = get_aggregator("fedit", cfg).aggregate(_state_for(updates), updates)
    ref = _reference_fair(updates)
    for layer in shapes:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        assert torch.equal(fair[ka], fedit[ka])
        assert _rel(fair[kb], ref[kb]) < 1e-5
        if torch.equal(ref[kb], fedit[kb]):  # nothing worth its penalty to correct (nearly agreeing clients)
            assert torch.equal(fair[kb], fedit[kb])
        else:  # the correction itself, not just B_bar
            assert _rel(fair[kb] - fedit[kb], ref[kb] - fedit[kb]) < 1e-4


def _state_for(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(t) for n, t in updates[0].tensors.items()}


@pytest.mark.parametrize("norm", ["float32", "float64", "bf16"])
def test_centred_terms_equal_the_dense_ones(norm) -> None:
    """P and ||dW||^2 from centred_terms against dense float64, for independent and for nearly agreeing clients;
    float32's errors are relative to the drift, so nearly agreeing clients get float64 accuracy."""
    shapes = {"l": (64, 48)}
    ka, kb = naming.key("l", "A"), naming.key("l", "B")
    # independent clients: float32 ~1e-8 of ||dW||^2; drift 1e-4 of the shared factors: float64-like
    for drift, f32_tol in ((None, 1e-6), (1e-4, 1e-11)):
        updates = _clients(11, 40, shapes, rank=4, drift=drift)
        p = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]
        a_s, b_s = [u.tensors[ka] for u in updates], [u.tensors[kb] for u in updates]
        a_bar = sum(pk * a for pk, a in zip(p, a_s, strict=True))
        b_bar = sum(pk * b for pk, b in zip(p, b_s, strict=True))
        ideal = sum(pk * b.to(F64) @ a.to(F64) for pk, a, b in zip(p, a_s, b_s, strict=True))
        ww = float(ideal.square().sum())
        terms = lora_fair.centred_terms(a_bar, b_bar, a_s, b_s, p, norm)
        tol = 1e-12 if norm == "float64" else f32_tol
        assert abs(terms.ww - ww) <= tol * ww + terms.deviation  # deviation: the bf16 tiles' estimated error
        assert terms.deviation < 1e-3 * ww
        assert _rel(terms.p_mat, ideal @ a_bar.to(F64).T) < max(tol, 1e-12)


def test_cancelling_clients_take_the_float64_path(monkeypatch) -> None:
    """Clients whose updates cancel ((b, a), (-b, -a), (b, -a), (-b, a), one A nudged): ||dW|| is ~1e-4 of its
    parts, whose float32 errors would swamp it, so the layer is redone from the raw factors in float64."""
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(4, 40, generator=gen) / 40**0.5, torch.randn(48, 4, generator=gen)
    nudge = 1e-4 * torch.randn(4, 40, generator=gen) / 40**0.5
    a_s, b_s, p = [a + nudge, -a, -a, a], [b, -b, b, -b], [0.25] * 4
    calls = []
    real = lora_fair.direct_terms
    monkeypatch.setattr(lora_fair, "direct_terms", lambda *args: calls.append(1) or real(*args))
    a_bar = sum(pk * x for pk, x in zip(p, a_s, strict=True))
    b_bar = sum(pk * x for pk, x in zip(p, b_s, strict=True))
    ideal = float(sum(pk * y.to(F64) @ x.to(F64) for pk, x, y in zip(p, a_s, b_s, strict=True)).norm())
    for norm in ("float32", "bf16"):
        obj = FairObjective(a_bar, b_bar, a_s, b_s, p, lam=0.01, norm=norm)
        assert obj.ideal_norm == pytest.approx(ideal, rel=1e-6)  # what float64 Grams give at this cancellation
        assert obj.norm_deviation == 0.0
    assert calls == [1, 1]
    FairObjective(a_bar, b_bar, a_s, b_s, p, lam=0.01, norm="float64")  # float64 needs no second pass
    assert calls == [1, 1]


@pytest.mark.parametrize("norm", ["float32", "bf16"])
def test_factored_objective_matches_dense_in_lower_precision(norm) -> None:
    """test_factored_objective_matches_dense for the aggregator's float32 default and bf16: the same closed forms,
    to the precision of the GEMMs (relative 1e-6 of the loss; bf16 within its reported deviation)."""
    gen = torch.Generator().manual_seed(0)
    updates = _updates(gen)
    fedit = get_aggregator("fedit", AggregatorConfig(rank=RANK)).aggregate(_state(), updates)
    for layer, (d_out, _) in SHAPES.items():
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        obj = FairObjective(fedit[ka], fedit[kb], [u.tensors[ka] for u in updates],
                            [u.tensors[kb] for u in updates], _p(), lam=0.3, norm=norm)
        db = 0.05 * torch.randn(d_out, RANK, generator=gen, dtype=F64)
        dense = _dense_loss(db, fedit[kb], fedit[ka], _ideal(updates, layer), 0.3)
        assert abs(obj(db) - dense) <= 1e-6 * abs(dense) + obj.norm_deviation


def test_bf16_reports_a_deviation_that_covers_the_error(monkeypatch) -> None:
    """fair_norm=bf16: norm_report holds each layer's estimated relative deviation of ||dW||; it covers the actual
    deviation of the norm, and the result stays close to the reference."""
    monkeypatch.setattr(lora_fair, "_TILE", {"float32": 256, "float64": 256, "bf16": 16})
    shapes = {"enc.0.q": (96, 80), "enc.1.v": (64, 72)}
    updates = _clients(13, 60, shapes, rank=4)
    agg = get_aggregator("lora_fair", AggregatorConfig(rank=4), fair_norm="bf16")
    fair = agg.aggregate(_state_for(updates), updates)
    ref = _reference_fair(updates)
    report = agg.norm_report
    assert report["norm"] == "bf16" and set(report["deviation"]) == set(shapes)
    assert 0 < report["max_deviation"] == max(report["deviation"].values()) < 1e-3
    total = sum(u.num_examples for u in updates)
    p = [u.num_examples / total for u in updates]
    for layer in shapes:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        a_s, b_s = [u.tensors[ka] for u in updates], [u.tensors[kb] for u in updates]
        a_bar = sum(pk * a for pk, a in zip(p, a_s, strict=True))
        b_bar = sum(pk * b for pk, b in zip(p, b_s, strict=True))
        obj = FairObjective(a_bar, b_bar, a_s, b_s, p, 0.01, norm="bf16")
        exact = float(sum(pk * b.to(F64) @ a.to(F64) for pk, a, b in zip(p, a_s, b_s, strict=True)).norm())
        assert abs(obj.ideal_norm - exact) / exact <= obj.norm_deviation
        assert _rel(fair[kb], ref[kb]) < 1e-4


def test_exact_norms_report_no_deviation_and_unknown_norms_fail() -> None:
    updates = _updates(torch.Generator().manual_seed(7))
    agg = get_aggregator("lora_fair", AggregatorConfig(rank=RANK))
    agg.aggregate(_state(), updates)
    assert agg.options.fair_norm == "float32"
    assert agg.norm_report["max_deviation"] == 0.0
    with pytest.raises(ValueError, match="fair-norm"):
        get_aggregator("lora_fair", AggregatorConfig(rank=RANK), fair_norm="fp16")


def test_stacked_gram_trace_matches_dense() -> None:
    """||L^T R||_F^2 by upper tiles equals the dense value (float64 exactly, float32 to GEMM precision); `within`
    is the same-group part; the bf16 estimate of its deviation covers the actual error."""
    gen = torch.Generator().manual_seed(14)
    # 31 groups of 3 rows: an odd count, so the last block holds a group without a partner to sample
    left, right = torch.randn(93, 33, generator=gen, dtype=F64), torch.randn(93, 47, generator=gen, dtype=F64)
    dense = float((left.T @ right).square().sum())
    within = sum(float((left[i:i + 3].T @ right[i:i + 3]).square().sum()) for i in range(0, 93, 3))
    for tile in (3, 12, 30, 256):
        got = stacked_gram_trace(left, right, group=3, tile=tile)
        assert got.value == pytest.approx(dense, rel=1e-12)
        assert got.within == pytest.approx(within, rel=1e-12)
        assert got.deviation == 0.0
        low = stacked_gram_trace(left.float(), right.float(), group=3, tile=tile)
        assert low.value == pytest.approx(dense, rel=1e-5)
        fast = stacked_gram_trace(left.float(), right.float(), group=3, fast=True, tile=tile)
        assert abs(fast.value - dense) <= fast.deviation + 1e-5 * dense
        assert fast.within == pytest.approx(within, rel=1e-5)
