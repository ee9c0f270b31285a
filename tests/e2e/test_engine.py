"""`fedlora run`'s engine: a private local SuperLink (fedlora/engine.py), its exit status, its cleanup, and the
`--set` parsing that feeds it (Flower's own run-config parser, with a string fallback for comma lists)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora import engine
from fedlora.cli import parse_override, parse_overrides, resolve_config
from fedlora.config import ConfigError, FedLoraConfig

ROOT = Path(__file__).resolve().parents[2]
FLOWER_DAEMONS = ("flower-superlink", "flower-superexec", "flwr-simulation")
# Small and quick: tiny model, 1 round, few steps (the engine is under test, not the learning).
QUICK = ["--set", "train.local-steps=2", "--set", "train.batch-size=8", "--set", "model.max-length=32",
         "--set", "data.max-eval-examples=64", "--set", "data.partition=iid", "--set", "adapter.rank=4"]


# ------------------------------------------------------------------------------------------------ --set parsing


@pytest.mark.parametrize(("pair", "expected"), [
    ("adapter.rank=8", {"adapter.rank": 8}),
    ("seed=-3", {"seed": -3}),
    ("train.lr=0.005", {"train.lr": 0.005}),
    ("privacy.delta=1e-5", {"privacy.delta": 1e-5}),
    ("privacy.target-epsilon=inf", {"privacy.target-epsilon": float("inf")}),
    ("resume=true", {"resume": True}),
    ("export-merged=false", {"export-merged": False}),
    ('output-dir="runs/with space"', {"output-dir": "runs/with space"}),
    ("method.name='fedsvd'", {"method.name": "fedsvd"}),
    ('adapter.ranks="4,8,16"', {"adapter.ranks": "4,8,16"}),
    ('adapter.rank="8"', {"adapter.rank": "8"}),  # quoted: the string, as with flwr run --run-config
    # Not TOML, taken as written (no quotes needed on the command line):
    ("adapter.ranks=4,8,16", {"adapter.ranks": "4,8,16"}),
    ("adapter.target-modules=query,value", {"adapter.target-modules": "query,value"}),
    ("adapter.target-modules=q_proj,v_proj", {"adapter.target-modules": "q_proj,v_proj"}),
    ("method.name=fedsvd", {"method.name": "fedsvd"}),
    ("data.source=/data/my set", {"data.source": "/data/my set"}),
    ("data.source=2024-01-01", {"data.source": "2024-01-01"}),  # a TOML date is no run-config value
    ("adapter.ranks=", {"adapter.ranks": ""}),
    (" adapter.rank = 4 ", {"adapter.rank": 4}),
])
def test_set_values_are_typed_like_flwr_run_config(pair, expected):
    got = parse_override(pair)
    assert got == expected
    assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]


def test_flowers_parser_rejects_unquoted_comma_lists():
    """Why the fallback exists: `flwr run --run-config adapter.ranks=4,8,16` is a TOML error in flwr itself."""
    import click
    from flwr.common.config import parse_config_args

    assert parse_config_args(["adapter.rank=8 resume=true"]) == {"adapter.rank": 8, "resume": True}
    with pytest.raises(click.ClickException):
        parse_config_args(["adapter.ranks=4,8,16"])


def test_set_without_equals_names_the_flag_and_an_example():
    with pytest.raises(ConfigError, match=r"--set 'adapter\.rank' must look like key=value, e\.g\. --set "
                                          r"adapter\.rank=8"):
        parse_overrides(["adapter.rank"])
    with pytest.raises(ConfigError, match="--set"):
        parse_overrides(["=4"])


def test_later_pairs_win_and_reach_the_config():
    assert parse_overrides(["adapter.rank=4", "adapter.rank=16"]) == {"adapter.rank": 16}
    args = argparse.Namespace(set=["method.name=flora", "adapter.ranks=4,8,16", "adapter.rank=16",
                                   "adapter.target-modules=query,value", "train.lr=1e-3"],
                              method=None, model="tiny", data=None, rounds=2, output=None, seed=None)
    cfg = resolve_config(args)
    assert (cfg.method.name, cfg.adapter.ranks, cfg.adapter.rank, cfg.train.lr) == ("flora", "4,8,16", 16, 1e-3)
    assert cfg.adapter.target_modules == "query,value"
    assert (cfg.model.name, cfg.run.num_server_rounds) == ("tiny", 2)


# ---------------------------------------------------------------------------------------- engine, no processes


@pytest.mark.parametrize(("clients", "parallel", "cpus", "per_client"), [
    (4, 2, 2, 1), (4, 2, 16, 8), (1, 2, 16, 16), (8, 3, 16, 5), (4, 4, 2, 1)])
def test_federation_config_gives_parallel_clients_the_cpus(clients, parallel, cpus, per_client):
    from flwr.supercore.utils import simulation_config_from_json

    fed = engine.simulation_federation_config(clients, parallel, cpus)
    assert fed["num-supernodes"] == clients
    assert fed["client-resources-num-cpus"] == per_client
    assert fed["init-args-num-cpus"] == cpus
    proto = simulation_config_from_json({k.replace("-", "_"): v for k, v in fed.items()})  # what flwr run does
    assert proto.num_supernodes == clients and proto.client_resources_num_cpus == per_client


def test_generated_app_is_a_valid_flower_app_with_every_run_config_key(tmp_path):
    import tomli_w
    from flwr.cli.config_utils import load_and_validate

    defaults = FedLoraConfig().to_run_config()
    (tmp_path / "pyproject.toml").write_text(tomli_w.dumps(engine.app_pyproject(defaults)))
    config, warnings = load_and_validate(tmp_path / "pyproject.toml")
    assert config is not None and not warnings
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from flwr.common.config import flatten_dict

    assert flatten_dict(app["config"]) == defaults


# Abridged from real 1.42 streams: a ClientApp that raised (ray's traceback), then a ServerApp that raised.
CLIENT_AND_SERVER_FAILURE = """\
\x1b[92mINFO \x1b[0m:      Starting Flower Simulation
\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.
Successfully installed fedlora to /tmp/x/apps/fedlora.fedlora.0.1.0.6c7c0298.
fedlora: method=fedit model=tiny data=austen rounds=1 -> /tmp/out
\x1b[91mERROR \x1b[0m:     An exception was raised when processing a message by RayBackend
\x1b[91mERROR \x1b[0m:     \x1b[36mray::ClientAppActor.run()\x1b[39m (pid=8622, ip=192.0.2.2, actor_id=44c9)
                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/flwr/clientapp/client_app.py", line 161, in __call__
    return self._registered_funcs[full_name](message, context)
ValueError: client broke

The above exception was the direct cause of the following exception:

\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=8622, ip=192.0.2.2, actor_id=44c9)
  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException: 
Exception ClientAppException occurred. Message: client broke
\x1b[91mERROR \x1b[0m:     Traceback (most recent call last):
  File "/venv/flwr/server/superlink/fleet/vce/vce_api.py", line 132, in worker
    out_mssg, updated_context = backend.process_message(message, context)
ray.exceptions.RayTaskError(ClientAppException): \x1b[36mray::ClientAppActor.run()\x1b[39m (pid=8622)
  File "/venv/flwr/clientapp/client_app.py", line 161, in __call__
ValueError: client broke

round   1 | clients 1/2 | train loss 1.650
\x1b[36m(ClientAppActor pid=8622)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor
\x1b[91mERROR \x1b[0m:     Simulation raised an exception
Traceback (most recent call last):
  File "/venv/flwr/simulation/app.py", line 337, in run_simulation_process
    simulation_result = _run_simulation(
                        ^^^^^^^^^^^^^^^^
  File "/work/main/fedlora/server.py", line 120, in run_server
    raise RunFailed(f"no round aggregated a single client update")
fedlora.server.RunFailed: no round aggregated a single client update
\x1b[91mERROR \x1b[0m:     Exit Code: 700

An unhandled exception occurred when running the simulation.

For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/700.html>
"""

CLIENTAPP_IMPORT_FAILURE = """\
\x1b[91mERROR \x1b[0m:     Simulation raised an exception
Traceback (most recent call last):
  File "/work/main/fedlora/config.py", line 73, in _method_config
    return dataclasses.make_dataclass("MethodConfig", shared + own, module=__name__)
TypeError: make_dataclass() got an unexpected keyword argument 'module'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/venv/flwr/simulation/run_simulation.py", line 347, in _main_loop
    raise RuntimeError("An error was encountered. Ending simulation.") from ex
RuntimeError: An error was encountered. Ending simulation.
\x1b[91mERROR \x1b[0m:     Exit Code: 700

An unhandled exception occurred when running the simulation.
"""


def _feed(text: str, verbose: bool = False) -> tuple[engine.LogFilter, list[str]]:
    flt = engine.LogFilter(verbose=verbose)
    shown = [engine.strip_ansi(s).rstrip("\n") for line in text.splitlines(keepends=True) for s in flt.feed(line)]
    return flt, shown


def test_log_filter_shows_fedlora_lines_and_hides_flower_noise_and_tracebacks():
    flt, shown = _feed(CLIENT_AND_SERVER_FAILURE)
    assert shown == ["fedlora: method=fedit model=tiny data=austen rounds=1 -> /tmp/out",
                     "round   1 | clients 1/2 | train loss 1.650"]
    assert len(flt.errors) == 5
    assert flt.reason() == "fedlora.server.RunFailed: no round aggregated a single client update"
    assert flt.causes()[0] == "ValueError: client broke"
    _, everything = _feed(CLIENT_AND_SERVER_FAILURE, verbose=True)
    assert everything == engine.strip_ansi(CLIENT_AND_SERVER_FAILURE).splitlines()


def test_log_filter_reports_the_root_cause_of_a_chained_failure():
    flt, shown = _feed(CLIENTAPP_IMPORT_FAILURE)
    assert shown == []
    assert flt.reason() == "TypeError: make_dataclass() got an unexpected keyword argument 'module'"


def test_failure_line_falls_back_to_flowers_status_details():
    r = engine.RunResult(1, "finished:failed", "Simulation failed with exception: boom")
    assert not r.ok and r.failure() == "run finished:failed: boom"
    r = engine.RunResult(1, "finished:failed", "Simulation failed with exception: boom", reason="KeyError: 'x'")
    assert r.failure() == "run finished:failed: KeyError: 'x'"
    assert engine.RunResult(1, engine.COMPLETED).ok


# ------------------------------------------------------------------------------------- the real runtime (slow)


def _flower_processes() -> set[tuple[int, str]]:
    """Live (not zombie) processes of a Flower runtime or started under a fedlora SuperLink: (pid, command)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] == "Z":
            continue
        if any(name in cmd for name in FLOWER_DAEMONS) or f"{engine.MARKER_ENV}=".encode() in env:
            out.add((int(d.name), cmd[:200]))
    return out


def _superlink_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("fedlora-superlink-*")}


def _fedlora(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``fedlora`` in a subprocess; ``timeout`` guards against a hang only (a 1-round tiny run takes about 60 s
    alone and twice that on a loaded 2-core machine): speed is measured in benchmarks, not asserted here."""
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def no_leftovers():
    """The test must leave no Flower process and no SuperLink folder behind."""
    before, dirs = _flower_processes(), _superlink_dirs()
    yield
    left = _flower_processes() - before
    assert not left, f"processes left running: {sorted(left)}"
    assert _superlink_dirs() <= dirs


@pytest.mark.slow
def test_run_through_local_superlink_exits_zero_and_cleans_up(tmp_path, no_leftovers):
    out = tmp_path / "run"
    proc = _fedlora("run", "--model", "tiny", "--num-clients", "2", "--rounds", "1", "--output", str(out), *QUICK)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "DEPRECATED" not in text.upper() and "deprecated" not in text.lower()
    assert "Traceback" not in text and not re.search(r"^INFO\s*:", text, re.M)  # Flower's INFO lines stay out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    # Both clients trained at adapter.rank=4 and the server aggregated them: the --set overrides reached both apps.
    assert rows[1]["clients_aggregated"] == 2
    run = json.loads((out / "run.json").read_text())
    assert run["run_config"]["adapter.rank"] == 4 and run["run_config"]["model.name"] == "tiny"
    assert run["run_config"]["output-dir"] == str(out)
    for name in ("summary.json", "metrics.png", "adapter"):
        assert (out / name).exists(), name
    assert "round   1 |" in proc.stdout


@pytest.mark.slow
def test_run_whose_serverapp_raises_exits_nonzero_with_one_reason(tmp_path, no_leftovers):
    """output-dir below a regular file passes validation but fails in the ServerApp (its Reporter's mkdir)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    proc = _fedlora("run", "--model", "tiny", "--num-clients", "2", "--rounds", "1", "--output",
                    str(blocker / "run"), *QUICK)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    failure = [line for line in proc.stderr.splitlines() if line.startswith("fedlora: run finished:failed")]
    assert len(failure) == 1, text[-3000:]
    assert "NotADirectoryError" in failure[0]
    assert text.count("NotADirectoryError") == 1 and "Traceback" not in text
    assert len(text.splitlines()) < 10, text
    log = Path(failure[0].rsplit("full log: ", 1)[1])
    try:
        assert "Traceback" in log.read_text()  # the whole story is kept for whoever needs it
    finally:
        log.unlink(missing_ok=True)


def _foreground_sigint() -> None:
    """The child handles SIGINT as a foreground program does, also when this suite runs as a background job (a
    shell starts those with SIGINT ignored, the child would inherit that, and Python would then never raise
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_stops_the_superlink(tmp_path, no_leftovers):
    """Ctrl-C (SIGINT to the foreground process group) mid-run: exit 130, nothing left running. 500 rounds: a
    tiny round takes ~0.3 s, and under load the streamed log can reach us many rounds late."""
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", "--model", "tiny", "--num-clients", "2",
                             "--rounds", "500", "--output", str(tmp_path / "run"), *QUICK], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=_foreground_sigint)
    seen = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("round   0") or time.monotonic() > deadline:
                break
        assert any(s.startswith("round   0") for s in seen), "".join(seen)[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    assert "fedlora: interrupted" in rest
