"""Shared fixtures: a fast real federation (real ServerApp/ClientApp functions, wire round trips, no ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

METHODS = ["fedit", "ffa", "flora", "lora_fair", "fed_sb", "fedsvd", "flexlora", "hetlora"]
HETEROGENEOUS = ("flora", "flexlora", "hetlora")
RANKS = "2,3,4"  # per-client ranks for the heterogeneous methods (adapter.rank 4 is the global rank)

# Small and quick: 3 clients x 2 rounds x 4 steps of a 2-layer random BERT.
FAST = {"num-server-rounds": 2, "train.local-steps": 4, "train.lr": 0.002, "train.batch-size": 8, 
        "data.max-eval-examples": 128, "model.max-length": 32, "adapter.rank": 4, "data.partition": "iid",
        "fraction-evaluate": 0.0}


def run_local(out: Path, num_nodes: int = 3, client_app=None, fail_nodes=(), **overrides):
    """Run a federation in-process; returns (grid, metrics rows, summary)."""
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from fedlora.localgrid import LocalGrid
    from server.app import make_server_app

    cfg = {**FAST, "output-dir": str(out), **overrides}
    grid = LocalGrid(client_app or make_client_app(cfg), num_nodes, fail_nodes=fail_nodes)
    make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return grid, rows, summary


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip, with the reason, where no CUDA device is visible (CI, this project's
    machines); benchmarks/gpu_check.sh runs them on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def local_run():
    return run_local


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread keeps timings steady on a shared 2-core box."""
    import torch

    torch.set_num_threads(1)
    yield
