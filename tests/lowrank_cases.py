"""Random client updates of heterogeneous ranks, and the dense ideal update they imply (test oracle)."""

from __future__ import annotations

import torch

from fedlora import naming
from fedlora.aggregation import ClientUpdate

SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}
HEAD = "classifier.weight"
ALPHA = 16.0
F64 = torch.float64


def random_updates(gen: torch.Generator, ranks=(2, 4, 8), num_examples=(10, 30, 5)) -> list[ClientUpdate]:
    out = []
    for cid, (r, n) in enumerate(zip(ranks, num_examples, strict=True)):
        t = {HEAD: torch.randn(3, 16, generator=gen)}
        for layer, (d_out, d_in) in SHAPES.items():
            t[naming.key(layer, "A")] = torch.randn(r, d_in, generator=gen) / d_in**0.5
            t[naming.key(layer, "B")] = torch.randn(d_out, r, generator=gen) * 0.1
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=n, rank=r))
    return out


def ideal_update(updates: list[ClientUpdate], layer: str) -> torch.Tensor:
    """Dense sum_k p_k s_k B_k A_k in float64 (p_k = n_k / n, s_k = ALPHA / r_k)."""
    total = sum(u.num_examples for u in updates)
    ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
    return sum(
        (u.num_examples / total) * (ALPHA / u.rank) * u.tensors[kb].to(F64) @ u.tensors[ka].to(F64)
        for u in updates
    )
