"""``fedlora run``'s simulation engine: a private local SuperLink in simulation mode, driven like ``flwr run``.

What ``flwr run . <connection>`` does with a ``:local:`` address, done by fedlora with its own resources:

1. write a minimal Flower app (``pyproject.toml`` only: ``server.app:app``, ``client.app:app`` and every run-config
   key with its default, generated from :class:`fedlora.config.FedLoraConfig`, so the keys always match the code),
   imported from the installed environment, whatever the current folder;
2. start ``flower-superlink --insecure --simulation`` on a free 127.0.0.1 port, with a private ``FLWR_HOME`` in a
   temporary folder and runtime dependency installation off (docs/flower-notes.md notes 1, 2);
3. submit the run with Flower's public CLI: ``flwr run APP fedlora --run-config FILE.toml --federation-config
   "num-supernodes=N client-resources-num-cpus=C ..."``; with ``--ray-address`` the simulation joins an existing
   Ray cluster instead of starting a private Ray (``RAY_ADDRESS`` in the SuperLink's environment,
   fedlora/raycluster.py);
4. stream its logs (``flwr log RUN_ID fedlora --stream``), Flower's own INFO lines and tracebacks kept out of the
   way unless ``--verbose``;
5. read the run's final status (``flwr ls fedlora --run-id RUN_ID --format json``): ``finished:completed`` is
   success, anything else a failure whose reason is printed once;
6. always stop the SuperLink and everything it started (superexec, flwr-simulation, a private ray; never a
   cluster's processes), also on Ctrl-C, SIGTERM and errors, then delete the temporary folder.

Only public entry points are used (the ``flower-superlink`` and ``flwr`` commands and their documented options and
JSON output), so this keeps working when Flower removes the deprecated ``flwr.simulation.run_simulation``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedlora.raycluster import ENV as RAY_ADDRESS_ENV
from fedlora.raycluster import LOCAL as RAY_LOCAL
from fedlora.raycluster import RayCluster, cpus_per_client

CONNECTION = "fedlora"  # the SuperLink connection's name in the private $FLWR_HOME/config.toml
MARKER_ENV = "FEDLORA_ENGINE_ID"  # set in the SuperLink's environment: every process it starts inherits it
STARTUP_TIMEOUT = 60.0  # seconds for the SuperLink's /health to answer (a loaded 2-core machine is slow)
STATUS_TIMEOUT = 60.0  # seconds for the run to read as finished once its log stream has ended
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when stopping the SuperLink's processes
COMPLETED = "finished:completed"


class EngineError(RuntimeError):
    """The local SuperLink could not be started or the run could not be submitted (not a failed run)."""


@dataclass
class RunResult:
    run_id: int
    status: str  # Flower's status text: "finished:completed", "finished:failed", "finished:stopped", ...
    details: str = ""  # Flower's status details (the exception's message for a failed simulation)
    reason: str = ""  # the root exception line of the failure found in the run's log, if any
    errors: int = 0  # ERROR records in the log (hidden unless verbose)
    first_error: str = ""  # the root exception of the first of them
    log_path: Path | None = None  # the run's full log, kept when the run failed or logged errors

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    def failure(self) -> str:
        """One line: why the run failed."""
        why = self.reason or self.details.removeprefix("Simulation failed with exception: ") or "no details"
        return f"run {self.status}: {why}"


def simulation_federation_config(num_clients: int, parallel: int, cpu_count: int | None = None,
                                  gpus_per_client: float = 0.0, cluster: RayCluster | None = None) -> dict[str, Any]:
    """Flower's simulation options (``--federation-config`` keys) for ``num_clients`` SuperNodes of which
    ``parallel`` train at once: each client gets cpu_count / min(num_clients, parallel) CPUs (Flower takes whole
    CPUs here, at least 1) and ray gets every CPU. ``gpus_per_client`` F > 0: each client also holds F of a GPU
    (``client-resources-num-gpus``), so 1/F clients share one GPU, as in FlowerTune; ray then shows each client
    only its GPU (``train.device=auto`` finds it) and runs at most (GPUs / F) of them at once.

    On an existing ``cluster`` the CPUs per client are the most at which that many clients fit on its nodes
    (:func:`fedlora.raycluster.cpus_per_client`), and ``init-args-num-cpus`` is left out: Ray refuses it when
    joining a cluster (docs/flower-notes.md note 14)."""
    want = min(num_clients, parallel)
    node_cpus = cluster.node_cpus if cluster is not None else (cpu_count or os.cpu_count() or 1,)
    fed: dict[str, Any] = {"num-supernodes": num_clients,
                           "client-resources-num-cpus": cpus_per_client(node_cpus, want),
                           "client-resources-num-gpus": float(gpus_per_client)}
    if cluster is None:
        fed["init-args-num-cpus"] = node_cpus[0]
    return fed


def cluster_run_config(run_config: dict[str, Any], cluster: RayCluster | None,
                       gpus_per_client: float) -> dict[str, Any]:
    """On a cluster without ``--gpus-per-client``, ``train.device=auto`` becomes ``cpu``: the clients train on
    the CPU as they do on a private Ray, where the engine hides the GPUs; a cluster's workers show or hide their
    node's GPUs as that node's ``ray start`` environment says, which fedlora does not control (note 14)."""
    if cluster is None or gpus_per_client > 0 or run_config.get("train.device", "auto") != "auto":
        return run_config
    return {**run_config, "train.device": "cpu"}


def app_pyproject(defaults: dict[str, Any]) -> dict[str, Any]:
    """The pyproject of the Flower app that is submitted: fedlora's components and run-config keys, no code (the
    apps are imported from the environment fedlora runs in)."""
    from fedlora import __version__

    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedlora", "version": __version__, "license": "Apache-2.0", "dependencies": [],
                    "description": "fedlora run: federated LoRA fine-tuning (generated by fedlora.engine)"},
        "tool": {"flwr": {"app": {"publisher": "fedlora",
                                  "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                                  "config": dict(defaults)}}},
    }


# ---------------------------------------------------------------------------------------------------- processes


def _flower_command(name: str) -> str:
    """A Flower console script: next to this interpreter (a venv's bin/), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise EngineError(f"`{name}` not found next to {sys.executable} nor on PATH; install flwr[simulation]")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process (Linux /proc; empty elsewhere)."""
    out: dict[int, tuple[int, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "(comm)": state ppid ...
        out[int(name)] = (int(fields[1]), fields[0])
    return out


def descendants(pid: int, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def marked_processes(marker: str) -> set[int]:
    """Processes whose environment has ``FEDLORA_ENGINE_ID=marker``: all that the SuperLink started, also those
    that were reparented to init when their parent died."""
    needle = f"{MARKER_ENV}={marker}".encode()
    out = set()
    for pid in _proc_table():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.add(pid)
    out.discard(os.getpid())
    return out


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    if not table:  # no /proc: ask the kernel
        alive = set()
        for p in pids:
            try:
                os.kill(p, 0)
                alive.add(p)
            except (ProcessLookupError, PermissionError):
                pass
        return alive
    return {p for p in pids if p in table and table[p][1] != "Z"}


def _signal(pids: set[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: SIGTERM the SuperLink if fedlora dies without cleaning up (e.g. SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # best effort only
        pass


class LocalSuperLink:
    """A ``flower-superlink --insecure --simulation`` of fedlora's own: private ``FLWR_HOME`` (a temporary
    folder), a free port, in-memory state. Use as a context manager: leaving it stops every process the SuperLink
    started and deletes the folder.

    ``ray_address``: the simulation joins that Ray cluster (``RAY_ADDRESS`` in the SuperLink's environment, which
    flwr-simulation inherits); else ``RAY_ADDRESS=local`` and the simulation starts a private Ray. The
    cluster's processes are not the SuperLink's (its raylets started them, without fedlora's marker), so stopping
    leaves them running; the run's actors end with its driver, flwr-simulation."""

    def __init__(self, verbose: bool = False, cwd: str | Path | None = None, hide_gpus: bool = False,
                 ray_address: str | None = None) -> None:
        self.verbose = verbose
        self.hide_gpus = hide_gpus
        self.ray_address = ray_address
        self.cwd = str(cwd or os.getcwd())  # the ServerApp/ClientApps run here: relative paths keep their meaning
        self.root = Path(tempfile.mkdtemp(prefix="fedlora-superlink-"))
        self.home = self.root / "flwr-home"
        self.home.mkdir()
        self.marker = self.root.name
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.root / "superlink.log"

    # The environment of the SuperLink and of every `flwr` command fedlora runs against it.
    def env(self) -> dict[str, str]:
        bindir = str(Path(_flower_command("flower-superlink")).parent)  # superexec starts flwr-* from PATH
        env = {**os.environ, "FLWR_HOME": str(self.home), MARKER_ENV: self.marker,
               "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else: a venv per run, CUDA torch (note 1)
               "FLWR_DISABLE_UPDATE_CHECK": "1"}
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        if self.hide_gpus:
            # ray (with the variable above) no longer hides GPUs from clients given none: without --gpus-per-client
            # the whole simulation (server included) trains on the CPU, never several clients unplanned on one GPU.
            # On a cluster both variables reach the driver (the ServerApp) only: the workers have the environment
            # of their node's `ray start` (run_simulation_app pins their train.device instead; note 14).
            env["CUDA_VISIBLE_DEVICES"] = ""
        # The cluster to join, or Ray's "local": a private Ray even where `ray start` ran on this machine, whose
        # address file a plain ray.init() would join (and then refuse init-args-num-cpus; note 14).
        env[RAY_ADDRESS_ENV] = self.ray_address or RAY_LOCAL
        if not self.verbose:
            env["FLWR_LOG_LEVEL"] = "WARNING"  # Flower's INFO lines (server, clients, CLI) stay out of the way
        return env

    def __enter__(self) -> LocalSuperLink:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is KeyboardInterrupt:
            print("fedlora: stopping the local Flower SuperLink ...", file=sys.stderr, flush=True)
        self.stop()

    def start(self) -> None:
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        cmd = [_flower_command("flower-superlink"), "--insecure", "--simulation",
               "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches fedlora only; fedlora stops the SuperLink in order
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"flower-superlink exited with code {self.proc.returncode} at start:\n"
                                  + self._log_tail())
            if self.healthy():
                return
            time.sleep(0.2)
        raise EngineError(f"flower-superlink did not answer on 127.0.0.1:{self.port} within {STARTUP_TIMEOUT:.0f} s:\n"
                          + self._log_tail())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1.0) as r:
                return 200 <= r.status < 300
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def processes(self) -> set[int]:
        """The SuperLink and everything it started (by parentage, and by the inherited marker)."""
        if self.proc is None:
            return set()
        own = set() if self.proc.poll() is not None else {self.proc.pid} | descendants(self.proc.pid)
        return (own | marked_processes(self.marker)) - {os.getpid()}

    def stop(self) -> None:
        """Stop everything the SuperLink started, then the SuperLink, then delete the folder. Safe to call twice.

        First the run's processes (flwr-simulation, ray), while their parent (superexec) is alive to reap them;
        then the SuperLink, which stops its superexec; SIGKILL for whatever is left after STOP_GRACE s."""
        if self.proc is not None:
            table = _proc_table()
            daemons = {self.proc.pid} | {p for p, (ppid, _) in table.items() if ppid == self.proc.pid}
            self._terminate(self.processes() - daemons, STOP_GRACE / 2)
            self._terminate(self.processes(), STOP_GRACE / 2)
            for _ in range(3):  # whatever was starting while we stopped the rest
                late = _alive(self.processes())
                if not late:
                    break
                _signal(late, signal.SIGKILL)
                time.sleep(0.2)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _terminate(self, pids: set[int], grace: float) -> None:
        """SIGTERM ``pids``; SIGKILL those still alive after ``grace`` s."""
        assert self.proc is not None
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            self.proc.poll()  # reap our own child
            pids = _alive(pids)
            time.sleep(0.1)
        _signal(_alive(pids), signal.SIGKILL)

    def flwr(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """A `flwr` command against this SuperLink; output captured."""
        return subprocess.run([_flower_command("flwr"), *args], env=self.env(), cwd=self.cwd,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)


# ----------------------------------------------------------------------------------------------------- the logs

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RECORD = re.compile(r"^(?:\(\w+ pid=\d+\)\s+)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?(.*)$")
# An exception line of a traceback: a dotted name (module.Class) or a builtin-looking one (ValueError), optionally
# ray's "(Cause)", then ":" and the message.
_EXCEPTION = re.compile(r"^(?:(?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*|[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failed))"
                        r"(?:\([\w.]*\))?(?::(?: |$)|$)")
_TRACEBACK = ("Traceback (most recent call last)", "During handling of the above exception",
              "The above exception was the direct cause", "ray::")
_NOISE = (re.compile(r"^Using SuperLink: "), re.compile(r"^Successfully installed \S+ to "),
          re.compile(r"Since flwr [\d.]+, default simulated SuperNodes changed"),  # fedlora always sets the size
          re.compile(r"Manually terminating ClientAppActor"))


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class LogFilter:
    """Flower's streamed run log, line by line: ``feed`` returns the lines to show. Verbose shows everything; else
    fedlora's own lines and Flower's warnings show, and each ERROR record with its traceback is hidden (counted, its
    root exception kept for the failure message)."""

    verbose: bool = False
    errors: list[list[str]] = field(default_factory=list)  # the exception lines of each ERROR record
    _in_error: bool = False
    _exit_block: bool = False  # inside Flower's "Exit Code: N" message: the rest of the record is help text
    _continues: bool = False  # the previous exception line had an empty message: the next line is its message

    def feed(self, line: str) -> list[str]:
        plain = strip_ansi(line).rstrip("\n")
        record = _RECORD.match(plain)
        if record:
            self._in_error = record.group(1) in ("ERROR", "CRITICAL")
            self._exit_block = self._in_error and record.group(2).strip().startswith("Exit Code:")
            self._continues = False
            if self._in_error:
                self.errors.append([])
                self._exception(record.group(2).strip())
        elif self._in_error:
            if self._exit_block or self._continues or self._is_traceback(plain):
                self._continues = False
                self._exception(plain)
            else:
                self._in_error = False
        if self.verbose:
            return [line]
        if self._in_error or any(p.search(plain) for p in _NOISE):
            return []
        if record and record.group(1) in ("DEBUG", "INFO"):
            return []
        return [line]

    def _is_traceback(self, plain: str) -> bool:
        return (not plain.strip() or plain[0].isspace() or plain.startswith(_TRACEBACK)
                or bool(_EXCEPTION.match(plain)))

    def _exception(self, plain: str) -> None:
        if not self._exit_block and _EXCEPTION.match(plain):
            self.errors[-1].append(plain.strip())
            self._continues = plain.rstrip().endswith(":")

    def causes(self) -> list[str]:
        """The root cause of each ERROR record that shows one: its first exception line."""
        return [lines[0] for lines in self.errors if lines]

    def reason(self) -> str:
        """The failure's root cause: that of the last ERROR record with an exception (Flower's "Simulation raised
        an exception" comes last, before its exit message)."""
        causes = self.causes()
        return causes[-1] if causes else ""


# ------------------------------------------------------------------------------------------------------ the run


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt while the engine runs, so the SuperLink is stopped either way."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _pairs(values: dict[str, Any]) -> str:
    """``k=v`` pairs in the TOML syntax `flwr --federation-config` parses."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def run_simulation_app(run_config: dict[str, Any], defaults: dict[str, Any], num_clients: int, parallel: int,
                       verbose: bool = False, out: TextIO | None = None, gpus_per_client: float = 0.0,
                       cluster: RayCluster | None = None) -> RunResult:
    """Run fedlora's ServerApp/ClientApp as one Flower simulation run on a private local SuperLink.

    ``run_config`` travels as the run's config overrides (every key must be in ``defaults``, the app's
    ``[tool.flwr.app.config]``); Flower's log lines are written to ``out`` (filtered unless ``verbose``).
    ``cluster``: the clients run on that existing Ray cluster (fedlora.raycluster) instead of a private Ray.
    Returns the run's final status; raises :class:`EngineError` when the run could not be started and
    KeyboardInterrupt on Ctrl-C/SIGTERM, in every case after stopping the SuperLink.
    """
    import tomli_w

    out = out or sys.stdout
    color = hasattr(out, "isatty") and out.isatty()
    run_config = cluster_run_config(run_config, cluster, gpus_per_client)
    address = cluster.address if cluster is not None else None
    with (_terminate_as_interrupt(),
          LocalSuperLink(verbose=verbose, hide_gpus=gpus_per_client == 0, ray_address=address) as link):
        app = link.root / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(defaults)))
        overrides = link.root / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)))
        fed = simulation_federation_config(num_clients, parallel, gpus_per_client=gpus_per_client, cluster=cluster)
        res = link.flwr("run", str(app), CONNECTION, "--format", "json", "--run-config", str(overrides),
                        "--federation-config", _pairs(fed), timeout=300)
        try:
            run_id = int(json.loads(res.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise EngineError(f"`flwr run` could not submit the run (exit code {res.returncode}):\n"
                              + strip_ansi(res.stdout + res.stderr).strip()[-3000:]) from None

        flt = LogFilter(verbose=verbose)
        full_log: list[str] = []
        stream = subprocess.Popen(
            [_flower_command("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=link.env(), cwd=link.cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            errors="replace")
        try:
            assert stream.stdout is not None
            for line in stream.stdout:
                full_log.append(line)
                for shown in flt.feed(line):
                    out.write(shown if color else strip_ansi(shown))
                    out.flush()
            stream.wait()
        finally:
            if stream.poll() is None:
                stream.terminate()
                try:
                    stream.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    stream.kill()

        status, details = _final_status(link, run_id)
        causes = flt.causes()
        result = RunResult(run_id, status, details, reason=flt.reason(), errors=len(flt.errors),
                           first_error=causes[0] if causes else "")
        if not result.ok or (result.errors and not verbose):
            result.log_path = _keep_log(full_log, run_id)
        return result


def _final_status(link: LocalSuperLink, run_id: int) -> tuple[str, str]:
    """The run's status text and details from `flwr ls --run-id N --format json`, once it reads finished."""
    deadline = time.monotonic() + STATUS_TIMEOUT
    status, details = "unknown", ""
    while True:
        res = link.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            run = json.loads(res.stdout)["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details") or "")
        except (ValueError, KeyError, IndexError, TypeError):
            details = strip_ansi(res.stdout + res.stderr).strip()[-500:]
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(0.5)


def _keep_log(lines: list[str], run_id: int) -> Path:
    fd, path = tempfile.mkstemp(prefix=f"fedlora-run-{run_id}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(strip_ansi("".join(lines)))
    return Path(path)
