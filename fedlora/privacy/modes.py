"""Privacy modes as plug-ins: the protocol, the registry, and ``none``.

A mode has two hooks, one per side, and the state it must carry across rounds and restarts:
  client side  :meth:`PrivacyMode.client_train` wraps the local training (DP-SGD replaces the optimiser loop
               and spends the client's budget); its per-client state (an accountant) goes back to the
               ClientApp, which keeps it in ``context.state`` (and on disk under ``privacy.state-dir``).
  server side  :meth:`PrivacyMode.privatise` turns a round's validated updates into what the aggregator sees
               (DP-FedAvg clips and noises them); :meth:`state_dict` / :meth:`load_state_dict` carry its
               accountant, clip and noise generator through checkpoints, the way opacus' accountants do.
The strategy and the client call the hooks; neither knows which mode runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedlora.config import ConfigError, FedLoraConfig

if TYPE_CHECKING:
    from fedlora.aggregation import Aggregator, ClientUpdate
    from fedlora.tasks import Task
    from fedlora.tasks.base import Encoded


class BudgetExhausted(RuntimeError):
    """The next round would take this client past its privacy budget: it declines to train."""


class PrivacyMode:
    """Defaults = no privacy; a mode overrides the hooks it needs. ``client_state``: the mode keeps per-client
    state across rounds (the ClientApp persists it)."""

    name: ClassVar[str]
    client_state: ClassVar[bool] = False
    clips_updates: ClassVar[bool] = False  # the server hook bounds every update itself (a fixed DP clip)

    def __init__(self, cfg: FedLoraConfig) -> None:
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: FedLoraConfig, method: type[Aggregator]) -> None:
        """Raise ConfigError when this mode cannot run with ``cfg`` and ``method`` (checked at start-up)."""

    # -- client side ----------------------------------------------------------------------------------------
    def client_train(self, task: Task, model: torch.nn.Module, data: Encoded, seed: int,
                     state: dict | None = None) -> tuple[dict[str, float], dict | None]:
        """Train ``model`` on ``data`` for one round; returns (metrics, this client's new privacy state)."""
        from fedlora.train import optimise

        _, enc, targets = data
        losses, correct, counted = optimise(model, enc, targets, task.batch_loss, self.cfg.train, seed)
        return task.train_metrics(losses, correct, counted), None

    # -- server side ----------------------------------------------------------------------------------------
    def privatise(self, reference: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], num_nodes: int,
                  clients_sampled: int) -> tuple[list[ClientUpdate], dict[str, Any]]:
        """(the updates the aggregator sees, RoundStats fields to record); ``reference`` = the state clients
        started from."""
        return list(updates), {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty mapping = a fresh run)."""


_REGISTRY: dict[str, type[PrivacyMode]] = {}


def register(cls: type[PrivacyMode]) -> type[PrivacyMode]:
    if cls.name in _REGISTRY:
        raise ValueError(f"privacy mode {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def privacy_mode_class(name: str) -> type[PrivacyMode]:
    if name not in _REGISTRY:
        raise ConfigError(f"run-config privacy.mode={name!r} is not a privacy mode; choose one of {privacy_modes()}")
    return _REGISTRY[name]


def get_privacy_mode(cfg: FedLoraConfig) -> PrivacyMode:
    return privacy_mode_class(cfg.privacy.mode)(cfg)


def privacy_modes() -> list[str]:
    return sorted(_REGISTRY)


def needs_noise(cfg: FedLoraConfig) -> None:
    p = cfg.privacy
    if p.noise_multiplier == 0 and p.target_epsilon == 0 and not p.budgets():
        raise ConfigError(f"privacy.mode={p.mode!r} needs privacy.target-epsilon > 0 (or per-client "
                          "privacy.target-epsilons) or privacy.noise-multiplier > 0")


@register
class NoPrivacy(PrivacyMode):
    """Plain local training and plain aggregation."""

    name = "none"

    @classmethod
    def check_config(cls, cfg: FedLoraConfig, method: type[Aggregator]) -> None:
        cfg.check([(not cfg.privacy.adaptive_clip, "privacy.adaptive-clip", "applies to privacy.mode='client' only")])
