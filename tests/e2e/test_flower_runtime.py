"""The real Flower runtime: ray simulation for the methods whose clients depend on it, and `flwr run .`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlora import naming
from fedlora.checkpoint import load_checkpoint
from tests.conftest import FAST, HETEROGENEOUS, RANKS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cli_args(out: Path, method: str) -> list[str]:
    args = ["run", "--engine", "simulation", "--num-clients", "3", "--method", method, "--output", str(out)]
    for k, v in FAST.items():
        args += ["--set", f"{k}={v}"]
    if method in HETEROGENEOUS:
        args += ["--set", f"adapter.ranks={RANKS}"]
    return args


# The runtime is method-agnostic (tests/e2e/test_local_federation.py runs every method in-process): ray runs the
# methods whose clients depend on what the runtime keeps or routes, at ~30 s of ray start-up each, to keep the suite
# within its time budget. FedIT: plain A and B; FLoRA: stacked factors, per-client ranks and the delta downlink per node
# id (FedEx-LoRA's residual travels the same way); RoLoRA: uploads that change with the round; FedSA-LoRA: each
# client's own B kept across rounds in the node's context.state. Server-side steps (Fed-SB's gradient init, LoRA-FAIR's
# solver) run in the ServerApp's process under either runtime and are checked in-process.
RAY_METHODS = ["fedit", "flora", "rolora", "fedsa_lora"]


@pytest.mark.parametrize("method", RAY_METHODS)
def test_ray_simulation(method, tmp_path):
    """A real Flower simulation (ray actors, 3 SuperNodes, 2 rounds) per method, in a child process so
    ray starts and stops cleanly each time."""
    out = tmp_path / "run"
    code = f"import sys; from fedlora.cli import main; sys.exit(main({_cli_args(out, method)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_aggregated"] == 3 for r in rows[1:])
    assert rows[-1]["global_loss"] < rows[0]["global_loss"]
    state, last, _ = load_checkpoint(out)
    assert last == 2
    # The same seed through the in-process grid gives the same global adapter: the runtime changes nothing.
    from tests.conftest import run_local

    overrides = {"method.name": method, **({"adapter.ranks": RANKS} if method in HETEROGENEOUS else {})}
    run_local(tmp_path / "local", **overrides)
    local, _, _ = load_checkpoint(tmp_path / "local")
    adapters = [k for k in state if naming.split(k)]
    assert adapters
    if method == "flora":
        # The merged factors depend on the order clients are stacked (node ids differ between runtimes); the global
        # update MB MA does not.
        layers = naming.layers_of(state)
        state = {la: state[naming.key(la, "MB")] @ state[naming.key(la, "MA")] for la in layers}
        local = {la: local[naming.key(la, "MB")] @ local[naming.key(la, "MA")] for la in layers}
    # Tolerance, not equality: ray actors may use another intra-op thread count (float summation order).
    for k in state:
        diff = float((state[k] - local[k]).abs().max())
        assert torch.allclose(state[k], local[k], rtol=1e-4, atol=1e-5), f"{k}: max |ray - in-process| = {diff:.3g}"


def test_flwr_run_local_simulation(tmp_path):
    """`flwr run .` exactly as the README shows it, with the pyproject's app and an override."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n')
    out = tmp_path / "run"
    bindir = str(Path(sys.executable).parent)  # flwr spawns `flower-superlink` from PATH
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39191",
           "FLWR_LOCAL_CONTROL_API_PORT": "39193"}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**FAST, "output-dir": str(out), "model.name": "tiny",
                                                             "method.name": "fedsvd"}.items())
    flwr = str(Path(bindir) / "flwr")
    try:
        proc = subprocess.run([flwr, "run", ".", "local", "--stream", "--run-config", overrides], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["clients_aggregated"] == 2 for r in rows[1:])  # flwr's default: 2 simulated SuperNodes
    finally:  # the local SuperLink is detached and outlives `flwr run` (docs/flower-notes.md note 2)
        _stop_processes_matching(str(home))


def _stop_processes_matching(pattern: str, grace: float = 10.0) -> None:
    """SIGTERM every process whose command line contains ``pattern``; SIGKILL what is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()]
        pids = [p for p in pids if p != os.getpid()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.2)
        if not pids:
            return
