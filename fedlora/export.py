"""Export the global result as a plain transformers model: base + update merged, saved with save_pretrained.

The peft adapter (``adapter/``) is the small artefact; this is the one to serve without fedlora or peft:
``AutoModelForSequenceClassification.from_pretrained(folder)``. Every method's state maps onto it (FLoRA's merged
factors, FedEx-LoRA's folded residual and adapter, Fed-SB's B R A, the head), because the adapters are folded into
the base weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.adapters import load_adapter_state, merge_adapters
from fedlora.aggregation import Aggregator
from fedlora.config import FedLoraConfig
from fedlora.tasks import get_task


def merged_model(cfg: FedLoraConfig, agg: Aggregator, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    # A quantised run's adapter merges onto the full-precision base (the quantised weights are never exported).
    model = get_task(cfg).build_model(agg.mode, cfg.adapter.rank, quantization="none")
    load_adapter_state(model, agg.client_payload(state, cfg.adapter.rank))
    return merge_adapters(model)


def save_merged_model(cfg: FedLoraConfig, agg: Aggregator, state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    folder = Path(folder)
    merged_model(cfg, agg, state).save_pretrained(folder)
    get_task(cfg).tokenizer().save_pretrained(folder)
    return folder
