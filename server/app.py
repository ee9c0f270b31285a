"""The Flower ServerApp: read the run config, hand the Grid to fedlora's server loop."""

from __future__ import annotations

import logging
from typing import Any

import torch  # noqa: F401  (flwr's ArrayRecord <-> torch conversion needs torch imported: docs/flower-notes.md note 7)
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import FedLoraConfig
from fedlora.server import run_server


def make_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``.

    Overrides exist because Flower's Python simulation entry point hands apps an empty run config.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedlora").setLevel(logging.INFO)
        cfg = FedLoraConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_server(grid, cfg)

    return app


app = make_server_app()
