"""Low-rank adapters: the layer, injection by name patterns, state extract/load/merge, PEFT export."""

from fedlora.adapters.inject import adapter_layers, inject_adapters, matches, trainable_names
from fedlora.adapters.layer import MODES, TRAINABLE, LowRankLinear
from fedlora.adapters.state import (
    adapter_state,
    head_names,
    load_adapter_state,
    merge_adapters,
    reset_adapters,
    set_trainable,
)

__all__ = [
    "MODES",
    "TRAINABLE",
    "LowRankLinear",
    "adapter_layers",
    "adapter_state",
    "head_names",
    "inject_adapters",
    "load_adapter_state",
    "matches",
    "merge_adapters",
    "reset_adapters",
    "set_trainable",
    "trainable_names",
]
