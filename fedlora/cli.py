"""``fedlora``: run a federation, compare methods, sweep privacy budgets, set up a deployment.

Deployment helpers make certificates, node keys and registrations; ``methods`` and ``config`` list the
aggregators and every run-config key with its default.

``fedlora run`` starts a private local Flower SuperLink in simulation mode (ray), submits the same ServerApp and
ClientApp that ``flwr run .`` uses, streams the run's log and stops the SuperLink afterwards (fedlora/engine.py);
``--ray-address`` runs the clients on an existing Ray cluster instead of a private Ray (fedlora/raycluster.py);
``--engine inprocess`` swaps Flower's runtime for an in-process grid (fast, for debugging).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from fedlora.config import ConfigError, FedLoraConfig, app_config_toml
from fedlora.tasks import preflight


def quiet_flower() -> None:
    """Keep Flower's own INFO logs out of the way; our per-round lines say what matters. flwr sets its logger to
    DEBUG when its logger module is imported, so import it first."""
    import flwr.supercore.logger  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.WARNING)


_SCALARS = (bool, int, float, str)


def parse_override(pair: str, flag: str = "--set") -> dict[str, Any]:
    """One ``key=value`` pair, typed by Flower's own ``--run-config`` parser (TOML values: 8 -> int, 1e-5 -> float,
    true -> bool, "a b" -> str). A value that is not valid TOML (``query,value``, ``4,8,16``, ``fedsvd``) is taken
    as the string it is written as, so lists and names need no quotes."""
    import click
    from flwr.common.config import parse_config_args

    if "=" not in pair:
        raise ConfigError(f"{flag} {pair!r} must look like key=value, e.g. {flag} adapter.rank=8")
    key, raw = (s.strip() for s in pair.split("=", 1))
    if not key:
        raise ConfigError(f"{flag} {pair!r} has no key before '=', e.g. {flag} adapter.rank=8")
    try:
        parsed = parse_config_args([f"{key}={raw}"])
    except (click.ClickException, ValueError):
        parsed = {}
    if set(parsed) == {key} and isinstance(parsed[key], _SCALARS):
        return parsed
    # Not one TOML scalar (a comma list, a bare word, a date...): the text itself, outer quotes removed.
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    return {key: raw}


def parse_overrides(pairs: list[str], flag: str = "--set") -> dict[str, Any]:
    """``key=value`` pairs as Flower's ``--run-config`` types them (see :func:`parse_override`); later pairs win."""
    out: dict[str, Any] = {}
    for pair in pairs:
        out.update(parse_override(pair, flag))
    return out


def resolve_config(args: argparse.Namespace) -> FedLoraConfig:
    """The run's validated config: ``--set`` pairs, then the dedicated flags."""
    overrides = parse_overrides(args.set or [])
    for flag, key in (("method", "method.name"), ("model", "model.name"), ("data", "data.source"),
                      ("rounds", "num-server-rounds"), ("output", "output-dir"), ("seed", "seed")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return FedLoraConfig.from_run_config(overrides)  # validate early, with the CLI's error message


def cmd_run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.num_clients < 1:
        raise ConfigError(f"--num-clients {args.num_clients} must be >= 1")
    if args.parallel < 1:
        raise ConfigError(f"--parallel {args.parallel} must be >= 1")
    address, source = ray_address(args)
    check_gpus_per_client(args.gpus_per_client, args.engine, cfg.train.device, on_cluster=address is not None)
    preflight(cfg, args.num_clients)  # data that cannot be split: ConfigError (exit status 2) before any engine starts
    run_config = cfg.to_run_config()
    if args.engine == "inprocess":
        return run_inprocess(run_config, args)
    from fedlora import engine, raycluster

    cluster = None
    if address is not None:  # reachable, and its nodes' CPUs / GPUs, before any engine starts (exit status 2)
        cluster = raycluster.connect(address, source)
        raycluster.check_gpus(cluster, args.gpus_per_client)
        per_client = raycluster.cpus_per_client(cluster.node_cpus, min(args.num_clients, args.parallel))
        print(f"fedlora: {cluster.describe(per_client)}", flush=True)
    try:
        result = engine.run_simulation_app(run_config, FedLoraConfig().to_run_config(), args.num_clients,
                                           args.parallel, verbose=args.verbose, gpus_per_client=args.gpus_per_client,
                                           cluster=cluster)
    except engine.EngineError as e:
        print(f"fedlora: could not run the simulation: {e}", file=sys.stderr)
        return 1
    if result.ok:
        if result.errors and result.log_path:
            print(f"fedlora: Flower logged errors during the run, not shown here (the first: "
                  f"{result.first_error or 'see the log'}); full log: {result.log_path}", file=sys.stderr)
        return 0
    where = f"; full log: {result.log_path}" if result.log_path else ""
    print(f"fedlora: {result.failure()}{where}", file=sys.stderr)
    return 1


def ray_address(args: argparse.Namespace) -> tuple[str | None, str]:
    """The Ray cluster to run on (fedlora/raycluster.py): ``--ray-address``, else ``RAY_ADDRESS`` (Ray's own
    variable, also set in a Ray job's entrypoint); None: a private Ray. The in-process engine has no Ray, so the
    flag is an error there and the variable is ignored."""
    from fedlora.raycluster import resolve_address

    flag = getattr(args, "ray_address", None)
    if args.engine != "simulation":
        if flag is not None:
            raise ConfigError(f"--ray-address applies to --engine simulation (ray); --engine {args.engine} has no "
                              "ray: drop the flag")
        return None, ""
    return resolve_address(flag)


def check_gpus_per_client(fraction: float, engine: str, device: str = "auto", on_cluster: bool = False) -> None:
    """--gpus-per-client: a share of one GPU in (0, 1], or a whole number of GPUs; only where a GPU is visible
    (here, or on a Ray cluster's nodes: fedlora.raycluster.check_gpus asks them). Without it a ray simulation sees
    no GPU (fedlora.engine), so train.device=cuda there needs it."""
    if fraction == 0:
        if engine == "simulation" and device.startswith("cuda"):
            raise ConfigError(f"train.device={device!r} in a ray simulation needs GPUs for the clients: add "
                              "--gpus-per-client F (e.g. 0.25: four clients per GPU), or use --engine inprocess")
        return
    if fraction < 0 or (fraction > 1 and not float(fraction).is_integer()):
        raise ConfigError(f"--gpus-per-client {fraction:g} must be a share of one GPU in (0, 1] (0.25 = four "
                          "clients per GPU) or a whole number of GPUs")
    if engine != "simulation":
        raise ConfigError(f"--gpus-per-client applies to --engine simulation (ray); --engine {engine} trains on "
                          "train.device directly")
    if on_cluster:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--gpus-per-client {fraction:g}: no CUDA device is visible here; drop the flag to train "
                          "on the CPU")


def run_inprocess(run_config: dict[str, Any], args: argparse.Namespace) -> int:
    """The same apps on fedlora's in-process Grid (fedlora/localgrid.py): no Flower runtime, no ray."""
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from fedlora.localgrid import LocalGrid
    from server.app import make_server_app

    server_app, client_app = make_server_app(run_config), make_client_app(run_config)
    grid = LocalGrid(client_app, args.num_clients)
    try:
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    except ConfigError:
        raise
    except Exception as e:
        if args.verbose:
            raise
        print(f"fedlora: run failed: {type(e).__name__}: {e} (--verbose shows the traceback)", file=sys.stderr)
        return 1
    return 0


def cmd_methods(_: argparse.Namespace) -> int:
    import dataclasses

    from fedlora.aggregation import aggregator_class, available

    for name in available():
        a = aggregator_class(name)
        options = ",".join(f"method.{f.name.replace('_', '-')}" for f in dataclasses.fields(a.Options)) or "-"
        print(f"{name:10s} mode={a.mode:4s} uploads={','.join(a.uploads):4s} frozen={','.join(a.frozen) or '-':4s}"
              f" heterogeneous-ranks={str(a.heterogeneous_ranks):5s} linear={str(a.linear):5s} options={options}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.toml:  # the [tool.flwr.app.config] table of pyproject.toml, generated from the dataclasses
        print(app_config_toml(), end="")
        return 0
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
    run.add_argument("--gpus-per-client", type=float, default=0.0, metavar="F",
                     help="simulation: each client holds F of a GPU (0.25 = four per GPU; client-resources-num-gpus)")
    run.add_argument("--ray-address", metavar="HOST:PORT",
                     help="simulation: run on this existing Ray cluster (its head's address from `ray start --head`; "
                          "auto: the latest on this machine; default $RAY_ADDRESS; local: a private Ray)")
    run.add_argument("--verbose", action="store_true", help="show Flower's own INFO logs and full tracebacks")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key, e.g. adapter.rank=4")
    run.set_defaults(func=cmd_run)
    sub.add_parser("methods", help="list aggregation methods").set_defaults(func=cmd_methods)
    config = sub.add_parser("config", help="print every run-config key and its default")
    config.add_argument("--toml", action="store_true", help="as pyproject.toml's [tool.flwr.app.config] table "
                        "(paste it there after adding a key or a method option)")
    config.set_defaults(func=cmd_config)
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
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM during a simulation): the engine has stopped its SuperLink
        print("fedlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
