"""Thin factored SVD and exact recompression against the dense reference."""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation.linalg import randomized_top_svd, recompress, thin_svd, top_svd_cost_ratio

F64 = torch.float64


def _factors(d_out: int, m: int, d_in: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, m, generator=g, dtype=dtype), torch.randn(m, d_in, generator=g, dtype=dtype)


@pytest.mark.parametrize(("d_out", "m", "d_in"), [(64, 4, 48), (32, 8, 80), (20, 50, 30), (16, 16, 16)])
@pytest.mark.parametrize("in_dtype", [torch.float32, F64])
def test_thin_svd_matches_dense(d_out: int, m: int, d_in: int, in_dtype: torch.dtype) -> None:
    L, Rt = _factors(d_out, m, d_in, seed=d_out + m, dtype=in_dtype)
    dense = L.to(F64) @ Rt.to(F64)
    u, s, vh = thin_svd(L, Rt, dtype=F64)
    k = min(m, d_out, d_in)
    assert u.shape == (d_out, k) and s.shape == (k,) and vh.shape == (k, d_in)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense, atol=1e-10 * dense.abs().max(), rtol=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:k], atol=1e-10 * s.max(), rtol=0)
    assert torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=F64), atol=1e-12, rtol=0)


def test_thin_svd_returns_float32_by_default() -> None:
    u, s, vh = thin_svd(*_factors(12, 3, 10, seed=1, dtype=F64))
    assert u.dtype == s.dtype == vh.dtype == torch.float32


def test_thin_svd_of_zero_product_has_orthonormal_factors() -> None:
    _, Rt = _factors(24, 4, 40, seed=2)
    u, s, vh = thin_svd(torch.zeros(24, 4), Rt, dtype=F64)
    assert torch.all(s == 0)
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(4, dtype=F64), atol=1e-12, rtol=0)


def test_thin_svd_rejects_mismatched_factors() -> None:
    with pytest.raises(ValueError, match="L \\(d_out, m\\)"):
        thin_svd(torch.zeros(5, 3), torch.zeros(4, 6))


@pytest.mark.parametrize("split", ["left", "sqrt"])
def test_recompress_keeps_product_and_bounds_width(split: str) -> None:
    L, Rt = _factors(40, 100, 30, seed=3, dtype=F64)
    L2, Rt2 = recompress(L, Rt, split=split, dtype=F64)
    assert L2.shape == (40, 30) and Rt2.shape == (30, 30)
    dense = L @ Rt
    torch.testing.assert_close(L2 @ Rt2, dense, atol=1e-10 * dense.abs().max(), rtol=0)


def test_recompress_drops_numerically_zero_directions() -> None:
    # width 10 but rank 3: the 7 extra directions are fp noise and must go
    left, right = _factors(40, 3, 30, seed=4, dtype=F64)
    mix = torch.randn(3, 10, generator=torch.Generator().manual_seed(5), dtype=F64)
    L, Rt = left @ mix, torch.linalg.pinv(mix) @ right
    L2, Rt2 = recompress(L, Rt, dtype=F64)
    assert L2.shape == (40, 3) and Rt2.shape == (3, 30)
    torch.testing.assert_close(Rt2 @ Rt2.T, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)  # "left": S in L
    torch.testing.assert_close(L2 @ Rt2, L @ Rt, atol=1e-10 * (L @ Rt).abs().max(), rtol=0)


def test_recompress_of_zero_is_empty() -> None:
    L2, Rt2 = recompress(torch.zeros(8, 5), torch.zeros(5, 6))
    assert L2.shape == (8, 0) and Rt2.shape == (0, 6)
    assert torch.all(L2 @ Rt2 == 0)


def _low_rank(d_out: int, m: int, d_in: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = decay ** torch.arange(m, dtype=torch.float64)
    L = torch.linalg.qr(torch.randn(d_out, m, generator=gen, dtype=torch.float64))[0] * scales
    Rt = torch.linalg.qr(torch.randn(d_in, m, generator=gen, dtype=torch.float64))[0].T
    return L, Rt


def test_thin_svd_top_is_the_leading_part_of_the_full_svd() -> None:
    gen = torch.Generator().manual_seed(3)
    L, Rt = torch.randn(40, 12, generator=gen), torch.randn(12, 30, generator=gen)
    u, s, vh = thin_svd(L, Rt, dtype=torch.float64)
    ut, st, vht = thin_svd(L, Rt, dtype=torch.float64, top=5)
    assert st.shape == (5,) and ut.shape == (40, 5) and vht.shape == (5, 30)
    torch.testing.assert_close((ut * st) @ vht, (u[:, :5] * s[:5]) @ vh[:5], atol=1e-10, rtol=0)


def test_randomized_top_svd_is_exact_on_a_decaying_spectrum() -> None:
    L, Rt = _low_rank(300, 120, 200, decay=0.8, seed=0)
    u, s, vh = randomized_top_svd(L, Rt, k=8)
    ue, se, vhe = thin_svd(L, Rt, dtype=torch.float64, top=8)
    torch.testing.assert_close(s, se, atol=1e-10 * se[0], rtol=0)
    torch.testing.assert_close((u * s) @ vh, (ue * se) @ vhe, atol=1e-9 * se[0], rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)


def test_randomized_top_svd_is_near_optimal_on_a_flat_spectrum_and_deterministic() -> None:
    """Random factors (a flat spectrum, the hard case): the rank-k error is within 2 % of Eckart-Young's."""
    gen = torch.Generator().manual_seed(1)
    L, Rt = torch.randn(256, 160, generator=gen), torch.randn(160, 192, generator=gen)
    dense = (L @ Rt).double()
    u, s, vh = randomized_top_svd(L, Rt, k=16, seed=7)
    optimal = torch.linalg.svdvals(dense)[16:].norm()
    assert (dense - (u * s) @ vh).norm() <= 1.02 * optimal
    again = randomized_top_svd(L, Rt, k=16, seed=7)
    assert all(torch.equal(x, y) for x, y in zip((u, s, vh), again, strict=True))


def test_randomized_top_svd_is_exact_when_the_sketch_covers_the_stack() -> None:
    """width = k + oversample >= m: the sketch spans the whole column space, so nothing is approximated."""
    gen = torch.Generator().manual_seed(2)
    L, Rt = torch.randn(64, 10, generator=gen, dtype=torch.float64), torch.randn(10, 48, generator=gen,
                                                                               dtype=torch.float64)
    u, s, vh = randomized_top_svd(L, Rt, k=4)
    ue, se, vhe = thin_svd(L, Rt, dtype=torch.float64, top=4)
    torch.testing.assert_close((u * s) @ vh, (ue * se) @ vhe, atol=1e-10 * se[0], rtol=0)


def test_cost_ratio_prefers_randomized_only_for_wide_stacks() -> None:
    assert top_svd_cost_ratio(m=48, k=16) < 1 < top_svd_cost_ratio(m=1600, k=16)
