"""FedIT: FedAvg of A and of B (Zhang et al. 2024). Inexact: mean(B) mean(A) != mean(B A)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register


@register
class FedIT(Aggregator):
    name = "fedit"
    mode = "lora"
    uploads = ("A", "B")
    linear = True

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer in naming.layers_of(state):
            for role in ("A", "B"):
                k = naming.key(layer, role)
                out[k] = self.weighted_mean([u.tensors[k] for u in updates], p)
        return out
