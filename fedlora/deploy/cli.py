"""``fedlora certs | node-keys | register-nodes | federation``: the deployment helpers on the command line."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path


def _user_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad flags, existing files and failed registrations end with one line naming the fix, not a traceback."""

    @functools.wraps(fn)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, OSError, RuntimeError) as e:
            print(f"fedlora {args.command}: {e}", file=sys.stderr)
            return 2

    return wrapped


@_user_errors
def cmd_certs(args: argparse.Namespace) -> int:
    from fedlora.deploy.certs import make_certificates

    p = make_certificates(Path(args.out), args.host, days=args.days, force=args.force)
    print(f"CA certificate     {p.ca_cert}   (copy to every SuperNode and to where `flwr run` is called)")
    print(f"CA key             {p.ca_key}   (keep on this machine)")
    print(f"server certificate {p.server_cert}   SANs: {', '.join(dict.fromkeys(args.host))}")
    print(f"server key         {p.server_key}")
    return 0


@_user_errors
def cmd_node_keys(args: argparse.Namespace) -> int:
    from fedlora.deploy.keys import make_node_keys

    for k in make_node_keys(Path(args.out), args.nodes, prefix=args.prefix, force=args.force):
        print(f"{k.private}  (private: copy to its SuperNode only)   {k.public}  (register it)")
    return 0


@_user_errors
def cmd_register_nodes(args: argparse.Namespace) -> int:
    from fedlora.deploy.keys import register_nodes

    for pub, node_id in register_nodes([Path(p) for p in args.public_keys], args.superlink).items():
        print(f"{pub}: node id {node_id}")
    return 0


@_user_errors
def cmd_federation(args: argparse.Namespace) -> int:
    from fedlora.deploy.federation import write_connection

    path = write_connection(args.name, args.address, Path(args.ca) if args.ca else None, insecure=args.insecure,
                            make_default=args.default)
    print(f"{path}: [superlink.{args.name}] address = {args.address!r} "
          f"({'INSECURE, no TLS' if args.insecure else 'TLS, CA ' + str(Path(args.ca).resolve())})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the deployment subcommands on fedlora's top-level parser."""
    c = sub.add_parser("certs", help="make a CA and a SuperLink TLS certificate (SANs = every --host)")
    c.add_argument("--host", action="append", required=True,
                   help="a DNS name or IP the SuperLink is reached at (repeat for each)")
    c.add_argument("--out", default="certs", help="output folder (default certs/)")
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.set_defaults(func=cmd_certs)

    k = sub.add_parser("node-keys", help="make SuperNode key pairs (ECDSA P-384, OpenSSH) for node authentication")
    k.add_argument("--nodes", type=int, required=True, help="how many SuperNodes")
    k.add_argument("--out", default="keys", help="output folder (default keys/)")
    k.add_argument("--prefix", default="node", help="file names <prefix>-<i> and <prefix>-<i>.pub")
    k.add_argument("--force", action="store_true", help="replace existing files")
    k.set_defaults(func=cmd_node_keys)

    r = sub.add_parser("register-nodes", help="register SuperNode public keys with the SuperLink "
                                              "(`flwr supernode register` for each)")
    r.add_argument("public_keys", nargs="+", help="the .pub files")
    r.add_argument("--superlink", required=True, help="connection name in $FLWR_HOME/config.toml")
    r.set_defaults(func=cmd_register_nodes)

    f = sub.add_parser("federation", help="write a SuperLink connection into $FLWR_HOME/config.toml")
    f.add_argument("--name", required=True, help="connection name, used as `flwr run . <name>`")
    f.add_argument("--address", required=True, help="SuperLink host:port (a name or IP in the certificate's SANs)")
    f.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate (required unless --insecure)")
    f.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink started with --insecure)")
    f.add_argument("--default", action="store_true", help="make it the default connection")
    f.set_defaults(func=cmd_federation)
