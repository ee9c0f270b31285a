"""FLoRA: stack the clients' LoRA factors so the server update is exactly sum_k p_k s_k B_k A_k.

Clients start each round from a fresh adapter of their own rank on top of the merged base. The server
keeps no A/B: it keeps the cumulative merged update in factored form, ``merged_B`` (d_out, m) and
``merged_A`` (m, d_in), with p_k and the scaling s_k folded into A's rows so heterogeneous ranks (and
scalings) mix exactly (docs/algorithms.md section 3). Clients apply ``W = W0 + merged_B @ merged_A``. When m outgrows
min(d_out, d_in) the factors are recompressed without changing their product.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register
from fedlora.aggregation.linalg import recompress


@register
class FLoRA(Aggregator):
    name = "flora"
    mode = "lora"
    uploads = ("A", "B")
    fresh_each_round = True
    heterogeneous_ranks = True
    stacked = True

    def init_state(self, init: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Empty merged factors, (0, d_in) and (d_out, 0), per layer; extras kept as float32."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict(
            (n, t.detach().to(torch.float32).clone()) for n, t in init.items() if naming.is_extra(n)
        )
        for layer, (d_out, d_in) in self.layer_dims(init).items():
            out[naming.key(layer, "MA")] = torch.zeros(0, d_in)
            out[naming.key(layer, "MB")] = torch.zeros(d_out, 0)
        return out

    def client_payload(self, state: dict[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
        """Merged factors + extras: every client, whatever its rank, rebuilds the same merged base."""
        self.check_rank(rank)
        return OrderedDict((n, t) for n, t in state.items() if _is_payload(n))

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer, (d_out, d_in) in self.layer_dims(state).items():
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            rows = [state[naming.key(layer, "MA")].to(torch.float32)]
            cols = [state[naming.key(layer, "MB")].to(torch.float32)]
            for u, pk in zip(updates, p, strict=True):
                a, b = u.tensors[ka], u.tensors[kb]
                if a.shape != (u.rank, d_in) or b.shape != (d_out, u.rank):
                    raise ValueError(
                        f"client {u.client_id} sent {ka} {tuple(a.shape)} and {kb} {tuple(b.shape)} "
                        f"but reports rank {u.rank}; expected ({u.rank}, {d_in}) and ({d_out}, {u.rank})"
                    )
                rows.append(pk * self.config.scaling(u.rank) * a.to(torch.float32))
                cols.append(b.to(torch.float32))
            merged_a, merged_b = torch.cat(rows, dim=0), torch.cat(cols, dim=1)
            if merged_a.shape[0] > min(d_out, d_in):
                merged_b, merged_a = recompress(merged_b, merged_a)
            out[naming.key(layer, "MA")] = merged_a
            out[naming.key(layer, "MB")] = merged_b
        return out


def _is_payload(name: str) -> bool:
    s = naming.split(name)
    return s is None or s[1] in ("MA", "MB")
