"""Shared set-up of server and clients: the method, the adapted model, a client's slice of the data.

Both sides derive everything from the run config and the seed, so the server and every client build the
same base model, the same head init and the same partitions without talking to each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.adapters import inject_adapters
from fedlora.aggregation import Aggregator, AggregatorConfig, get_aggregator
from fedlora.config import FedLoraConfig
from fedlora.data import TextDataset, load_dataset, partition
from fedlora.models import load_model, load_tokenizer
from fedlora.train import encode


def make_aggregator(cfg: FedLoraConfig) -> Aggregator:
    agg = get_aggregator(
        cfg.method.name,
        AggregatorConfig(rank=cfg.adapter.rank, alpha=cfg.adapter.alpha, seed=cfg.run.seed,
                         weighting=cfg.method.weighting, fair_lambda=cfg.method.fair_lambda,
                         fair_steps=cfg.method.fair_steps, fair_lr=cfg.method.fair_lr,
                         flex_svd=cfg.method.flex_svd),
    )
    if cfg.adapter.ranks and not agg.heterogeneous_ranks:
        raise ValueError(f"adapter.ranks={cfg.adapter.ranks!r} gives clients different ranks, but method "
                         f"{agg.name!r} needs one rank; use method.name='flora' or clear adapter.ranks")
    if cfg.adapter.ranks and not agg.fresh_each_round:
        top = max(int(r) for r in cfg.adapter.ranks.split(","))
        if top > cfg.adapter.rank:
            raise ValueError(f"adapter.ranks={cfg.adapter.ranks!r} exceeds adapter.rank={cfg.adapter.rank}: method "
                             f"{agg.name!r} keeps a global adapter of rank adapter.rank; set it to >= {top}")
    return agg


@lru_cache(maxsize=4)
def cached_dataset(source: str, split: str) -> TextDataset:
    """One parsed copy per process of each (source, split): clients and server reload it every round."""
    return load_dataset(source, split)


def num_labels(cfg: FedLoraConfig) -> int:
    return cached_dataset(cfg.data.source, "train").num_labels


def build_model(cfg: FedLoraConfig, mode: str, rank: int) -> nn.Module:
    """Base model (seeded head) with adapters of ``mode``/``rank`` on the configured targets."""
    if cfg.model.task == "causal_lm":
        from fedlora.causal_lm.task import base_model

        model = base_model(cfg)
    else:
        model = load_model(cfg.model.name, num_labels(cfg), seed=cfg.run.seed)
    inject_adapters(model, cfg.adapter.targets(), rank=rank, alpha=cfg.adapter.alpha, mode=mode,
                    dropout=cfg.adapter.dropout, head=cfg.adapter.heads())
    return model


def client_dataset(cfg: FedLoraConfig, split: str, partition_id: int, num_partitions: int) -> TextDataset:
    """The examples of ``split`` that the client holding ``partition_id`` owns (same scheme for train/test).

    ``num_partitions == 1`` means the source is not shared: all of it is this client's (a SuperNode's own
    data-path in deployment, see ``node_data``); ``partition_id`` then only seeds the client and picks its rank.
    """
    ds = cached_dataset(cfg.data.source, split)
    if num_partitions == 1:
        return ds
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config partition-id={partition_id} must be in [0, num-partitions={num_partitions})")
    parts = _partitions(cfg.data.source, split, num_partitions, cfg.data.partition, cfg.data.dirichlet_alpha,
                        cfg.run.seed, cfg.data.min_partition_size if split == "train" else 0)
    return ds.subset(parts[partition_id])


@lru_cache(maxsize=16)
def _partitions(source: str, split: str, n: int, scheme: str, alpha: float, seed: int, min_size: int):
    return partition(cached_dataset(source, split).labels, n, scheme=scheme, alpha=alpha, seed=seed,
                     min_partition_size=min_size)


def node_data(cfg: FedLoraConfig, node_config: Mapping[str, Any], node_id: int) -> tuple[FedLoraConfig, int, int]:
    """(config, partition id, number of partitions) of a client, from its SuperNode's node config.

    ``data-path`` (deployment): the node trains on all of its own folder (train split; test split for
    evaluation), which replaces ``data.source`` for this client; ``partition-id`` is optional and only seeds the
    client and picks its rank in ``adapter.ranks`` (default: from the node id, which registration fixes).
    Otherwise (simulation, or one shared file) ``partition-id`` / ``num-partitions`` pick a partition of
    ``data.source``.
    """
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        if not path.is_dir():
            raise ValueError(f"node config data-path={str(path)!r} is not a folder on this SuperNode; start it with "
                             "--node-config \"data-path='/folder/with/train.jsonl'\" (train.jsonl / train.csv, "
                             "optional test.* and labels.json, or a save_to_disk folder)")
        pid = int(node_config.get("partition-id", node_id % (2**31 - 1)))
        return replace(cfg, data=replace(cfg.data, source=str(path))), pid, 1
    try:
        return cfg, int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as e:
        raise ValueError(f"node config lacks {e}; start the SuperNode with --node-config \"data-path='<folder>'\" "
                         "(its own data) or 'partition-id=<i> num-partitions=<n>' (a partition of data.source)"
                         ) from None


def server_dataset(cfg: FedLoraConfig) -> TextDataset:
    """Held-out test examples for the server's global evaluation (a fixed, seeded subset if capped)."""
    ds = cached_dataset(cfg.data.source, "test")
    cap = cfg.data.max_eval_examples
    if cap and len(ds) > cap:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.run.seed))[:cap]
        ds = ds.subset(sorted(idx.tolist()))
    return ds


def encode_dataset(cfg: FedLoraConfig, ds: TextDataset) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tok = _tokenizer(cfg.model.name)
    return encode(tok, ds.texts, cfg.model.max_length), torch.tensor(ds.labels, dtype=torch.long)


_ENCODED: dict[tuple, tuple[int, dict[str, torch.Tensor], torch.Tensor]] = {}


def encoded_client_data(cfg: FedLoraConfig, split: str, partition_id: int, num_partitions: int
                        ) -> tuple[int, dict[str, torch.Tensor], torch.Tensor]:
    """(num examples, token tensors, labels) of a client's split, tokenised once per process.

    A cache of derived, read-only data (not client state): in simulation a ray actor serves many rounds
    and would otherwise re-tokenise its partition every round; in deployment each message is a fresh
    process and simply misses the cache.
    """
    if cfg.model.task == "causal_lm":  # labels = next-token targets (N, T), -100 where no loss is taken
        from fedlora.causal_lm import task as lm_task

        return lm_task.encoded_client_data(cfg, split, partition_id, num_partitions)
    d, m = cfg.data, cfg.model
    key = (d.source, split, partition_id, num_partitions, d.partition, d.dirichlet_alpha, d.min_partition_size,
           cfg.run.seed, m.name, m.max_length)
    if key not in _ENCODED:
        ds = client_dataset(cfg, split, partition_id, num_partitions)
        _ENCODED[key] = (len(ds), *encode_dataset(cfg, ds))
    return _ENCODED[key]


@lru_cache(maxsize=2)
def _tokenizer(name: str):
    return load_tokenizer(name)
