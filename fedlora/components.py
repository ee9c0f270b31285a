"""The run's pluggable components resolved from the config (the method, with its own options) and a node's data.

Server and clients derive everything from the run config and the seed, so the server and every client build
the same base model, the same head init and the same partitions without talking to each other. The task
(:func:`fedlora.tasks.get_task`) and the privacy mode (:func:`fedlora.privacy.get_privacy_mode`) are resolved
the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedlora.aggregation import Aggregator, AggregatorConfig, aggregator_class
from fedlora.config import FedLoraConfig, device_spec_ok


def make_aggregator(cfg: FedLoraConfig) -> Aggregator:
    """The configured method with the shared knobs and its own ``method.*`` options (validated with the config)."""
    cls = aggregator_class(cfg.method.name)
    options = cls.Options(**{f.name: getattr(cfg.method, f.name) for f in dataclasses.fields(cls.Options)})
    shared = AggregatorConfig(rank=cfg.adapter.rank, alpha=cfg.adapter.alpha, seed=cfg.run.seed,
                              weighting=cfg.method.weighting)
    return cls(shared, options)


def node_data(cfg: FedLoraConfig, node_config: Mapping[str, Any], node_id: int) -> tuple[FedLoraConfig, int, int]:
    """(config, partition id, number of partitions) of a client, from its SuperNode's node config, with the
    client's own privacy budget (:func:`with_budget`)."""
    budget = node_config.get("target-epsilon")
    cfg, pid, n = _node_partition(cfg, {k: v for k, v in node_config.items() if k != "target-epsilon"}, node_id)
    return with_budget(cfg, budget, pid), pid, n


def with_budget(cfg: FedLoraConfig, node_budget: Any, partition_id: int) -> FedLoraConfig:
    """This client's DP-SGD budget as its privacy.target-epsilon: node config ``target-epsilon`` (a SuperNode's
    own requirement), else its entry of privacy.target-epsilons (simulation: partition i takes entry i mod len),
    else the run's. With privacy.noise-multiplier set, each client stops when its own budget is spent; with it 0,
    each client's noise is derived from its own budget (docs/privacy.md)."""
    if node_budget is not None:
        try:
            budget = float(node_budget)
        except (TypeError, ValueError):
            budget = -1.0
        if not budget > 0:
            raise ValueError(f"node config target-epsilon={node_budget!r} must be a number > 0 (this SuperNode's "
                             "DP-SGD budget), e.g. --node-config \"target-epsilon=3.0\"")
    elif cfg.privacy.target_epsilons:
        budget = cfg.privacy.budget_for(partition_id)
    else:
        return cfg
    return replace(cfg, privacy=replace(cfg.privacy, target_epsilon=budget))


def _node_partition(cfg: FedLoraConfig, node_config: Mapping[str, Any], node_id: int
                    ) -> tuple[FedLoraConfig, int, int]:
    """(config, partition id, number of partitions) of a client, from its SuperNode's node config.

    ``data-path`` (deployment): the node trains on all of its own folder (train split; test split for
    evaluation), which replaces ``data.source`` for this client; ``partition-id`` is optional and only seeds the
    client and picks its rank in ``adapter.ranks`` (default: from the node id, which registration fixes).
    Otherwise (simulation, or one shared file) ``partition-id`` / ``num-partitions`` pick a partition of
    ``data.source``. ``device`` (optional, e.g. ``'cuda:1'``) replaces ``train.device`` on this node: several
    SuperNodes on one multi-GPU host each take their own GPU (docs/gpu.md).
    """
    if "device" in node_config:
        device = str(node_config["device"])
        cfg = replace(cfg, train=replace(cfg.train, device=device))
        cfg.check([(device_spec_ok(device), "train.device", "(from node config device) must be auto, cpu, cuda "
                                                            "or cuda:N")])
        node_config = {k: v for k, v in node_config.items() if k != "device"}
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
