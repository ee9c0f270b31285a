"""Atomic, verified save/load of the server state after every round; the last K rounds are kept.

Each round writes ``server_state-<round>.safetensors``: the global state's tensors (adapter tensors plus
whatever the aggregator keeps there: FedSVD's A, FLoRA's and FedEx-LoRA's merged factors, Fed-SB's frozen B and
A), and in the safetensors metadata, as JSON, the round, the tensor order, a sha256 of the tensors and the caller's
``meta`` (run history, RNG seeds, per-node knowledge, DP state). The file is written to a temporary name in
the same folder, fsync-ed and ``os.replace``-d, then the folder is fsync-ed, so a crash leaves either the
old set of files or the new one. Loading takes the newest checkpoint that reads back completely and whose
digest matches; a torn or corrupted newer file is skipped with a logged warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

log = logging.getLogger("fedlora")

PREFIX, SUFFIX = "server_state-", ".safetensors"
_NAME = re.compile(r"^server_state-(\d+)\.safetensors$")
_TMP_PREFIX = ".ckpt-"


class CheckpointError(RuntimeError):
    """A checkpoint file is torn or corrupted (the message says how)."""


def checkpoint_path(folder: str | Path, server_round: int) -> Path:
    return Path(folder) / f"{PREFIX}{server_round:06d}{SUFFIX}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of every checkpoint file in ``folder``, oldest first (valid or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def has_checkpoint(folder: str | Path) -> bool:
    return bool(list_checkpoints(folder))


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and raw float32 bytes in order: independent of the file layout."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(folder: str | Path, state: Mapping[str, torch.Tensor], server_round: int,
                    meta: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write the state after ``server_round`` atomically, then delete all but the newest ``keep`` files."""
    if keep < 1:
        raise ValueError(f"keep-checkpoints={keep} must be >= 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, server_round)
    tensors = OrderedDict((k, v.detach().to(torch.float32).cpu().contiguous()) for k, v in state.items())
    info = {**(meta or {}), "round": server_round, "keys": list(tensors), "sha256": _digest(tensors)}
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata={"fedlora": json.dumps(info)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    _prune(folder, keep)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(folder: Path, keep: int) -> None:
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(f"{_TMP_PREFIX}*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> tuple[OrderedDict[str, torch.Tensor], int, dict[str, Any]]:
    """One checkpoint file, verified: complete header, every tensor, matching digest and round."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["fedlora"])
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for a torn file)
        raise CheckpointError(f"{path.name} cannot be read ({type(e).__name__}: {e})") from None
    keys = info.get("keys", [])
    if set(keys) != set(tensors):
        raise CheckpointError(f"{path.name} holds tensors {sorted(tensors)} but its header lists {sorted(keys)}")
    state = OrderedDict((k, tensors[k]) for k in keys)
    if "sha256" in info and _digest(state) != info["sha256"]:
        raise CheckpointError(f"{path.name}: tensor digest does not match (file corrupted)")
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != int(info["round"]):
        raise CheckpointError(f"{path.name} says round {info['round']}")
    return state, int(info["round"]), info


def load_checkpoint(folder: str | Path) -> tuple[OrderedDict[str, torch.Tensor], int, dict[str, Any]]:
    """(state in its saved order, last completed round, metadata) of the newest valid checkpoint."""
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"no checkpoint ({PREFIX}<round>{SUFFIX}) in {folder}; run without resume=true "
                                "to start afresh")
    errors = []
    for _, path in reversed(found):
        try:
            loaded = read_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            log.warning("checkpoint %s is damaged and skipped: %s", path, e)
            continue
        if errors:
            log.warning("using the previous checkpoint %s (round %d)", path, loaded[1])
        return loaded
    raise CheckpointError(f"every checkpoint in {folder} is damaged: {'; '.join(errors)}")
