"""What one client does in a round, independent of Flower: build the adapted model from the received
payload, train on its own partition, and return only the tensors its method uploads."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedlora.accel import autocast, metered, to_device
from fedlora.adapters import adapter_state, load_adapter_state, reset_adapters, set_trainable
from fedlora.aggregation import Aggregator
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.privacy import BudgetExhausted, get_privacy_mode
from fedlora.tasks import get_task

__all__ = ["BudgetExhausted", "ClientResult", "evaluate_client", "fit", "round_seed"]


@dataclass
class ClientResult:
    tensors: OrderedDict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    privacy_state: dict | None = None  # the client's privacy state after this round (e.g. its DP accountant)
    personal: OrderedDict[str, torch.Tensor] | None = None  # tensors the client keeps (Aggregator.personal)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible seed per (run seed, round, client) for batch order, dropout and fresh adapters."""
    return (seed * 1_000_003 + server_round * 9_973 + partition_id) % (2**31 - 1)


def fit(
    cfg: FedLoraConfig,
    payload: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
    aggregator: Aggregator | None = None,
    privacy_state: dict | None = None,
) -> ClientResult:
    """One round of local training: the task gives the data and the model, the privacy mode trains it, the
    method says what goes back. ``payload`` = everything the method sends this client (frozen factors included,
    from the client's cache if the server did not resend them). Raises BudgetExhausted (privacy budget spent)."""
    t0 = time.perf_counter()
    task, agg, privacy = get_task(cfg), aggregator or make_aggregator(cfg), get_privacy_mode(cfg)
    rank, seed = cfg.adapter.rank_for(partition_id), round_seed(cfg.run.seed, server_round, partition_id)
    model = task.build_model(agg.mode, rank)
    if agg.fresh_each_round:
        reset_adapters(model, torch.Generator().manual_seed(seed))
    load_adapter_state(model, payload)
    data = to_device(task.training_inputs(model, task.client_data("train", partition_id, num_partitions)), task.device)
    set_trainable(model, agg.trainable(server_round))  # the mode's factors, or this round's (RoLoRA alternates)
    with metered(task.device) as usage:
        metrics, privacy_state = privacy.client_train(task, model, data, seed, privacy_state)
    metrics.update(rank=float(rank), fit_seconds=time.perf_counter() - t0, **usage.metrics())
    personal = adapter_state(model, roles=agg.personal, extras=False) if agg.personal else None
    return ClientResult(adapter_state(model, roles=agg.round_uploads(server_round), extras=True), data[0], metrics,
                        privacy_state, personal)


def evaluate_client(
    cfg: FedLoraConfig, payload: dict[str, torch.Tensor], partition_id: int, num_partitions: int,
    aggregator: Aggregator | None = None,
) -> ClientResult:
    """Federated evaluation: the global adapter (with the client's own tensors where the method keeps some:
    its personalised model) on this client's share of the test split."""
    task, agg = get_task(cfg), aggregator or make_aggregator(cfg)
    # The global adapter has the global rank (FLoRA's payload holds only merged factors: any rank works).
    model = task.build_model(agg.mode, cfg.adapter.rank)
    load_adapter_state(model, payload)
    n, enc, targets = to_device(task.client_data("test", partition_id, num_partitions), task.device)
    with autocast(task.device, cfg.train.precision):
        return ClientResult(OrderedDict(), n, task.evaluate(model, enc, targets))
