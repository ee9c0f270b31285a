"""`fedlora run --ray-address` on a real two-node Ray cluster on 127.0.0.1: a head and one worker node, each a
`ray start` of its own with one CPU, so the two clients that train at once must run on different nodes.

The cluster is private to the test: its own temporary folder (``--temp-dir``: its address file is written there,
not to /tmp/ray, so no other ``ray.init()`` on the machine joins it) and a marker in its environment that every
process of it inherits (raylets, GCS, workers): teardown stops exactly those, never with a bare ``ray stop``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora import engine
from tests.e2e.test_engine import FLOWER_DAEMONS, QUICK, _fedlora

RAY = str(Path(sys.executable).parent / "ray")

# Where each ClientApp ran, from the cluster's own records: ray.timeline() (public) has one event per executed
# ClientAppActor.run whose task id names its actor; the GCS actor table names each actor's node. ray.util.state
# would say the same, but it needs the dashboard, which the ray that flwr[simulation] installs does not have.
WHERE_CLIENTS_RAN = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="ERROR", log_to_driver=False)
actors = {a: v for a, v in state.actors().items() if v["ActorClassName"] == "ClientAppActor"}
runs = [ray.TaskID.from_hex(e["args"]["task_id"]).actor_id().hex() for e in ray.timeline()
        if e.get("cat") == "task::ClientAppActor.run"]
print(json.dumps({"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                  "actor_nodes": {a: v["Address"]["NodeID"] for a, v in actors.items()},
                  "actor_states": sorted({v["State"] for v in actors.values()}),
                  "runs_per_node": {n: sum(actors[a]["Address"]["NodeID"] == n for a in runs if a in actors)
                                    for n in {v["Address"]["NodeID"] for v in actors.values()}}}))
ray.shutdown()
"""


def _stop(marker: str, grace: float = 2.0) -> set[int]:
    """SIGTERM every process of the cluster, SIGKILL what is left after ``grace`` s (raylet, GCS and the runtime
    env agents take 10 s and more to stop on SIGTERM; the cluster is disposable); returns the survivors."""
    pids = engine.marked_processes(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        engine._signal(pids, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = engine._alive(engine.marked_processes(marker))
        if not pids:
            break
    return engine._alive(engine.marked_processes(marker))


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """HOST:PORT of a head and a worker node on this machine, one CPU each; stopped afterwards, also on failure."""
    marker = f"test-ray-cluster-{uuid.uuid4().hex[:8]}"
    temp_dir = tempfile.mkdtemp(prefix="frc-", dir="/tmp")  # short: ray's Unix sockets live below it (108 bytes)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({engine.MARKER_ENV: marker, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                "RAY_TMPDIR": temp_dir})  # also ray's default temporary folder, for anything not told --temp-dir
    port = engine.free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats"]
    try:
        for cmd in ([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                    [RAY, "start", "--address", address, *common]):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            assert res.returncode == 0, f"{' '.join(cmd[1:3])} failed:\n{(res.stdout + res.stderr)[-2000:]}"
        yield address
    finally:
        left = _stop(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"ray processes of the test cluster left running: {sorted(left)}"


def _flower_daemons() -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace") if d.name.isdigit() else ""
        except OSError:
            continue
        if any(name in cmd for name in FLOWER_DAEMONS):
            out.add(int(d.name))
    return engine._alive(out)


@pytest.mark.slow
def test_run_on_a_two_node_ray_cluster_uses_both_nodes(tmp_path, ray_cluster):
    """About 55 s on the 2-core machine (cluster start 15 s, the run 35 s), 2-3x that when it is loaded."""
    daemons = _flower_daemons()
    out = tmp_path / "run"
    proc = _fedlora("run", "--model", "tiny", "--num-clients", "2", "--parallel", "2", "--rounds", "1",
                    "--ray-address", ray_cluster, "--output", str(out), *QUICK,
                    timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "2 nodes, 2 CPUs, 0 GPUs; 1 CPU(s) per client, 2 at once" in proc.stdout, text[-3000:]
    assert "Traceback" not in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["clients_aggregated"] == 2
    run = json.loads((out / "run.json").read_text())
    assert run["run_config"]["train.device"] == "cpu"  # pinned: the cluster's workers decide what GPUs they show
    assert not _flower_daemons() - daemons  # fedlora stopped its SuperLink and driver ...

    probe = subprocess.run([sys.executable, "-c", WHERE_CLIENTS_RAN, ray_cluster], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    assert probe.returncode == 0, probe.stderr[-2000:]
    where = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(where["nodes"]) == 2  # ... and left the cluster running
    assert sorted(where["runs_per_node"]) == where["nodes"], where  # a ClientAppActor on each node ...
    assert all(n > 0 for n in where["runs_per_node"].values()), where  # ... and each ran ClientApps
    assert where["actor_states"] == ["DEAD"], where  # the run's actors ended with its driver
