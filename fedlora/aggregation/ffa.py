"""FFA-LoRA: A is random, shared and frozen; clients train B only, so averaging B is exact.

Because every client multiplies by the same A, ``(sum p_k B_k) A == sum p_k (B_k A)``: the inexactness of
FedIT disappears at the price of a fixed random subspace (docs/algorithms.md section 2).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register


@register
class FFALoRA(Aggregator):
    name = "ffa"
    mode = "ffa"
    uploads = ("B",)
    linear = True
    frozen = ("A",)

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer in naming.layers_of(state):
            a, b = naming.key(layer, "A"), naming.key(layer, "B")
            out[a] = state[a].to(torch.float32).clone()
            out[b] = self.weighted_mean([u.tensors[b] for u in updates], p)
        return out
