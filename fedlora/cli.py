"""``fedlora``: run a federation, compare methods, sweep privacy budgets, set up a deployment.

Deployment helpers make certificates, node keys and registrations; ``methods`` and ``config`` list the
aggregators and every run-config key with its default.

``fedlora run`` starts Flower's simulation engine (ray) in this process, with the same ServerApp and ClientApp
that ``flwr run .`` uses; ``--engine inprocess`` swaps ray for an in-process grid (fast, for debugging).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from fedlora.config import ConfigError, FedLoraConfig


def quiet_flower() -> None:
    """Keep Flower's own INFO logs out of the way; our per-round lines say what matters. flwr sets its logger to
    DEBUG when its logger module is imported, so import it first."""
    import flwr.supercore.logger  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.WARNING)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs as Flower's --run-config gives them (TOML-ish values: numbers, true/false, strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} must look like key=value, e.g. adapter.rank=8")
        k, v = pair.split("=", 1)
        v = v.strip().strip('"').strip("'")
        out[k.strip()] = v
    return out


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.set or [])
    for flag, key in (("method", "method.name"), ("model", "model.name"), ("data", "data.source"),
                      ("rounds", "num-server-rounds"), ("output", "output-dir"), ("seed", "seed")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    cfg = FedLoraConfig.from_run_config(overrides)  # validate early, with the CLI's error message
    return cfg.to_run_config()


def cmd_run(args: argparse.Namespace) -> int:
    run_config = build_config(args)
    from client.app import make_client_app
    from server.app import make_server_app

    server_app, client_app = make_server_app(run_config), make_client_app(run_config)
    if args.engine == "inprocess":
        from flwr.app import Context, RecordDict

        from fedlora.localgrid import LocalGrid

        grid = LocalGrid(client_app, args.num_clients)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        return 0
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    cpus = max(1.0, (os.cpu_count() or 1) / max(1, min(args.num_clients, args.parallel)))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.num_clients,
                   backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count() or 1}})
    return 0


def cmd_methods(_: argparse.Namespace) -> int:
    from fedlora.aggregation import available, get_aggregator

    for name in available():
        a = get_aggregator(name)
        print(f"{name:10s} mode={a.mode:4s} uploads={','.join(a.uploads):4s} frozen={','.join(a.frozen) or '-':4s}"
              f" heterogeneous-ranks={a.heterogeneous_ranks}")
    return 0


def cmd_config(_: argparse.Namespace) -> int:
    for k, v in FedLoraConfig().to_run_config().items():
        print(f"{k} = {v!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedlora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated fine-tuning simulation")
    run.add_argument("--method", help="aggregator (see `fedlora methods`), e.g. fedit, fedsvd, flexlora")
    run.add_argument("--model", help="tiny | minilm | local model folder")
    run.add_argument("--data", help="austen | local data folder")
    run.add_argument("--rounds", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--output", help="output folder (default runs/<method>-<time>)")
    run.add_argument("--num-clients", type=int, default=4)
    run.add_argument("--parallel", type=int, default=2, help="clients trained at once (simulation engine)")
    run.add_argument("--engine", choices=("simulation", "inprocess"), default="simulation")
    run.add_argument("--verbose", action="store_true", help="show Flower's own INFO logs")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key, e.g. adapter.rank=4")
    run.set_defaults(func=cmd_run)
    sub.add_parser("methods", help="list aggregation methods").set_defaults(func=cmd_methods)
    sub.add_parser("config", help="print every run-config key and its default").set_defaults(func=cmd_config)
    from fedlora.deploy.cli import add_commands as add_deploy_commands

    add_deploy_commands(sub)  # certs, node-keys, register-nodes, federation
    from simulations import compare, privacy_sweep  # here, not at the top: simulations imports fedlora.cli

    compare.add_arguments(sub.add_parser("compare", help="all methods side by side: accuracy, exactness, bytes"))
    privacy_sweep.add_arguments(sub.add_parser("sweep", help="accuracy vs privacy budget: target epsilons x methods"))
    args = p.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedlora").addHandler(handler)
    logging.getLogger("fedlora").propagate = False  # opacus configures the root logger: no double lines
    if not getattr(args, "verbose", False):
        quiet_flower()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fedlora: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
