"""Deployment data: a SuperNode with node config ``data-path`` trains and evaluates on its own folder, whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedlora.components import node_data
from fedlora.config import FedLoraConfig
from fedlora.data import builtin_path
from tests.conftest import FAST

TINY = {**FAST, "model.name": "tiny", "train.local-steps": 2}


def write_node_folder(folder: Path, n_train: int, n_test: int | None, offset: int = 0) -> Path:
    """A SuperNode's own data: the first ``n_train`` / ``n_test`` Austen rows after ``offset``, with labels.json
    so that every node (and the server's data.source) shares one label space."""
    src = builtin_path("austen")
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        if n is not None:
            lines = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[offset:offset + n]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(src / "labels.json", folder / "labels.json")
    return folder


def test_data_path_replaces_the_source_and_is_used_whole(tmp_path):
    folder = write_node_folder(tmp_path / "site-a", 30, 5)
    cfg, pid, n = node_data(FedLoraConfig(), {"data-path": str(folder)}, node_id=2**40 + 7)
    assert cfg.data.source == str(folder) and n == 1
    assert pid == (2**40 + 7) % (2**31 - 1)  # seeds / rank come from the node id registration fixed
    assert FedLoraConfig().data.source == "austen"  # the run config itself is untouched
    _, pid, _ = node_data(FedLoraConfig(), {"data-path": str(folder), "partition-id": 3}, node_id=5)
    assert pid == 3


def test_simulation_keeps_partitions():
    cfg, pid, n = node_data(FedLoraConfig(), {"partition-id": 1, "num-partitions": 4}, node_id=5)
    assert (cfg.data.source, pid, n) == ("austen", 1, 4)


def test_node_config_device_replaces_train_device_on_that_node_only():
    cfg, pid, n = node_data(FedLoraConfig(), {"partition-id": 1, "num-partitions": 4, "device": "cuda:1"}, node_id=5)
    assert (cfg.train.device, pid, n) == ("cuda:1", 1, 4)
    assert FedLoraConfig().train.device == "auto"
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="node config device"):
        node_data(FedLoraConfig(), {"partition-id": 1, "num-partitions": 4, "device": "gpu1"}, node_id=5)


@pytest.mark.parametrize("node_config, match", [
    ({"data-path": "/no/such/folder"}, "data-path='/no/such/folder' is not a folder"),
    ({"partition-id": 0}, "num-partitions"),
    ({}, "data-path="),
])
def test_bad_node_config_names_the_key_and_the_flag(node_config, match):
    with pytest.raises(ValueError, match=match) as err:
        node_data(FedLoraConfig(), node_config, node_id=1)
    assert "--node-config" in str(err.value)


def _federation(tmp_path: Path, folders: list[Path], **overrides):
    from client.app import make_client_app
    from fedlora.localgrid import LocalGrid
    from server.app import make_server_app

    cfg = {**TINY, "output-dir": str(tmp_path / "run"), **overrides}
    grid = LocalGrid(make_client_app(cfg), len(folders))
    for ctx, folder in zip(grid.contexts.values(), folders, strict=True):
        ctx.node_config.clear()  # a deployed SuperNode: no partition, only its own folder
        ctx.node_config["data-path"] = str(folder)
    make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return grid, [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_each_node_trains_and_evaluates_on_its_own_folder(tmp_path):
    folders = [write_node_folder(tmp_path / "a", 40, 10), write_node_folder(tmp_path / "b", 64, 14, offset=500)]
    grid, rows = _federation(tmp_path, folders, **{"num-server-rounds": 1, "fraction-evaluate": 1.0})
    train = [r for r in grid.replies if not r.has_error() and "arrays" in r.content]
    evals = [r for r in grid.replies if not r.has_error() and "arrays" not in r.content]
    assert sorted(int(r.content["metrics"]["num-examples"]) for r in train) == [40, 64]
    assert sorted(int(r.content["metrics"]["num-examples"]) for r in evals) == [10, 14]
    assert rows[-1]["round"] == 1


def test_node_without_test_split_says_how_to_fix(tmp_path):
    folders = [write_node_folder(tmp_path / "a", 40, None), write_node_folder(tmp_path / "b", 40, 8)]
    grid, _ = _federation(tmp_path, folders, **{"num-server-rounds": 1, "fraction-evaluate": 1.0})
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    assert len(errors) == 1 and "fraction-evaluate=0" in errors[0] and "data-path" in errors[0]


def test_a_supernodes_target_epsilon_is_its_own_budget():
    from fedlora.components import node_data
    from fedlora.config import ConfigError, FedLoraConfig

    cfg = FedLoraConfig.from_run_config({"privacy.mode": "sample", "privacy.target-epsilon": 8.0,
                                         "privacy.target-epsilons": "1,2"})
    part = {"partition-id": 3, "num-partitions": 4}
    assert node_data(cfg, part, 7)[0].privacy.target_epsilon == 2.0  # entry 3 mod 2 of the per-client list
    own, pid, _ = node_data(cfg, {**part, "target-epsilon": 0.5}, 7)
    assert own.privacy.target_epsilon == 0.5 and pid == 3  # the node's own requirement wins
    assert cfg.privacy.target_epsilon == 8.0  # the run's config is not touched
    for bad in ("-1", "x", 0):
        with pytest.raises(ValueError, match="node config target-epsilon=.* must be a number > 0"):
            node_data(cfg, {**part, "target-epsilon": bad}, 7)
    with pytest.raises(ConfigError, match="privacy.target-epsilons=.*applies to privacy.mode='sample'"):
        FedLoraConfig.from_run_config({"privacy.mode": "client", "privacy.noise-multiplier": 1.0,
                                       "method.weighting": "uniform", "privacy.target-epsilons": "1,2"})
    with pytest.raises(ConfigError, match="privacy.target-epsilons='1,a' must be comma-separated numbers"):
        FedLoraConfig.from_run_config({"privacy.mode": "sample", "privacy.target-epsilons": "1,a"})
