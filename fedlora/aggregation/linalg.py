"""Thin SVD of a low-rank product ``M = L @ Rt`` without ever forming the (d_out, d_in) matrix.

Aggregators that re-factorise adapters (FedSVD, FLoRA's recompression, FlexLoRA) only ever hold thin
factors. Two reduced QRs and an SVD of an (m, m) core cost O((d_out + d_in) m^2 + m^3) instead of the
O(d_out d_in min(d_out, d_in)) of a dense SVD (spec section 11). Work happens in float64 so the factored
path is as accurate as the dense one even for float32 weights.
"""

from __future__ import annotations

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
