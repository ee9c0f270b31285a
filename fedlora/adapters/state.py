"""Extract, load and merge adapter state as ordered dicts of named tensors (names: :mod:`fedlora.naming`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from fedlora import naming
from fedlora.adapters.inject import adapter_layers
from fedlora.adapters.layer import LowRankLinear

_ATTR = {"A": "lora_A", "B": "lora_B", "R": "lora_R"}


def adapter_state(
    model: nn.Module, roles: Iterable[str] = ("A", "B", "R"), extras: bool = True
) -> OrderedDict[str, torch.Tensor]:
    """Adapter tensors of the given roles for every adapted layer, plus the trainable head ("extras").

    Tensors are detached float32 copies on the CPU, so the caller can ship, aggregate or keep them without
    aliasing the model: this is where adapter tensors leave a GPU.
    """
    roles = tuple(roles)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for path, layer in adapter_layers(model).items():
        for role in roles:
            mod = getattr(layer, _ATTR[role])
            if mod is not None:
                out[naming.key(path, role)] = mod.weight.detach().to("cpu", torch.float32, copy=True)
    if extras:
        for name in head_names(model):
            out[name] = model.get_parameter(name).detach().to("cpu", torch.float32, copy=True)
    return out


def head_names(model: nn.Module) -> list[str]:
    """Trainable parameters that are not adapter factors: the task head (peft's ``modules_to_save``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and naming.is_extra(n)]


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy named tensors into the model.

    A/B/R go into the adapter layers; extras into the matching parameters; merged factors (MA, MB: FLoRA,
    FedEx-LoRA) are ADDED to the wrapped base weight, so call this once on a freshly built model.
    Unknown names or wrong shapes raise, naming the tensor: silent partial loads hide bugs.
    """
    layers = adapter_layers(model)
    merged: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, t in tensors.items():
            s = naming.split(name)
            if s is None:
                try:
                    target = model.get_parameter(name)
                except AttributeError as e:
                    raise KeyError(f"tensor {name!r} has no matching parameter in the model") from e
            else:
                path, role = s
                if path not in layers:
                    raise KeyError(f"tensor {name!r}: no adapted layer {path!r} in the model")
                if role in ("MA", "MB"):
                    merged.setdefault(path, {})[role] = t
                    continue
                mod = getattr(layers[path], _ATTR[role])
                if mod is None:
                    raise KeyError(f"tensor {name!r}: layer {path!r} (mode {layers[path].mode}) has no {role}")
                target = mod.weight
            if tuple(target.shape) != tuple(t.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(t.to(target.dtype))
        for path, f in merged.items():
            if set(f) != {"MA", "MB"}:
                raise KeyError(f"layer {path!r}: merged_A and merged_B must come together")
            d_out, d_in = layers[path].out_features, layers[path].in_features
            m = f["MA"].shape[0] if f["MA"].dim() else -1
            for role, want in (("MA", (m, d_in)), ("MB", (d_out, m))):
                if tuple(f[role].shape) != want:
                    raise ValueError(f"tensor {naming.key(path, role)!r} has shape {tuple(f[role].shape)}, "
                                     f"the model expects {want}")
            if f["MA"].shape[0]:
                layers[path].add_merged(f["MB"], f["MA"])


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W <- W + s B (R) A) and put the plain ``nn.Linear`` back."""
    for path, layer in adapter_layers(model).items():
        if layer.quantized_base:
            raise ValueError(f"layer {path!r} has a quantised base: merge onto the full-precision base (build the "
                             "model with model.quantization=none)")
        with torch.no_grad():
            layer.base.weight.add_(layer.delta_weight().to(layer.base.weight.dtype))
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


def set_trainable(model: nn.Module, roles: Iterable[str]) -> None:
    """Train only the adapter factors of ``roles`` in every adapted layer (the head is left as it is)."""
    roles = tuple(roles)
    for layer in adapter_layers(model).values():
        assert isinstance(layer, LowRankLinear)
        layer.set_trainable(roles)


def reset_adapters(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Fresh peft-style init (A random, B = 0) in every adapted layer; FLoRA clients do this each round."""
    for layer in adapter_layers(model).values():
        assert isinstance(layer, LowRankLinear)
        layer.reset_adapter(generator)
