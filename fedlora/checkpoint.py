"""Atomic save/load of the server state after every round.

One safetensors file holds the global adapter state; its metadata holds the round and the run history as
JSON. Written to a temporary file in the same folder, fsync-ed, then ``os.replace``-d: a crash mid-write
leaves the previous checkpoint intact, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

FILENAME = "server_state.safetensors"


def save_checkpoint(folder: str | Path, state: dict[str, torch.Tensor], server_round: int,
                    meta: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    info = {"round": server_round, "keys": list(tensors), **(meta or {})}
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fedlora": json.dumps(info)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(folder: str | Path) -> tuple[OrderedDict[str, torch.Tensor], int, dict[str, Any]]:
    """(state in its saved order, last completed round, metadata)."""
    path = Path(folder) / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; run without resume=true to start afresh")
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["fedlora"])
    tensors = load_file(str(path))
    state = OrderedDict((k, tensors[k]) for k in info["keys"])
    return state, int(info["round"]), info
