"""FedEx-LoRA: FedIT's averages of A and B, plus the residual folded into the frozen base, so the global model is
exact (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models", ACL 2025; docs/algorithms.md section 14).

Clients train A and B from the global ones, on a base ``W0 + MB @ MA`` (the residual folded so far). With
``A_bar = sum_k p_k A_k``, ``B_bar = sum_k p_k B_k`` and one scaling s, a round's residual is

    sum_k p_k s B_k A_k - s B_bar A_bar = sum_k p_k s (B_k - B_bar)(A_k - A_bar)
                                        = sum_{k<K} p_k s (B_k - B_bar)(A_k - A_K)

(the centred form because sum_k p_k (B_k - B_bar) = 0; that identity also lets client K's term be absorbed into
the others'), so the new global model ``W0 + MB' MA' + s B_bar A_bar`` equals the old base plus the ideal
``sum_k p_k s B_k A_k``. The paper's code adds the residual to W0 as a dense (d_out, d_in) matrix; here it is
appended as thin factors, rows ``p_k s (A_k - A_K)`` to MA and columns ``B_k - B_bar`` to MB: (K - 1) r per round,
never a (d_out, d_in) matrix. MA/MB grow like FLoRA's (``stacked``: the delta downlink sends a node only the new
rows and columns) and are recompressed, product unchanged, once wider than min(d_out, d_in).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register
from fedlora.aggregation.linalg import recompress


@register
class FedExLoRA(Aggregator):
    name = "fedex_lora"
    mode = "lora"
    uploads = ("A", "B")
    stacked = True

    def init_state(self, init: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The fresh adapters and head (float32), and an empty residual per layer: MA (0, d_in), MB (d_out, 0)."""
        out = super().init_state(init)
        for layer, (d_out, d_in) in self.layer_dims(init).items():
            out[naming.key(layer, "MA")] = torch.zeros(0, d_in)
            out[naming.key(layer, "MB")] = torch.zeros(d_out, 0)
        return out

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer, (d_out, d_in) in self.layer_dims(state).items():
            ka, kb, kma, kmb = (naming.key(layer, role) for role in ("A", "B", "MA", "MB"))
            r = state[ka].shape[0]
            for u in updates:
                a, b = u.tensors[ka], u.tensors[kb]
                if a.shape != (r, d_in) or b.shape != (d_out, r):
                    raise ValueError(f"client {u.client_id} sent {ka} {tuple(a.shape)} and {kb} {tuple(b.shape)}; "
                                     f"expected ({r}, {d_in}) and ({d_out}, {r})")
            a_bar = self.weighted_mean([u.tensors[ka] for u in updates], p)
            b_bar = self.weighted_mean([u.tensors[kb] for u in updates], p)
            old_a, old_b = state[kma].to(torch.float32), state[kmb].to(torch.float32)
            m, k = old_a.shape[0], len(updates) - 1
            # Written in place into the widened factors: no per-client temporaries at 100 clients x 64 layers.
            ma, mb = torch.empty(m + k * r, d_in), torch.empty(d_out, m + k * r)
            ma[:m], mb[:, :m] = old_a, old_b
            a_last = updates[-1].tensors[ka].to(torch.float32)
            s = self.config.scaling(r)
            for j, (u, pk) in enumerate(zip(updates[:-1], p[:-1], strict=True)):
                cut = slice(m + j * r, m + (j + 1) * r)
                torch.sub(u.tensors[ka].to(torch.float32), a_last, out=ma[cut]).mul_(pk * s)
                torch.sub(u.tensors[kb].to(torch.float32), b_bar, out=mb[:, cut])
            if ma.shape[0] > min(d_out, d_in):
                mb, ma = recompress(mb, ma)
            out[ka], out[kb], out[kma], out[kmb] = a_bar, b_bar, ma, mb
        return OrderedDict((name, out[name]) for name in state)
