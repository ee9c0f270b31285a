"""One experiment cell = one in-process federation with a fixed run config; shared by compare and the sweep.

Runs go through the real ServerApp and ClientApp on :class:`fedlora.localgrid.LocalGrid` (no ray, one process),
so every method of a comparison sees the same model, partition and seed. A cell whose folder already holds a
finished run with the same config is reused: an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IGNORED_ON_RESUME = ("output-dir", "resume")  # keys that may differ between a finished cell and its re-request


def run_method(method: str, base: dict[str, Any], out: Path, num_clients: int) -> dict:
    """Run one federation with ``base`` and ``method.name=method`` into ``out``; returns its summary.json."""
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from fedlora.config import FedLoraConfig
    from fedlora.localgrid import LocalGrid
    from server.app import make_server_app

    cfg = FedLoraConfig.from_run_config({**base, "method.name": method, "output-dir": str(out)}).to_run_config()
    grid = LocalGrid(make_client_app(cfg), num_clients)
    make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return json.loads((Path(out) / "summary.json").read_text())


def finished(out: Path, cfg: dict[str, Any]) -> dict | None:
    """The cell's summary if it finished with this config (same rounds, same run.json config), else None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("rounds") != cfg["num-server-rounds"]:
        return None
    try:
        ran = json.loads((out / "run.json").read_text())["run_config"]
    except (OSError, ValueError, KeyError):
        return summary  # an older folder without run.json: the rounds check is all we have
    # A key the finished run did not know yet (added to fedlora since) counts as its default.
    from fedlora.config import FedLoraConfig

    defaults = FedLoraConfig().to_run_config()
    same = all(ran.get(k, defaults.get(k)) == v for k, v in cfg.items() if k not in IGNORED_ON_RESUME)
    return summary if same else None


def metrics(out: Path) -> list[dict[str, Any]]:
    """The rows of a cell's metrics.jsonl (round 0 = before training), [] if absent or unreadable."""
    try:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def empty_rounds(out: Path) -> list[int]:
    """Rounds in which no client update was aggregated (every client failed or was rejected)."""
    return [r["round"] for r in metrics(out) if r.get("round", 0) > 0 and r.get("clients_aggregated") == 0]
