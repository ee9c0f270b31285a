"""RoLoRA (Chen et al. 2025, "Robust federated finetuning of LLMs via alternating optimization of LoRA"): the
factor that trains alternates by round, so averaging it is exact and A keeps learning (docs/algorithms.md
section 15).

Round t (absolute, 1-based: the train message's ``server-round``):
  t odd:  A is frozen and shared (the global A); clients train B_k (d_out, r) and upload it, the server sets
          B' = sum_k p_k B_k and keeps A. Then s B' A = sum_k p_k s B_k A.
  t even: B is frozen and shared; clients train A_k (r, d_in) and upload it, A' = sum_k p_k A_k, B kept.
          Then s B A' = sum_k p_k s B A_k.
Every client multiplies by the same frozen factor, so each round's global update equals the weighted mean of the
clients' s B_k A_k exactly (as FFA-LoRA), with one factor up per round (about half FedIT's uplink), and unlike
FFA-LoRA the subspace A moves. B goes first: with peft's init B = 0 the gradient of A (s B^T dL/dh x^T) is zero,
so an A round first would be wasted (the paper's own order and round count are UNCONFIRMED: docs/algorithms.md
section 15). The task head (extras) trains and is averaged every round, as in
every fedlora method. Clients start every round with a fresh optimizer, so no moments of the other factor carry
over.

``linear``: the new state is a weighted mean of the round's uploads plus the kept factor, so client-level DP,
robust rules and the influence bounds apply to the round's upload set. The round's roles come from
:meth:`trainable`, which the server (validation, ``expected_upload``) and the client (what requires grad, what is
uploaded) both evaluate on the message's ``server-round``; an update carrying the other factor is rejected by
the server's validation, and :meth:`aggregate` itself refuses updates that do not all carry exactly one factor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register


@register
class RoLoRA(Aggregator):
    name = "rolora"
    mode = "lora"
    uploads = ("B", "A")  # B in odd rounds, A in even ones (round_uploads)
    linear = True

    def trainable(self, server_round: int) -> tuple[str, ...]:
        """("B",) in odd rounds, ("A",) in even ones."""
        if server_round < 1:
            raise ValueError(f"RoLoRA: server round {server_round} has no trained factor (rounds start at 1)")
        return ("B",) if server_round % 2 == 1 else ("A",)

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        role = self.uploaded_role(updates)
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer in naming.layers_of(state):
            for r in ("A", "B"):
                k = naming.key(layer, r)
                out[k] = (self.weighted_mean([u.tensors[k] for u in updates], p) if r == role
                          else state[k].to(torch.float32).clone())
        return out

    @staticmethod
    def uploaded_role(updates: Sequence[ClientUpdate]) -> str:
        """The one factor ("A" or "B") every update of the round carries; ValueError otherwise."""
        roles = {frozenset(s[1] for k in u.tensors if (s := naming.split(k))) for u in updates}
        if len(roles) != 1 or len(role := next(iter(roles))) != 1 or not role <= {"A", "B"}:
            raise ValueError(f"RoLoRA: every update of a round must carry the same one factor (B in odd rounds, A "
                             f"in even ones); got {sorted(sorted(r) for r in roles)}")
        return next(iter(role))
