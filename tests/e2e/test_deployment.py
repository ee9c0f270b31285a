"""The README's "Deploy on several machines", run as written on 127.0.0.1 with real processes.

The commands come from the README's ``<!-- deploy:<step> -->`` blocks; the test only sets the variables the
README tells the reader to set (free ports, temporary folders) and appends flags a test needs (a distinct
``--port`` per SuperNode on one machine, fail-fast retries for the SuperNodes that must be refused, the fast
run config). Every process is started in its own session and ended by its process group in a finally block;
anything that left its group is found by walking /proc from the pids we started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlora import naming
from fedlora.checkpoint import load_checkpoint
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.deploy import make_certificates, make_node_keys
from fedlora.server import initial_state
from tests.conftest import FAST
from tests.test_node_data import write_node_folder

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

NODES = 3
# round-timeout: well above a normal round on a busy 2-core machine (~40 s: every message starts a fresh
# ClientApp process that imports torch). The killed node is usually reported sooner: the SuperLink answers for
# it with "Node Unavailable" once its heartbeats stop (seen after ~45 s).
RUN = {**FAST, "model.name": "tiny", "method.name": "fedit", "num-server-rounds": 2, "min-nodes": NODES,
       "train.local-steps": 2, "min-fit-clients": 2, "round-timeout": 90.0}


# ---- the README, parsed ---------------------------------------------------------------------------------

def readme_steps() -> dict[str, list[str]]:
    """{step: [command, ...]} from the README section's marked bash blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Deploy on several machines")
    section = text[start:text.index("\n## ", start + 3)]
    blocks = dict(re.findall(r"<!-- deploy:(\w+) -->\s*```bash\n(.*?)```", section, re.S))
    return {step: [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip()]
            for step, body in blocks.items()}


def exported(line: str) -> list[str]:
    """Names an ``export A=... B=...`` line sets (comments dropped)."""
    assert line.startswith("export "), line
    return re.findall(r"(\w+)=", line.split("#")[0])


# ---- processes ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Processes:
    """Processes this test started, each in its own session (= process group), logs in ``logs``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}
        self.seen: set[int] = set()  # every descendant ever observed (a detached child is still ours)

    def start(self, name: str, command: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        p = subprocess.Popen(["bash", "-c", f"exec {command}"], env=env, cwd=cwd, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def track(self) -> None:
        for p in self.started.values():
            self.seen.update(descendants(p.pid))

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        p = self.started[name]
        self.seen.update(descendants(p.pid))
        pids = [p.pid, *descendants(p.pid)]
        for target in (lambda: os.killpg(p.pid, sig), *[lambda q=q: os.kill(q, sig) for q in pids[1:]]):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(q) for q in pids):
            p.poll()
            time.sleep(0.2)
        for q in pids:
            if alive(q):
                try:
                    os.kill(q, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait(10)

    def stop_all(self) -> list[int]:
        """End everything; returns pids still alive afterwards (should be none)."""
        self.track()
        for name in reversed(list(self.started)):
            self.stop(name)
        for q in self.seen:
            if alive(q):
                try:
                    os.kill(q, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        return [q for q in self.seen | {p.pid for p in self.started.values()} if alive(q)]


def wait_for(predicate, timeout: float, what: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if procs.started[name].poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"{what} (not within {timeout} s); {name} log:\n{procs.log(name)[-3000:]}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- the test --------------------------------------------------------------------------------------------

def test_readme_deployment_tls_node_auth_own_data(tmp_path):
    steps = readme_steps()
    assert set(steps) == {"env", "certs", "superlink", "register", "supernode", "run"}
    assert sorted(v for line in steps["env"] for v in exported(line)) == ["FLWR_HOME", "PORT", "SERVER"]
    node_export, node_cmd = steps["supernode"]
    assert sorted(exported(node_export)) == ["CA", "DATA", "NODE_KEY"]
    assert all(s.startswith("fedlora ") or s.startswith("flwr") or s.startswith("flower-")
               for step in ("certs", "superlink", "register", "run") for s in steps[step])

    server = tmp_path / "server"
    server.mkdir()
    (tmp_path / "logs").mkdir()
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "SERVER": "127.0.0.1",
           "PORT": str(port), "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    procs = Processes(tmp_path / "logs")
    left: list[int] = []
    try:
        # 1. certificates and node keys, on the "server machine"
        for cmd in steps["certs"]:
            subprocess.run(["bash", "-c", cmd], cwd=server, env=env, check=True, capture_output=True, timeout=60)
        assert sorted(p.name for p in (server / "keys").iterdir()) == [
            f"node-{i}{ext}" for i in range(1, NODES + 1) for ext in ("", ".pub")]

        # 2. the SuperLink, TLS + node auth
        (superlink_cmd,) = steps["superlink"]
        assert "--insecure" not in superlink_cmd and "--enable-supernode-auth" in superlink_cmd
        procs.start("superlink", superlink_cmd, env, server)
        wait_for(lambda: listening(port), 60, "SuperLink listening", procs, "superlink")

        # 3. connection entry + registration of every node key
        for cmd in steps["register"]:
            proc = subprocess.run(["bash", "-c", cmd], cwd=server, env=env, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, cmd + "\n" + proc.stdout + proc.stderr
        registered = dict(re.findall(r"(node-\d+)\.pub: node id (\d+)", proc.stdout))
        assert sorted(registered) == [f"node-{i}" for i in range(1, NODES + 1)]

        # 4. one SuperNode per "client machine": its own folder with key, CA and data
        sizes = {1: 40, 2: 56, 3: 72}
        for i in range(1, NODES + 1):
            machine = tmp_path / f"client-{i}"
            data = write_node_folder(machine / "data", sizes[i], None, offset=300 * i)
            (machine / "ca.crt").write_bytes((server / "certs" / "ca.crt").read_bytes())
            key = machine / f"node-{i}"
            key.write_bytes((server / "keys" / f"node-{i}").read_bytes())
            key.chmod(0o600)
            node_env = {**env, "CA": str(machine / "ca.crt"), "NODE_KEY": str(key), "DATA": str(data)}
            procs.start(f"supernode-{i}", f"{node_cmd} --port {free_port()}", node_env, machine)

        # Refused: a key the SuperLink never registered.
        rogue = make_node_keys(tmp_path / "rogue", 1)[0]
        rogue_env = {**env, "CA": str(server / "certs" / "ca.crt"), "NODE_KEY": str(rogue.private),
                     "DATA": str(tmp_path / "client-1" / "data")}
        fail_fast = f"--max-retries 1 --max-wait-time 15 --port {free_port()}"
        procs.start("rogue", f"{node_cmd} {fail_fast}", rogue_env, tmp_path)
        # Cannot connect: a CA that did not sign the SuperLink's certificate, and no CA at all (system store).
        wrong = make_certificates(tmp_path / "wrong-ca", ["127.0.0.1"])
        procs.start("wrong-ca", f"{node_cmd} --max-retries 1 --max-wait-time 15 --port {free_port()}",
                    {**rogue_env, "NODE_KEY": str(server / 'keys' / 'node-1'), "CA": str(wrong.ca_cert)}, tmp_path)
        no_ca_cmd = node_cmd.replace('--root-certificates "$CA"', "")
        assert no_ca_cmd != node_cmd
        procs.start("no-ca", f"{no_ca_cmd} --max-retries 1 --max-wait-time 15 --port {free_port()}",
                    {**rogue_env, "NODE_KEY": str(server / 'keys' / 'node-1')}, tmp_path)

        # 5. the run, as written, with the test's fast settings appended. In round 2 SuperNode 3 is killed
        # (SIGKILL, with its ClientApp process) while it trains: the round must complete with the other two.
        out = tmp_path / "run-out"
        (run_cmd,) = steps["run"]
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**RUN, "output-dir": str(out)}.items())
        run_log = (tmp_path / "logs" / "flwr-run.log").open("wb")
        run = subprocess.Popen(["bash", "-c", f"exec {run_cmd} --run-config '{overrides}'"], cwd=ROOT, env=env,
                               stdout=run_log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.started["flwr-run"] = run
        deadline, killed = time.monotonic() + 360, False
        while run.poll() is None and time.monotonic() < deadline:
            procs.track()
            if not killed and procs.log("supernode-3").count("Receiving: train message") >= 2:
                procs.stop("supernode-3", signal.SIGKILL)
                killed = True
            time.sleep(0.5)
        assert run.poll() == 0, procs.log("flwr-run")[-4000:]
        assert killed, "SuperNode 3 never received its round-2 message"

        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2], procs.log("flwr-run")[-3000:]
        assert rows[1]["clients_aggregated"] == NODES and not rows[1]["failed"]
        node3 = registered["node-3"]
        assert rows[2]["clients_aggregated"] == NODES - 1, rows[2]
        assert len(rows[2]["failed"]) == 1 and node3 in rows[2]["failed"][0], rows[2]["failed"]
        final, last, _ = load_checkpoint(out)
        assert last == 2
        cfg = FedLoraConfig.from_run_config(RUN)
        start = initial_state(cfg, make_aggregator(cfg))
        adapters = [k for k in final if naming.split(k)]
        assert adapters and set(adapters) <= set(start)
        assert max((final[k] - start[k]).abs().max().item() for k in adapters) > 1e-6  # the adapter trained
        assert all(torch.isfinite(final[k]).all() for k in adapters)

        # The three refused SuperNodes gave up on their own (bounded retries), none with success.
        for name in ("rogue", "wrong-ca", "no-ca"):
            p = procs.started[name]
            p.wait(60)
            # flwr logs its own exit code (305: SuperNode could not connect / was refused) and exits with 1.
            assert p.returncode == 1 and "Exit Code: 305" in procs.log(name), procs.log(name)[-2000:]
        assert "Failed to activate SuperNode" in procs.log("rogue"), procs.log("rogue")[-2000:]
        for name in ("wrong-ca", "no-ca"):
            assert re.search(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", procs.log(name), re.I), \
                procs.log(name)[-2000:]
        listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", "fedlora", "--format", "json"], env=env,
                                cwd=server, capture_output=True, text=True, timeout=60)
        ids = {int(x) for x in re.findall(r'"node-id":\s*"?(\d+)', listed.stdout)}
        assert ids == {int(v) for v in registered.values()}, listed.stdout  # the rogue key never got a node id

        # 6. A second run on the two SuperNodes left: FedSA-LoRA, whose B never leaves a node. Every message runs in
        # a fresh ClientApp process, so B lives in the node's context.state between rounds and in its state file on
        # the node; the server's B stays the initial zero. (Its personalised evaluation runs in-process:
        # tests/test_aggregation_fedsa_lora.py; here it would double the run's fresh processes.)
        sa_out, sa_state = tmp_path / "fedsa-out", tmp_path / "fedsa-state"
        sa_run = {**RUN, "method.name": "fedsa_lora", "min-nodes": NODES - 1,
                  "method.fedsa-state-dir": str(sa_state), "output-dir": str(sa_out)}
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in sa_run.items())
        sa_log = (tmp_path / "logs" / "flwr-run-fedsa.log").open("wb")
        procs.started["flwr-run-fedsa"] = subprocess.Popen(
            ["bash", "-c", f"exec {run_cmd} --run-config '{overrides}'"], cwd=ROOT, env=env, stdout=sa_log,
            stderr=subprocess.STDOUT, start_new_session=True)
        assert procs.started["flwr-run-fedsa"].wait(360) == 0, procs.log("flwr-run-fedsa")[-4000:]
        rows = [json.loads(x) for x in (sa_out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2], procs.log("flwr-run-fedsa")[-3000:]
        assert all(r["clients_aggregated"] == NODES - 1 for r in rows[1:]), rows
        final, _, _ = load_checkpoint(sa_out)
        roles = {k: naming.split(k)[1] for k in final if naming.split(k)}
        assert {k for k, r in roles.items() if r == "B"} and all(
            not final[k].any() for k, r in roles.items() if r == "B")
        files = sorted(sa_state.glob("personal-partition-*.safetensors"))
        assert len(files) == NODES - 1, files
        from safetensors.torch import load_file

        for f in files:
            kept = load_file(str(f))
            assert kept and all(naming.split(k)[1] == "B" for k in kept) and any(t.any() for t in kept.values()), f
    finally:
        left = procs.stop_all()
    assert not left, f"processes outlived the test: {left}"
