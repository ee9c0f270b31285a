"""SuperNode authentication keys and their registration, as Flower 1.42 does it.

Flower 1.42 derives a SuperNode's identity from an EC private key on a NIST curve in OpenSSH format
(``flower-supernode --auth-supernode-private-key``); the SuperLink (``--enable-supernode-auth``) admits only
nodes whose public key was registered through its Control API (``flwr supernode register <key.pub> <conn>``),
which also fixes the node id. The older ``--auth-list-public-keys`` CSV is deprecated in 1.42 and not used.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.deploy.files import write_private, write_public


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair: ``private`` stays on that node (0600), ``public`` is registered."""

    private: Path
    public: Path


def make_node_keys(out: Path, nodes: int, prefix: str = "node", force: bool = False) -> list[NodeKey]:
    """Write ``<prefix>-<i>`` (OpenSSH private key, ECDSA P-384, 0600) and ``<prefix>-<i>.pub`` for i = 1..nodes."""
    if nodes < 1:
        raise ValueError(f"--nodes {nodes}: make at least one key pair (one per SuperNode)")
    out.mkdir(parents=True, exist_ok=True)
    keys = [NodeKey(out / f"{prefix}-{i}", out / f"{prefix}-{i}.pub") for i in range(1, nodes + 1)]
    for k in keys:  # check all first: no half-written set
        for p in (k.private, k.public):
            if p.exists() and not force:
                raise FileExistsError(f"{p} exists; pass --force to replace the keys (then register the new public "
                                      "keys and unregister the old node ids)")
    for k in keys:
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(k.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()), force)
        write_public(k.public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n", force)
    return keys


def register_nodes(public_keys: Sequence[Path], connection: str, flwr: str | None = None,
                   env: Mapping[str, str] | None = None, timeout: float = 60.0) -> dict[Path, int]:
    """Register each public key with the SuperLink of ``connection`` (a name in $FLWR_HOME/config.toml)
    through ``flwr supernode register``; returns the node id the SuperLink assigned to each key."""
    exe = flwr or shutil.which("flwr")
    if exe is None:
        raise FileNotFoundError("the `flwr` command is not on PATH; activate the environment fedlora is installed in")
    ids: dict[Path, int] = {}
    for pub in public_keys:
        if not Path(pub).is_file():
            raise FileNotFoundError(f"public key {pub} not found; make the pairs with `fedlora node-keys`")
        proc = subprocess.run([exe, "supernode", "register", str(pub), connection, "--format", "json"],
                              capture_output=True, text=True, timeout=timeout, env=None if env is None else dict(env))
        ids[Path(pub)] = _node_id(proc, pub, connection)
    return ids


def _node_id(proc: subprocess.CompletedProcess, pub: Path, connection: str) -> int:
    out = proc.stdout
    start = out.find("{")  # --format json prints one (pretty-printed) JSON object
    try:
        reply = json.loads(out[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        reply = None
    if proc.returncode == 0 and isinstance(reply, dict) and reply.get("success") and "node-id" in reply:
        return int(reply["node-id"])
    text = (out + proc.stderr).strip()
    # The command failed: pass on what flwr said (unknown connection, TLS error, key already registered).
    raise RuntimeError(f"`flwr supernode register {pub} {connection}` failed (exit {proc.returncode}): {text[-800:]}")
