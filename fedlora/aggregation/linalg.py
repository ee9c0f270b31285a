"""Thin SVD of a low-rank product ``M = L @ Rt`` without ever forming the (d_out, d_in) matrix.

Aggregators that re-factorise adapters (FedSVD, FLoRA's recompression, FlexLoRA) only ever hold thin
factors. Two reduced QRs and an SVD of an (m, m) core cost O((d_out + d_in) m^2 + m^3) instead of the
O(d_out d_in min(d_out, d_in)) of a dense SVD (docs/algorithms.md section 11). Work happens in float64 so the factored
path is as accurate as the dense one even for float32 weights.

:func:`stacked_gram_trace` is the other primitive: ``||L^T R||_F^2`` of two row stacks through upper-triangular
Gram tiles (LoRA-FAIR's ``||sum_k p_k B_k A_k||_F``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def thin_svd(
    L: torch.Tensor, Rt: torch.Tensor, dtype: torch.dtype = torch.float32, top: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` with ``L @ Rt == U @ diag(S) @ Vh``.

    L: (d_out, m), Rt: (m, d_in). Returns U (d_out, k) with orthonormal columns, S (k,) descending,
    Vh (k, d_in) with orthonormal rows, k = min(m, d_out, d_in). Orthonormality holds even when the
    product is rank deficient (e.g. all zero): the QR factors are orthonormal by construction.
    ``top``: keep only the leading ``top`` triplets (exact truncation); the (d, m) x (m, k) products
    then shrink to k = top columns, which matters when m is large (FlexLoRA: m = sum of client ranks).
    """
    if L.dim() != 2 or Rt.dim() != 2 or L.shape[1] != Rt.shape[0]:
        raise ValueError(
            f"thin_svd needs L (d_out, m) and Rt (m, d_in); got {tuple(L.shape)} and {tuple(Rt.shape)}"
        )
    q_l, r_l = torch.linalg.qr(L.detach().to(torch.float64), mode="reduced")  # (d_out, a), (a, m)
    q_r, r_r = torch.linalg.qr(Rt.detach().to(torch.float64).T, mode="reduced")  # (d_in, b), (b, m)
    u_c, s, vh_c = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)  # core (a, b); k = min(a, b)
    if top is not None:
        u_c, s, vh_c = u_c[:, :top], s[:top], vh_c[:top]
    u = q_l @ u_c
    vh = vh_c @ q_r.T
    return u.to(dtype), s.to(dtype), vh.to(dtype)


def randomized_top_svd(
    L: torch.Tensor, Rt: torch.Tensor, k: int, oversample: int = 16, power_iters: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` SVD triplets of ``L @ Rt`` (float64) by a seeded randomized range finder with subspace
    iteration (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1), never forming the (d_out, d_in) matrix.

    Why: :func:`thin_svd` costs O((d_out + d_in) m^2 + m^3), which dominates when the stack is wide (FlexLoRA
    with 100 clients: m = sum r_k ~ 1,600) but only the top r_max directions are kept. Each pass here applies
    ``L @ Rt`` or its transpose to ``k + oversample`` vectors, O((d_out + d_in) m (k + p)); ``2 q + 2`` passes in
    all. The result is exact up to the range finder's error, which decays like (s_{k+p+1} / s_k)^(2q+1); the
    large products run in the inputs' dtype, the orthonormalisations and the small SVD in float64.
    Deterministic for a given ``seed``.
    """
    d_out, m = L.shape
    d_in = Rt.shape[1]
    width = min(k + oversample, m, d_out, d_in)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(d_in, width, generator=gen, dtype=torch.float64)

    def apply(x: torch.Tensor) -> torch.Tensor:  # (L Rt) x
        return (L @ (Rt @ x.to(Rt.dtype))).to(torch.float64)

    def apply_t(y: torch.Tensor) -> torch.Tensor:  # (L Rt)^T y
        return (Rt.T @ (L.T @ y.to(L.dtype))).to(torch.float64)

    q, _ = torch.linalg.qr(apply(omega), mode="reduced")
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(apply_t(q), mode="reduced")
        q, _ = torch.linalg.qr(apply(z), mode="reduced")
    small = apply_t(q).T  # Q^T (L Rt): (width, d_in)
    u_s, s, vh = torch.linalg.svd(small, full_matrices=False)
    k = min(k, s.numel())
    return q @ u_s[:, :k], s[:k], vh[:k]


def top_svd_cost_ratio(m: int, k: int, oversample: int = 16, power_iters: int = 4) -> float:
    """Rough flop ratio exact (:func:`thin_svd`) / randomized for a stack of width ``m``: > 1 means the
    randomized path is cheaper. Exact: two (d, m) QRs ~ 2 d m^2 each; randomized: 2 q + 2 passes of 2 d m w."""
    width = k + oversample
    return (4 * m * m) / ((2 * power_iters + 2) * 2 * m * width)


def recompress(
    L: torch.Tensor,
    Rt: torch.Tensor,
    tol: float = 1e-12,
    split: str = "left",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortest thin factors ``(L', Rt')`` with ``L' @ Rt' == L @ Rt``.

    Drops singular values ``<= tol * s_max`` (numerical zeros, so the product is unchanged beyond fp error)
    and returns L' (d_out, k'), Rt' (k', d_in), k' <= min(m, d_out, d_in). ``split`` puts the singular
    values into L ("left": Rt' has orthonormal rows, FedSVD's convention) or sqrt(S) on each side ("sqrt").
    """
    if split not in ("left", "sqrt"):
        raise ValueError(f"recompress split={split!r} is not valid; use 'left' or 'sqrt'")
    u, s, vh = thin_svd(L, Rt, dtype=torch.float64)
    keep = int((s > tol * s.max()).sum()) if s.numel() else 0
    u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    if split == "left":
        return (u * s).to(dtype), vh.to(dtype)
    root = s.sqrt()
    return (u * root).to(dtype), (root[:, None] * vh).to(dtype)


def reusable(
    buffers: dict[str, torch.Tensor] | None,
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    stride: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` (and ``stride``, default contiguous) in ``dtype``, kept in ``buffers`` (a
    dict the caller holds across calls with the same shapes, e.g. the layers of one aggregation), fresh when
    ``buffers`` is None. Large fresh tensors cost a page fault per 4 KiB on every call, about as much as one pass of
    arithmetic over them."""
    shape = tuple(shape)
    t = None if buffers is None else buffers.get(key)
    if t is None or t.shape != shape or t.dtype != dtype or (stride is not None and t.stride() != tuple(stride)):
        t = torch.empty(shape, dtype=dtype) if stride is None else torch.empty_strided(shape, stride, dtype=dtype)
        if buffers is not None:
            buffers[key] = t
    return t


def _sum64(x: torch.Tensor) -> float:
    """Sum in float64 (converting first: several times faster than ``x.sum(dtype=torch.float64)`` on CPU)."""
    return float(x.to(torch.float64).sum())


class GramTrace(NamedTuple):
    """What :func:`stacked_gram_trace` returns."""

    value: float  # ||L^T R||_F^2 = sum_ij (L L^T)_ij (R R^T)_ij
    within: float  # the part from pairs of rows in the same group: sum_k ||L_k^T R_k||_F^2
    deviation: float  # fast=True: estimated |error| of value due to the bfloat16 tiles; 0.0 otherwise


def stacked_gram_trace(
    left: torch.Tensor,
    right: torch.Tensor,
    group: int = 1,
    fast: bool = False,
    tile: int = 256,
    buffers: dict[str, torch.Tensor] | None = None,
) -> GramTrace:
    """``||left^T right||_F^2`` for row stacks left (m, d_out), right (m, d_in), by upper-triangular Gram tiles.

    ``sum_ij (left left^T)_ij (right right^T)_ij``, both (m, m) Grams built one block of ``tile`` rows at a time:
    rows i0:i1 against rows i0:m, the diagonal block counted once and the part right of it twice (symmetry), about
    half the multiply-adds of two full Gram GEMMs and never more than (tile, m) of each Gram at once. The GEMMs run
    in the inputs' dtype, every block's products are summed in float64. Rows come in ``group``s of consecutive rows
    (one client's rank-r factors); blocks are cut at group boundaries, so ``within`` (pairs inside a group) is read
    off the diagonal blocks.

    ``fast`` (m a multiple of ``group``): the blocks' GEMMs in bfloat16 (several times float32's speed on CPUs with
    AVX512-BF16 or AMX; CPU tensors), except two kinds of (group, group) tiles, computed in the inputs' dtype by
    batched products: each group against itself (the large same-row products; ``within`` stays exact) and groups
    2j against 2j + 1, pairs of different groups like all the bfloat16 ones, on which the bfloat16 error is
    measured. ``deviation`` extrapolates it to the other bfloat16 pairs: |sampled error sum| x (pairs / sampled
    pairs) + 4 standard deviations of a sum of independent per-pair errors with the sampled spread. An estimate, not
    a bound (the tests check it covers the actual error). Stacks of fewer than two blocks (m < 2 tile) stay in the
    inputs' dtype: they are cheap, and their sample would be small. ``buffers``: see :func:`reusable` (the bfloat16
    copies).
    """
    m = left.shape[0]
    if right.shape[0] != m or left.dim() != 2 or right.dim() != 2:
        raise ValueError(f"stacked_gram_trace needs (m, d) stacks; got {tuple(left.shape)} and {tuple(right.shape)}")
    unit = 2 * group if fast else group  # fast: blocks hold whole pairs of groups
    tile = max(unit, tile // unit * unit)
    fast = fast and m >= 2 * tile and m % group == 0
    total = within = 0.0
    if not fast:
        same = torch.block_diag(*[torch.ones(group, group, dtype=left.dtype)] * (tile // group))  # same group: 1
        for i0 in range(0, m, tile):
            i1 = min(i0 + tile, m)
            n = i1 - i0
            prod = (left[i0:i1] @ left[i0:].T).mul_(right[i0:i1] @ right[i0:].T)
            total += _sum64(prod[:, :n]) + 2 * _sum64(prod[:, n:])
            within += _sum64(prod[:, :n] * same[:n, :n])
        return GramTrace(total, within, 0.0)
    # Exact (group, group) tiles: every group with itself, and groups 2j with 2j + 1 (the sample).
    l3, r3 = left.view(m // group, group, -1), right.view(m // group, group, -1)
    own = torch.bmm(l3, l3.transpose(1, 2)).mul_(torch.bmm(r3, r3.transpose(1, 2)))
    pairs = (m // group) // 2
    le, lo, re, ro = l3[0:2 * pairs:2], l3[1:2 * pairs:2], r3[0:2 * pairs:2], r3[1:2 * pairs:2]
    pair = torch.bmm(le, lo.transpose(1, 2)).mul_(torch.bmm(re, ro.transpose(1, 2)))
    within = _sum64(own)
    total = within + 2 * _sum64(pair)
    left_h = reusable(buffers, "left_bf16", left.shape, torch.bfloat16, left.stride()).copy_(left)
    right_h = reusable(buffers, "right_bf16", right.shape, torch.bfloat16, right.stride()).copy_(right)
    err_sum = err_sq = 0.0
    sampled = approximated = 0
    for i0 in range(0, m, tile):
        i1 = min(i0 + tile, m)
        n = i1 - i0
        prod = (left_h[i0:i1] @ left_h[i0:].T).to(left.dtype).mul_((right_h[i0:i1] @ right_h[i0:].T).to(left.dtype))
        rs, off = prod.stride(0), prod.storage_offset()
        gn, pn, pi = n // group, n // (2 * group), i0 // (2 * group)
        prod.as_strided((gn, group, group), (group * rs + group, rs, 1), off).zero_()  # own tiles: exact above
        step = (2 * group * rs + 2 * group, rs, 1)
        exact = pair[pi:pi + pn]
        for tiles, ref in ((prod.as_strided((pn, group, group), step, off + group), exact),
                           (prod.as_strided((pn, group, group), step, off + group * rs), exact.transpose(1, 2))):
            err = tiles - ref
            err_sum += _sum64(err)
            err_sq += _sum64(err.square())
            tiles.zero_()  # sampled tiles: exact above
        sampled += 2 * pn * group * group
        total += _sum64(prod[:, :n]) + 2 * _sum64(prod[:, n:])
        approximated += n * n - (gn + 2 * pn) * group * group + 2 * prod[:, n:].numel()
    scale = approximated / sampled
    return GramTrace(total, within, abs(err_sum) * scale + 4 * math.sqrt(2 * err_sq * scale))
