"""Frozen-prefix caching (``train.cache-frozen-layers``): train only the encoder layers from the first adapted one.

With adapters on the top layers only (``adapter.target-modules`` as a regex, e.g.
``.*layer\\.(4|5)\\..*(query|value)``), the embeddings and the encoder layers below the first adapted one are
frozen and see the same inputs every step: their output for a client's data is the same all run (the base never
changes, and merged factors, FLoRA's or FedEx-LoRA's, sit on adapted layers only). So it is computed once per process
for the client's data, and each training step runs only the layers above (docs/privacy.md: what makes DP-SGD's many
example-gradients affordable on a CPU).

How: the cached hidden states go in as ``inputs_embeds``; while a step runs, the backbone's embeddings are a
pass-through and its ``encoder.layer`` list holds only the layers from L on, so the model's own forward builds the
attention mask, runs those layers, the pooler and the head, and opacus' hooks on the adapters fire as usual. The
prefix is computed in eval mode: the frozen lower layers run without dropout (the one difference from uncached
training; with dropout 0 the two are the same, tests/test_prefix.py). BERT-family backbones
(``base_model.embeddings`` + ``base_model.encoder.layer``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedlora.adapters import adapter_layers

_LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")
# (id of the client's CPU encoding, L) -> (the encoding, kept so the id stays unique, and the inputs from L on), least
# recently used first; at most CACHE_BYTES of hidden states per process (a ray actor serves many clients).
_CACHE: OrderedDict[tuple[int, int], tuple[object, dict[str, torch.Tensor]]] = OrderedDict()
CACHE_BYTES = 4 << 30


class _PassThrough(nn.Module):
    """Stands in for the embeddings: the cached hidden states (``inputs_embeds``) are already layer L's input."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return inputs_embeds


def _layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "embeddings"):
        raise ValueError(f"train.cache-frozen-layers=true needs a BERT-family backbone (embeddings + encoder.layer); "
                         f"{type(model).__name__} has none: set train.cache-frozen-layers=false")
    return layers


def first_trained_layer(model: nn.Module) -> int:
    """Index L of the lowest encoder layer that holds an adapter; everything below is frozen."""
    _layers(model)
    found = [int(m.group(1)) for path in adapter_layers(model) if (m := _LAYER.search("." + path + "."))]
    if len(found) != len(adapter_layers(model)):
        raise ValueError("train.cache-frozen-layers=true: an adapter sits outside the encoder layers; adapt encoder "
                         "layers only, or set train.cache-frozen-layers=false")
    if not found or min(found) == 0:
        raise ValueError("train.cache-frozen-layers=true: the adapters start at encoder layer 0, so no layer is frozen "
                         "below them; put them on the top layers (adapter.target-modules regex, e.g. "
                         "'.*layer\\.(4|5)\\..*(query|value)') or set train.cache-frozen-layers=false")
    for name, p in model.named_parameters():
        m = _LAYER.search("." + name + ".")
        below = (m is not None and int(m.group(1)) < min(found)) or ".embeddings." in "." + name
        if below and p.requires_grad:
            raise ValueError(f"train.cache-frozen-layers=true: {name} trains but lies below the first adapted layer")
    return min(found)


@torch.no_grad()
def prefix_inputs(model: nn.Module, enc: dict[str, torch.Tensor], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``{"inputs_embeds": hidden states entering layer L, "attention_mask": ...}`` (on the CPU, as ``enc``) for
    every example of the CPU encoding ``enc``, computed once per process (eval mode) and then reused."""
    start = first_trained_layer(model)
    model.fedlora_prefix_start = start  # read by the task's loss (an int attribute: no module, no parameter)
    key = (id(enc), start)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key][1]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hidden = []
    n = len(enc["input_ids"])
    for i in range(0, n, batch_size):
        chunk = {k: v[i:i + batch_size].to(device) for k, v in enc.items()}
        hidden.append(model.base_model(**chunk, output_hidden_states=True).hidden_states[start].float().cpu())
    model.train(was_training)
    out = {"inputs_embeds": torch.cat(hidden), "attention_mask": enc["attention_mask"]}
    _CACHE[key] = (enc, out)
    while len(_CACHE) > 1 and sum(v[1]["inputs_embeds"].nbytes for v in _CACHE.values()) > CACHE_BYTES:
        _CACHE.popitem(last=False)
    return out


@contextmanager
def from_layer(model: nn.Module, start: int) -> Iterator[None]:
    """While inside: the model's forward takes layer ``start``'s input as ``inputs_embeds`` and runs only the layers
    from ``start`` on (then the pooler and the head)."""
    base = model.base_model
    layers, embeddings = base.encoder.layer, base.embeddings
    base.embeddings = _PassThrough()
    base.encoder.layer = nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        base.embeddings, base.encoder.layer = embeddings, layers
