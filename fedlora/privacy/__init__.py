"""Differential privacy as registered modes (``privacy.mode``): ``none``, ``sample`` (DP-SGD on each client
through opacus, record-level, with a persistent per-client accountant) and ``client`` (DP-FedAvg).

The modes are imported eagerly (they import no opacus); the opacus-backed names below are resolved lazily, so
the config checks do not pay for importing opacus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlora.privacy import client_level, sample_level  # noqa: F401  (register)
from fedlora.privacy.modes import (
    BudgetExhausted,
    PrivacyMode,
    get_privacy_mode,
    privacy_mode_class,
    privacy_modes,
)

if TYPE_CHECKING:
    from fedlora.privacy.accountant import ClientAccountant, load_state_file, noise_for_budget, save_state_file
    from fedlora.privacy.dpsgd import dp_session, privatised_gradient, train_local_dp

_EXPORTS = {
    "ClientAccountant": "fedlora.privacy.accountant",
    "load_state_file": "fedlora.privacy.accountant",
    "noise_for_budget": "fedlora.privacy.accountant",
    "save_state_file": "fedlora.privacy.accountant",
    "dp_session": "fedlora.privacy.dpsgd",
    "privatised_gradient": "fedlora.privacy.dpsgd",
    "train_local_dp": "fedlora.privacy.dpsgd",
}

__all__ = [
    "BudgetExhausted",
    "PrivacyMode",
    "get_privacy_mode",
    "privacy_mode_class",
    "privacy_modes",
    "ClientAccountant",
    "dp_session",
    "load_state_file",
    "noise_for_budget",
    "privatised_gradient",
    "save_state_file",
    "train_local_dp",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
