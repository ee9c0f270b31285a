"""The SuperLink connection that ``flwr run . <name>`` and ``flwr supernode register ... <name>`` use.

In flwr 1.42 connections live in ``$FLWR_HOME/config.toml`` (default ``~/.flwr``) as ``[superlink.<name>]``
tables, not in the project's pyproject.toml (flwr would migrate and comment out such a section). This module
adds or replaces one table and keeps every other entry of the file.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")


def flwr_home() -> Path:
    """Where flwr keeps config.toml: ``$FLWR_HOME`` or ``~/.flwr``, as flwr itself resolves it."""
    home = os.environ.get("FLWR_HOME")
    return Path(home).expanduser() if home else Path.home() / ".flwr"


def write_connection(name: str, address: str, ca_cert: Path | None = None, insecure: bool = False,
                     home: Path | None = None, make_default: bool = False) -> Path:
    """Add/replace ``[superlink.<name>]`` in ``<home>/config.toml``; returns the file's path.

    TLS is the default: ``ca_cert`` (the CA that signed the SuperLink's certificate) is required unless
    ``insecure`` is asked for explicitly. The CA path is stored absolute, so flwr finds it from any directory.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: use letters, digits, '-' and '_' (it is a TOML table name)")
    m = _ADDRESS.fullmatch(address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"--address {address!r}: give host:port of the SuperLink, e.g. server.example.org:9092")
    entry: dict[str, Any] = {"address": address}
    if insecure:
        if ca_cert is not None:
            raise ValueError("--insecure and --ca both given: --insecure turns TLS off, drop one of them")
        entry["insecure"] = True
    else:
        if ca_cert is None:
            raise ValueError("--ca is required: the CA certificate (ca.crt from `fedlora certs`) that signed the "
                             "SuperLink's certificate; --insecure only for a SuperLink started with --insecure")
        ca = Path(ca_cert).expanduser().resolve()
        if not ca.is_file():
            raise FileNotFoundError(f"--ca {ca_cert}: no such file; copy ca.crt from the server machine")
        entry["root-certificates"] = str(ca)
    path = (home or flwr_home()) / "config.toml"
    config: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    if not isinstance(superlink, dict):
        raise ValueError(f"{path}: 'superlink' is not a table; fix or move the file")
    superlink[name] = entry
    if make_default or "default" not in superlink:
        superlink["default"] = name
    # flwr expects `default` first in [superlink]; keep it there.
    config["superlink"] = {"default": superlink.pop("default"), **superlink}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(config), encoding="utf-8")
    tmp.replace(path)
    return path
