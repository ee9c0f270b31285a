"""FlexLoRA (Bai et al., NeurIPS 2024): aggregate the full low-rank update, redistribute its SVD truncations.

Clients of heterogeneous ranks r_k <= r_max (``config.rank`` is r_max, the largest client rank) train a
standard LoRA ``(A_k, B_k)`` and continue from what the server sends them. The server forms the global
update ``dW = sum_k p_k s_k B_k A_k`` (s_k = alpha / r_k, p_k from :meth:`Aggregator.weights`) and keeps its
best rank-r_max approximation as thin SVD factors (docs/algorithms.md sections 8 and 11):

    B_g = U_r S_r   (d_out, r_max),   A_g = Vh_r   (r_max, d_in),   dW_g = B_g A_g   ("scaled" space: no s).

``dW`` is never materialised: :func:`fedlora.aggregation.linalg.thin_svd` factors the stacked
``L = [p_1 s_1 B_1, ..., p_K s_K B_K]`` (d_out, sum r_k) and ``Rt = [A_1; ...; A_K]`` (sum r_k, d_in).
When the stack is wide (many clients) and only r_max directions are kept, a seeded randomized range finder
(:func:`fedlora.aggregation.linalg.randomized_top_svd`) is cheaper; ``options.flex_svd`` picks: "exact",
"randomized", or "auto" (randomized when its flop count is lower, about sum r_k > 5 (r_max + 16)).
When ``dW`` has fewer than r_max triplets (sum r_k < r_max, or a thin layer), B_g gets zero columns and A_g
is completed with orthonormal rows orthogonal to the kept ones (deterministic, seeded by ``config.seed``) so
a client's unused rank directions still receive gradients; A_g keeps orthonormal rows whenever
d_in >= r_max.

A client of rank r_k receives the SVD-ordered truncation with its scaling undone,
``A_k = A_g[:r_k]``, ``B_k = B_g[:, :r_k] / s_{r_k}``, so that ``s_{r_k} B_k A_k = U_{r_k} S_{r_k} Vh_{r_k}``
is the best rank-r_k approximation of dW_g (Eckart-Young). All of S goes into B (FedSVD's split; the
paper's split is UNCONFIRMED), so A_k has orthonormal rows. The payload is a pure function of
(state, rank): a client that gets the whole state can cut it itself.

Choices marked UNCONFIRMED in docs/algorithms.md section 8: p_k = n_k weighting (``config.weighting`` may make
it uniform); the
truncation residual is dropped, never merged into W0. ``init_state`` keeps the injected init: A_g = init A
(not orthonormalised), B_g = 0, i.e. dW_g = 0, so round-0 clients start from a standard PEFT init.
Extras (the head) are averaged with p_k.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedlora import naming
from fedlora.aggregation.base import ClientUpdate, register
from fedlora.aggregation.linalg import randomized_top_svd, thin_svd, top_svd_cost_ratio
from fedlora.aggregation.scaled_global import ScaledGlobalLoRA


@dataclass
class FlexOptions:
    flex_svd: str = field(default="auto", metadata={"help": "FlexLoRA's top-r SVD: exact | randomized | auto "
                                                            "(randomized when cheaper: many clients)"})

    def validate(self) -> None:
        if self.flex_svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"method.flex-svd={self.flex_svd!r} is not valid; use 'auto', 'exact' or 'randomized'")


@register
class FlexLoRA(ScaledGlobalLoRA):
    name = "flexlora"
    Options = FlexOptions

    def use_randomized(self, m: int) -> bool:
        """Randomized top-r_max SVD instead of the exact thin SVD of a stack of width ``m`` (= sum r_k)?"""
        mode = self.options.flex_svd
        if mode == "auto":
            return top_svd_cost_ratio(m, self.config.rank) > 1.0
        return mode == "randomized"

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        r = self.config.rank
        for layer, (d_out, d_in) in self.layer_dims(state).items():
            factors = [self.client_factors(u, layer, d_out, d_in) for u in updates]
            scaled = zip(factors, p, updates, strict=True)
            left = torch.cat([pk * self.config.scaling(u.rank) * b for (_, b), pk, u in scaled], dim=1)
            right = torch.cat([a for a, _ in factors], dim=0)
            if self.use_randomized(left.shape[1]):
                # float32 for the wide products (the uploads are float32), float64 for the small factorisations
                u_, s, vh = randomized_top_svd(left.float(), right.float(), r, seed=self.config.seed)
            else:
                u_, s, vh = thin_svd(left, right, dtype=torch.float64, top=r)
            k = min(r, s.numel())
            b_g = torch.zeros(d_out, r, dtype=torch.float64)
            b_g[:, :k] = u_[:, :k] * s[:k]
            a_g = _complete_rows(vh[:k], r, self.config.seed)
            out[naming.key(layer, "A")] = a_g.to(torch.float32)
            out[naming.key(layer, "B")] = b_g.to(torch.float32)
        return out


def _complete_rows(vh: torch.Tensor, r: int, seed: int) -> torch.Tensor:
    """``vh`` (k, d_in, orthonormal rows) extended to r rows by orthonormal rows orthogonal to it.

    Deterministic (seeded); rows beyond d_in (a layer thinner than r) stay zero.
    """
    k, d_in = vh.shape
    out = torch.zeros(r, d_in, dtype=torch.float64)
    out[:k] = vh
    extra = min(r, d_in) - k
    if extra > 0:
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(d_in, extra, generator=gen, dtype=torch.float64)
        g -= vh.T @ (vh @ g)  # project out the kept directions, then orthonormalise (twice for stability)
        g -= vh.T @ (vh @ g)
        q, _ = torch.linalg.qr(g, mode="reduced")
        out[k : k + extra] = q.T
    return out
