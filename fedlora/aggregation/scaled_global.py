"""The global-adapter convention FlexLoRA and HetLoRA share: per-client ranks r_k <= r_max = adapter.rank,
a global LoRA of rank r_max stored in "scaled" space (the global update is B_g A_g, no scaling factor), and
clients served the first r_k rows of A_g / columns of B_g with their own scaling undone."""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate


class ScaledGlobalLoRA(Aggregator):
    """Base of the rank-truncating methods (not registered itself)."""

    mode = "lora"
    uploads = ("A", "B")
    heterogeneous_ranks = True

    def check_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.config.rank:
            raise ValueError(
                f"method {self.name!r} keeps a global adapter of rank adapter.rank={self.config.rank}; "
                f"got client rank {rank}, which must be between 1 and {self.config.rank}"
            )

    def global_scaling(self, state: dict[str, torch.Tensor], layer: str) -> float:
        """The stored B_g A_g is the global update itself (scaled space)."""
        return 1.0

    def init_state(self, init: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Extras as float32; per layer A_g = injected A (r_max, d_in), B_g = 0 (d_out, r_max): dW_g = 0."""
        r = self.config.rank
        out: OrderedDict[str, torch.Tensor] = OrderedDict(
            (n, t.detach().to(torch.float32).clone()) for n, t in init.items() if naming.is_extra(n)
        )
        for layer, (d_out, d_in) in self.layer_dims(init).items():
            a = init[naming.key(layer, "A")].detach().to(torch.float32)
            if a.shape != (r, d_in):
                raise ValueError(
                    f"method {self.name!r} needs the injected {naming.key(layer, 'A')} at adapter.rank={r}, "
                    f"shape ({r}, {d_in}); got {tuple(a.shape)}"
                )
            out[naming.key(layer, "A")] = a.clone()
            out[naming.key(layer, "B")] = torch.zeros(d_out, r)
        return out

    def client_payload(self, state: dict[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
        """Extras + ``A_g[:rank]`` and ``B_g[:, :rank] / s_rank`` for every layer (pure in state and rank)."""
        self.check_rank(rank)
        s = self.config.scaling(rank)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, t in state.items():
            role = naming.split(name)
            if role is None:
                out[name] = t.clone()
            elif role[1] == "A":
                out[name] = t[:rank].clone()
            elif role[1] == "B":
                out[name] = t[:, :rank] / s
        return out

    def client_factors(
        self, u: ClientUpdate, layer: str, d_out: int, d_in: int, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_k, B_k) of one client as ``dtype``, after checking its rank and shapes."""
        self.check_rank(u.rank)
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        a, b = u.tensors[ka], u.tensors[kb]
        if a.shape != (u.rank, d_in) or b.shape != (d_out, u.rank):
            raise ValueError(
                f"client {u.client_id} sent {ka} {tuple(a.shape)} and {kb} {tuple(b.shape)} "
                f"but reports rank {u.rank}; expected ({u.rank}, {d_in}) and ({d_out}, {u.rank})"
            )
        return a.to(dtype), b.to(dtype)
