"""FedSA-LoRA: share A, keep B personal (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025).

The paper's finding: under non-IID data the learned A matrices of different clients agree (general knowledge), the
B matrices do not (client-specific knowledge). So clients train A and B as in FedIT, upload only A (and the head),
the server averages A (``A_g = sum_k p_k A_k``) and each client keeps its own B_k across rounds. Client k's model is
W0 + s B_k A_g: personalised, and with half of FedIT's uplink. docs/algorithms.md section 16.

There is no global model in the FedIT sense: the server keeps the initial B (zero) beside A_g, so its own evaluation
measures W0 + s 0 A_g + head, i.e. the shared head on the base, what a new client starts from. The metric that
matters is each client's accuracy on its own test split with its own B: federated evaluation (fraction-evaluate >
0) reports it per client (``client_accuracy`` in metrics.jsonl) and its unweighted mean.

Where B lives: the node's ``context.state`` (simulation and deployment, for the run), and, with
``method.fedsa-state-dir`` set, a safetensors file per partition written atomically each round, so a restarted
SuperNode keeps its B. A client without either starts from B = 0, LoRA's initialisation.

The head (``adapter.head``) is shared and averaged, as for every fedlora method: the paper shares what is not B.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register


@dataclass
class FedSAOptions:
    fedsa_state_dir: str = ""  # each client's B survives SuperNode restarts here ('' = context state only)

    def validate(self) -> None:
        """Nothing to check before start-up: the folder is created by the client that writes to it."""


@register
class FedSALoRA(Aggregator):
    name = "fedsa_lora"
    mode = "lora"
    uploads = ("A",)
    personal = ("B",)
    linear = True
    Options = FedSAOptions

    def client_payload(self, state: dict[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
        """A_g and the head: B is each client's own and never sent."""
        self.check_rank(rank)
        return OrderedDict((n, t) for n, t in state.items() if (s := naming.split(n)) is None or s[1] != "B")

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer in naming.layers_of(state):
            a, b = naming.key(layer, "A"), naming.key(layer, "B")
            out[a] = self.weighted_mean([u.tensors[a] for u in updates], p)
            out[b] = state[b].to(torch.float32).clone()  # the initial B: a new client's start, the server's eval
        return out
