"""`fedlora run --ray-address` (fedlora/raycluster.py) without a cluster: the address, the federation config it
leads to, the clients' CPUs and GPUs, and the start-up errors. tests/e2e/test_ray_cluster.py runs on a real one."""

from __future__ import annotations

import argparse
import socket
import time

import pytest

from fedlora import engine, raycluster
from fedlora.cli import check_gpus_per_client, main, ray_address
from fedlora.config import ConfigError
from fedlora.raycluster import RayCluster, check_gpus, check_syntax, cpus_per_client, resolve_address

TWO_NODES = RayCluster("10.0.0.1:6379", (1, 1), (0.0, 0.0))


@pytest.mark.parametrize(("node_cpus", "at_once", "expected"), [
    ((16,), 2, 8), ((2,), 2, 1), ((2,), 4, 1),  # one node: C // at_once, as the local engine
    ((1, 1), 2, 1), ((8, 8), 2, 8), ((8, 3), 2, 4), ((1, 7), 2, 3), ((4, 4, 8), 4, 4),
    ((0, 4), 2, 2),  # a head that runs no tasks (--num-cpus 0)
    ((1, 1), 5, 1),  # more than fit: one CPU each, Flower runs what fits
])
def test_cpus_per_client_fit_the_clients_on_the_nodes(node_cpus, at_once, expected):
    k = cpus_per_client(node_cpus, at_once)
    assert k == expected
    if sum(node_cpus) >= at_once:  # as many fit at once as asked, and one more CPU each would not fit them
        assert sum(c // k for c in node_cpus) >= at_once > sum(c // (k + 1) for c in node_cpus)


def test_federation_config_on_a_cluster_leaves_out_ray_init_cpus():
    """Ray refuses num_cpus when joining a cluster (docs/flower-notes.md note 14)."""
    from flwr.supercore.utils import simulation_config_from_json

    cluster = RayCluster("10.0.0.1:6379", (8, 3), (1.0, 0.0))
    fed = engine.simulation_federation_config(4, 2, cluster=cluster, gpus_per_client=0.5)
    assert fed == {"num-supernodes": 4, "client-resources-num-cpus": 4, "client-resources-num-gpus": 0.5}
    proto = simulation_config_from_json({k.replace("-", "_"): v for k, v in fed.items()})  # what flwr run does
    assert not proto.HasField("init_args_num_cpus") and not proto.HasField("init_args_num_gpus")
    assert proto.client_resources_num_cpus == 4
    assert engine.simulation_federation_config(4, 2, 16)["init-args-num-cpus"] == 16  # a private Ray: as before


def test_clients_on_a_cluster_without_gpus_train_on_the_cpu():
    run = {"train.device": "auto", "adapter.rank": 4}
    assert engine.cluster_run_config(run, TWO_NODES, 0.0) == {"train.device": "cpu", "adapter.rank": 4}
    assert engine.cluster_run_config(run, TWO_NODES, 0.5) is run  # ray gives each client its GPU: auto finds it
    assert engine.cluster_run_config(run, None, 0.0) is run  # a private Ray hides the GPUs itself
    assert engine.cluster_run_config({"train.device": "cpu"}, TWO_NODES, 0.0) == {"train.device": "cpu"}


@pytest.mark.parametrize("address", ["10.0.0.1:6379", "head-node:6379", "[::1]:6379", "auto"])
def test_addresses_ray_accepts(address):
    check_syntax(address)


@pytest.mark.parametrize(("address", "why"), [
    ("foo", "is not HOST:PORT"), ("head:", "is not HOST:PORT"), (":6379", "is not HOST:PORT"),
    ("head:99999", "is not HOST:PORT"), ("head:port", "is not HOST:PORT"),
    ("ray://head:10001", r"Ray Client addresses \(ray://\) are not supported"),
])
def test_malformed_addresses_name_the_flag_and_the_fix(address, why):
    with pytest.raises(ConfigError, match=rf"^--ray-address='{address}'.*{why}.*e\.g\. --ray-address=10\.0\.0\.1:6379"):
        check_syntax(address)


def test_the_flag_wins_over_ray_address_and_local_means_a_private_ray():
    env = {"RAY_ADDRESS": "10.0.0.2:6379"}
    assert resolve_address("10.0.0.1:6379", env) == ("10.0.0.1:6379", "--ray-address")
    assert resolve_address(None, env) == ("10.0.0.2:6379", "RAY_ADDRESS")
    assert resolve_address(None, {}) == (None, "")
    assert resolve_address(None, {"RAY_ADDRESS": " "}) == (None, "")
    assert resolve_address("local", env) == (None, "--ray-address")
    assert resolve_address(None, {"RAY_ADDRESS": "local"}) == (None, "RAY_ADDRESS")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS='nonsense' is not HOST:PORT"):
        resolve_address(None, {"RAY_ADDRESS": "nonsense"})


def test_the_in_process_engine_has_no_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    args = argparse.Namespace(engine="inprocess", ray_address=None)
    assert ray_address(args) == (None, "")  # the variable is ignored there ...
    with pytest.raises(ConfigError, match="--ray-address applies to --engine simulation"):
        ray_address(argparse.Namespace(engine="inprocess", ray_address="10.0.0.1:6379"))  # ... the flag is an error
    assert ray_address(argparse.Namespace(engine="simulation", ray_address=None)) == ("10.0.0.2:6379", "RAY_ADDRESS")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_address_where_nothing_listens_fails_fast_with_the_fix():
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^--ray-address=127\.0\.0\.1:{port}: no Ray head answers there .*"
                                          rf"`ray start --head --port {port}`"):
        raycluster.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < raycluster.TCP_TIMEOUT + 1


def test_run_with_a_bad_address_exits_2_with_one_line_before_anything_starts(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _closed_port()
    for address, why in (("foo", "is not HOST:PORT"), (f"127.0.0.1:{port}", "no Ray head answers there")):
        assert main(["run", "--model", "tiny", "--ray-address", address]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedlora: config error: --ray-address="), err
        assert address in err[0] and why in err[0]
    monkeypatch.setenv("RAY_ADDRESS", "nonsense")  # Ray's variable: the same check, named as such
    assert main(["run", "--model", "tiny"]) == 2
    assert "RAY_ADDRESS='nonsense' is not HOST:PORT" in capsys.readouterr().err


def test_gpus_per_client_on_a_cluster_asks_its_nodes_not_this_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the driver's machine: no GPU
    check_gpus_per_client(0.5, "simulation", on_cluster=True)
    check_gpus(RayCluster("h:1", (8, 8), (0.0, 1.0)), 0.5)
    check_gpus(RayCluster("h:1", (8, 8), (0.0, 2.0)), 2)
    check_gpus(TWO_NODES, 0.0)
    for cluster, fraction in ((TWO_NODES, 0.25), (RayCluster("h:1", (8, 8), (1.0, 1.0)), 2)):
        with pytest.raises(ConfigError, match=rf"^--gpus-per-client {fraction:g}: no node of the Ray cluster .* "
                                              "drop the flag .* `ray start --num-gpus N`"):
            check_gpus(cluster, fraction)


def test_superlink_environment_joins_the_cluster_or_no_cluster(monkeypatch):
    """RAY_ADDRESS reaches flwr-simulation's ray.init through the SuperLink's environment; without a cluster it
    is Ray's `local`, so neither a stray variable nor a `ray start` on this machine (whose address file a plain
    ray.init() joins) turns a private run into a failed join."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    for address, expected in (("10.0.0.1:6379", "10.0.0.1:6379"), (None, "local")):
        link = engine.LocalSuperLink(ray_address=address, hide_gpus=True)
        try:
            env = link.env()
        finally:
            link.stop()
        assert env.get("RAY_ADDRESS") == expected
        assert env["CUDA_VISIBLE_DEVICES"] == ""  # the driver (ServerApp) only; the cluster's workers keep theirs


def test_describe_says_where_and_how_many_at_once():
    line = RayCluster("10.0.0.1:6379", (8, 3), (1.0, 0.0), "RAY_ADDRESS").describe(4)
    assert line == ("Ray cluster at 10.0.0.1:6379 (RAY_ADDRESS): 2 nodes, 11 CPUs, 1 GPUs; 4 CPU(s) per client, "
                    "2 at once")
