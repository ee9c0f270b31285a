"""An existing Ray cluster as the backend of ``fedlora run``'s simulation (``--ray-address``, or ``RAY_ADDRESS``).

Flower's Ray backend calls ``ray.init(**init_args)``, and ``RAY_ADDRESS`` in its environment makes that call join
the cluster instead of starting a private Ray; Ray then refuses ``num_cpus`` (docs/flower-notes.md note 14). So
the engine puts the address into its SuperLink's environment and leaves ``init-args-num-cpus`` out. Before anything
starts, :func:`connect` checks the address and reads the nodes' CPUs and GPUs, which size each client's share the
way Flower sizes its actor pool (per node), and fails with one line naming the flag and the fix.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlora.config import ConfigError

ENV = "RAY_ADDRESS"  # Ray's own variable: ray.init, `ray status` and job entrypoints read it
LOCAL = "local"  # Ray's word for "start a private instance": as if no address were given
AUTO = "auto"  # Ray's word for "the latest `ray start` on this machine"
PROBE_TIMEOUT = 60.0  # seconds to import ray and join the cluster in the probe (a loaded 2-core box is slow)
TCP_TIMEOUT = 5.0  # seconds for the head's port to accept a connection
GCS_TIMEOUT = 10  # seconds for ray to reach the GCS behind an open port before it gives up
_RAY_LOG_PREFIX = re.compile(r"^\[[^]]*\] \S+: ")  # "[2026-01-01 10:00:00,000 W 123 123] rpc_client.h:153: "


@dataclass(frozen=True)
class RayCluster:
    """A reachable cluster: its GCS address (what ``RAY_ADDRESS`` gets) and the alive nodes' total CPUs / GPUs."""

    address: str
    node_cpus: tuple[int, ...]
    node_gpus: tuple[float, ...]
    source: str = "--ray-address"  # where the address came from, for messages

    def describe(self, cpus_per_client: int) -> str:
        fit = sum(c // cpus_per_client for c in self.node_cpus)
        return (f"Ray cluster at {self.address} ({self.source}): {len(self.node_cpus)} nodes, "
                f"{sum(self.node_cpus)} CPUs, {sum(self.node_gpus):g} GPUs; {cpus_per_client} CPU(s) per client, "
                f"{fit} at once")


def cpus_per_client(node_cpus: Sequence[int], clients_at_once: int) -> int:
    """The largest whole number of CPUs per client at which ``clients_at_once`` clients fit on the nodes at once,
    counted per node as Flower's actor pool does (a client cannot span nodes); 1 if not even that fits. One node of
    C CPUs gives C // clients_at_once, the local engine's rule."""
    want = max(1, clients_at_once)
    best = 1
    for k in range(1, max(node_cpus, default=1) + 1):
        if sum(c // k for c in node_cpus) >= want:
            best = k
    return best


def resolve_address(flag: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """(address, where it came from): the flag, else a non-empty ``RAY_ADDRESS``; None (a private Ray, as
    without either) for neither or ``local``. Only the syntax is checked here."""
    if flag is not None:
        address, source = flag.strip(), "--ray-address"
    elif environ.get(ENV, "").strip():
        address, source = environ[ENV].strip(), ENV
    else:
        return None, ""
    if address == LOCAL:
        return None, source
    check_syntax(address, source)
    return address, source


def check_syntax(address: str, source: str = "--ray-address") -> None:
    """HOST:PORT of the cluster's head (its GCS, `ray start --head --port`) or ``auto``."""
    fix = f"give the head's HOST:PORT as `ray start --head` printed it, e.g. {source}=10.0.0.1:6379"
    if address == AUTO:
        return
    if "://" in address:
        raise ConfigError(f"{source}={address!r}: Ray Client addresses (ray://) are not supported, Flower's "
                          f"simulation is a Ray driver on a node of the cluster; run fedlora on the head and {fix}")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source}={address!r} is not HOST:PORT; {fix} (or auto, or local for a private Ray)")


def connect(address: str, source: str = "--ray-address", timeout: float = PROBE_TIMEOUT) -> RayCluster:
    """Join the cluster once in a child process (a Ray driver of its own, gone when it exits) and read its nodes.
    A closed port fails in seconds; anything else that is not a reachable cluster fails within ``timeout``."""
    check_syntax(address, source)
    if address != AUTO:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=TCP_TIMEOUT).close()
        except OSError as e:
            raise ConfigError(f"{source}={address}: no Ray head answers there ({e.strerror or e}); start one with "
                              f"`ray start --head --port {port}` or fix the address") from None
    env = {k: v for k, v in os.environ.items() if k != ENV}  # the probe joins `address`, nothing else
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",  # no notices, no FutureWarning
               RAY_gcs_rpc_server_reconnect_timeout_s=str(GCS_TIMEOUT))  # a port that is no GCS: ray exits
    check = f"check it with `ray status --address {address}` on this machine"
    try:
        res = subprocess.run([sys.executable, "-m", "fedlora.raycluster", address], env=env, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{source}={address}: no Ray cluster answered within {timeout:.0f} s; {check}") from None
    try:
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):  # ray ended the probe itself (no GCS there) or it crashed
        lines = [_RAY_LOG_PREFIX.sub("", s) for s in res.stderr.strip().splitlines()]
        why = next((s for s in lines if "Failed to connect to GCS" in s), lines[-1] if lines else "no output")
        raise ConfigError(f"{source}={address}: no Ray cluster answered ({why.strip()}); {check}") from None
    if "error" in info:
        raise ConfigError(f"{source}={address}: could not join the Ray cluster ({info['error']}); run fedlora on "
                          "a node of the cluster, with the ray and Python versions the cluster runs")
    cluster = RayCluster(info["address"], tuple(int(n["cpus"]) for n in info["nodes"]),
                         tuple(float(n["gpus"]) for n in info["nodes"]), source)
    if not any(cluster.node_cpus):
        raise ConfigError(f"{source}={address}: the Ray cluster has no node with a CPU for clients; start the "
                          "workers with `ray start --address ... --num-cpus N`")
    return cluster


def check_gpus(cluster: RayCluster, gpus_per_client: float) -> None:
    """``--gpus-per-client F`` on a cluster: some node must hold F of a GPU (the driver's machine need not)."""
    if gpus_per_client > 0 and not any(g >= gpus_per_client for g in cluster.node_gpus):
        raise ConfigError(f"--gpus-per-client {gpus_per_client:g}: no node of the Ray cluster at {cluster.address} "
                          f"has that much GPU (GPUs per node: {', '.join(f'{g:g}' for g in cluster.node_gpus)}); "
                          "drop the flag to train on the CPUs, or start GPU workers with `ray start --num-gpus N`")


def _probe(address: str) -> dict[str, object]:
    """Run in the child: join, read the alive nodes' resources, leave."""
    import ray

    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as e:  # ConnectionError, version mismatch (RuntimeError), not a node of the cluster ...
        lines = [s for s in str(e).strip().splitlines() if s.strip()] or [""]
        return {"error": f"{type(e).__name__}: {lines[0][:300]}"}
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        gcs = ray.get_runtime_context().gcs_address
        return {"address": gcs, "nodes": [{"cpus": r.get("CPU", 0), "gpus": r.get("GPU", 0)} for r in nodes]}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1])), flush=True)
