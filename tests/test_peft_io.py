"""PEFT export: what save_peft_adapter writes, peft's PeftModel.from_pretrained loads into the same function
that fedlora computes with load_adapter_state, for LoRA, LoRA-SB (as (B R, A)), FLoRA's merged factors and
FedEx-LoRA's folded residual beside its adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from fedlora import naming
from fedlora.adapters import adapter_layers, adapter_state, inject_adapters, load_adapter_state
from fedlora.adapters.peft_io import save_peft_adapter, to_peft
from fedlora.config import FedLoraConfig

LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
HEAD = ["classifier.weight", "classifier.bias"]
RANK, ALPHA = 4, 6.0  # scaling 1.5, not 1: a dropped or doubled scaling shows up
HIDDEN = 32


def _base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _adapted(mode: str) -> nn.Module:
    model = _base()
    inject_adapters(model, ["query", "value"], rank=RANK, alpha=ALPHA, mode=mode, head=["classifier"])
    return model.eval()


def _cfg() -> FedLoraConfig:
    cfg = FedLoraConfig()
    cfg.adapter.rank, cfg.adapter.alpha = RANK, ALPHA
    return cfg


def _random_head(state: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    for name in HEAD:
        state[name] = torch.randn(state[name].shape, generator=gen)


def _lora_state(mode: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = adapter_state(_adapted(mode))
    for name in list(state):
        if not naming.is_extra(name):
            state[name] = torch.randn(state[name].shape, generator=gen) * 0.5
    _random_head(state, gen)
    return state


def _flora_state(gen: torch.Generator, m: int = 5) -> dict[str, torch.Tensor]:
    state = {name: t for name, t in adapter_state(_adapted("lora")).items() if naming.is_extra(name)}
    _random_head(state, gen)
    for layer in LAYERS:
        state[naming.key(layer, "MA")] = torch.randn(m, HIDDEN, generator=gen) * 0.3
        state[naming.key(layer, "MB")] = torch.randn(HIDDEN, m, generator=gen) * 0.3
    return state


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(_base(), str(folder)).eval()
    wrapped = [n for n, mod in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(wrapped) == len(LAYERS)  # every layer was adapted, none silently skipped
    return _logits(peft_model, ids)


def _ours(mode: str, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = _adapted(mode)
    load_adapter_state(model, state)
    return _logits(model, ids)


IDS = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_peft_loads_lora_and_sb_states_with_equal_logits(mode: str, tmp_path: Path) -> None:
    state = _lora_state(mode, torch.Generator().manual_seed(2))
    ours = _ours(mode, state, IDS)
    assert not torch.allclose(ours, _logits(_base(), IDS), atol=1e-3)  # the adapter changes the function

    folder = save_peft_adapter(state, _cfg(), tmp_path / "adapter")
    assert folder == tmp_path / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "tiny"

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    expected_keys = {f"base_model.model.{layer}.lora_{ab}.weight" for layer in LAYERS for ab in "AB"}
    expected_keys |= {f"base_model.model.{name}" for name in HEAD}
    assert set(tensors) == expected_keys
    layer = LAYERS[0]
    b = state[naming.key(layer, "B")]
    if mode == "sb":
        b = b @ state[naming.key(layer, "R")]
    assert tensors[f"base_model.model.{layer}.lora_A.weight"].shape == (RANK, HIDDEN)
    torch.testing.assert_close(tensors[f"base_model.model.{layer}.lora_B.weight"], b)
    torch.testing.assert_close(tensors["base_model.model.classifier.weight"], state["classifier.weight"])

    torch.testing.assert_close(_peft_logits(folder, IDS), ours, rtol=0, atol=1e-5)


def test_peft_loads_flora_merged_factors_with_scaling_one(tmp_path: Path) -> None:
    m = 5  # != RANK and != ALPHA: without rank_pattern the shapes, without alpha_pattern the scaling is off
    state = _flora_state(torch.Generator().manual_seed(3), m)
    ours = _ours("lora", state, IDS)  # fresh adapter (B = 0) on the merged base
    assert not torch.allclose(ours, _logits(_base(), IDS), atol=1e-3)

    tensors, config = to_peft(state, RANK, ALPHA)
    for layer in LAYERS:
        assert config["rank_pattern"][layer] == m
        assert config["alpha_pattern"][layer] == float(m)
        assert tensors[f"base_model.model.{layer}.lora_A.weight"].shape == (m, HIDDEN)
        assert tensors[f"base_model.model.{layer}.lora_B.weight"].shape == (HIDDEN, m)

    folder = save_peft_adapter(state, _cfg(), tmp_path / "flora")
    torch.testing.assert_close(_peft_logits(folder, IDS), ours, rtol=0, atol=1e-5)


def test_peft_loads_fedex_residual_and_adapter_as_one_lora(tmp_path: Path) -> None:
    m = 3  # the folded residual's width; the exported LoRA has rank m + RANK and scaling 1
    gen = torch.Generator().manual_seed(6)
    state = {**_lora_state("lora", gen), **_flora_state(gen, m)}
    ours = _ours("lora", state, IDS)  # the adapter on the base W0 + MB MA
    without_residual = _ours("lora", {k: v for k, v in state.items() if naming.split(k) is None
                                      or naming.split(k)[1] in ("A", "B")}, IDS)
    assert not torch.allclose(ours, without_residual, atol=1e-3)  # dropping either part shows
    assert not torch.allclose(ours, _ours("lora", _flora_state(torch.Generator().manual_seed(6), m), IDS), atol=1e-3)

    tensors, config = to_peft(state, RANK, ALPHA)
    layer = LAYERS[0]
    assert config["rank_pattern"][layer] == m + RANK and config["alpha_pattern"][layer] == float(m + RANK)
    b = tensors[f"base_model.model.{layer}.lora_B.weight"]
    torch.testing.assert_close(b[:, m:], ALPHA / RANK * state[naming.key(layer, "B")])

    folder = save_peft_adapter(state, _cfg(), tmp_path / "fedex")
    torch.testing.assert_close(_peft_logits(folder, IDS), ours, rtol=0, atol=1e-5)


def test_flora_layers_with_empty_update_are_skipped() -> None:
    state = _flora_state(torch.Generator().manual_seed(4))
    empty = LAYERS[0]
    state[naming.key(empty, "MA")] = torch.zeros(0, HIDDEN)
    state[naming.key(empty, "MB")] = torch.zeros(HIDDEN, 0)
    tensors, config = to_peft(state, RANK, ALPHA)
    assert not any(empty + "." in k for k in tensors)
    assert empty not in config["rank_pattern"]
    assert set(config["rank_pattern"]) == set(LAYERS[1:])


def test_peft_export_matches_a_peft_merge(tmp_path: Path) -> None:
    """merge_and_unload of the exported adapter gives base + s B A, the same dense update as ours."""
    state = _lora_state("lora", torch.Generator().manual_seed(5))
    folder = save_peft_adapter(state, _cfg(), tmp_path / "a")
    merged = PeftModel.from_pretrained(_base(), str(folder)).merge_and_unload()
    ours = _adapted("lora")
    load_adapter_state(ours, state)
    base = _base()
    for path, layer in adapter_layers(ours).items():
        want = base.get_submodule(path).weight + layer.delta_weight()
        torch.testing.assert_close(merged.get_submodule(path).weight, want, rtol=0, atol=1e-6)
