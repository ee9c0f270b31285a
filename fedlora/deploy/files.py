"""Writing key material: private files are created 0600 from the start (never world-readable, not even briefly)."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes, force: bool) -> None:
    """Create ``path`` with mode 0600; refuse to replace an existing file unless ``force``."""
    _check_new(path, force)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes, force: bool) -> None:
    """Create ``path`` with mode 0644 (certificates and public keys are meant to be copied around)."""
    _check_new(path, force)
    path.write_bytes(data)
    path.chmod(0o644)


def _check_new(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; keep it, or pass --force to replace it (nodes and clients holding "
                              "the old files then need the new ones)")
