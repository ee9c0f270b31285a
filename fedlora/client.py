"""What one client does in a round, independent of Flower: build the adapted model from the received
payload, train on its own partition, and return only the tensors its method uploads."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedlora.adapters import adapter_state, load_adapter_state, reset_adapters
from fedlora.aggregation import Aggregator
from fedlora.config import FedLoraConfig
from fedlora.task import build_model, encoded_client_data, make_aggregator
from fedlora.train import evaluate, train_local


@dataclass
class ClientResult:
    tensors: OrderedDict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible seed per (run seed, round, client) for batch order and fresh adapters."""
    return (seed * 1_000_003 + server_round * 9_973 + partition_id) % (2**31 - 1)


def fit(
    cfg: FedLoraConfig,
    payload: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
    aggregator: Aggregator | None = None,
) -> ClientResult:
    """One round of local training. ``payload`` = everything the method sends this client (frozen factors
    included, from the client's cache if the server did not resend them)."""
    agg = aggregator or make_aggregator(cfg)
    rank = cfg.adapter.rank_for(partition_id)
    t0 = time.perf_counter()
    model = build_model(cfg, agg.mode, rank)
    seed = round_seed(cfg.run.seed, server_round, partition_id)
    if agg.fresh_each_round:
        reset_adapters(model, torch.Generator().manual_seed(seed))
    load_adapter_state(model, payload)
    n, enc, labels = encoded_client_data(cfg, "train", partition_id, num_partitions)
    t = cfg.train
    metrics = train_local(model, enc, labels, t.local_steps, t.batch_size, t.lr, t.weight_decay,
                          t.max_grad_norm, seed=seed)
    upload = adapter_state(model, roles=agg.uploads, extras=True)
    metrics.update(rank=float(rank), fit_seconds=time.perf_counter() - t0)
    return ClientResult(upload, n, metrics)


def evaluate_client(
    cfg: FedLoraConfig, payload: dict[str, torch.Tensor], partition_id: int, num_partitions: int,
    aggregator: Aggregator | None = None,
) -> ClientResult:
    """Federated evaluation: the global adapter on this client's share of the test split."""
    agg = aggregator or make_aggregator(cfg)
    # The global adapter has the global rank (FLoRA's payload holds only merged factors: any rank works).
    model = build_model(cfg, agg.mode, cfg.adapter.rank)
    load_adapter_state(model, payload)
    n, enc, labels = encoded_client_data(cfg, "test", partition_id, num_partitions)
    return ClientResult(OrderedDict(), n, evaluate(model, enc, labels, cfg.train.eval_batch_size))
