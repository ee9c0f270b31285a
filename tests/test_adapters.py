"""The adapter layer and its injection: exactly the matched layers, exactly the trainable tensors, the exact
forward W0 x + s B (R) A x, and state that round-trips and merges without changing the model's function."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fedlora import naming
from fedlora.adapters import (
    LowRankLinear,
    adapter_layers,
    adapter_state,
    inject_adapters,
    load_adapter_state,
    merge_adapters,
    trainable_names,
)

BERT_LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
LLAMA_LAYERS = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
HEAD = ["classifier.weight", "classifier.bias"]
ROLES_TRAINED = {"lora": ("A", "B"), "ffa": ("B",), "sb": ("R",)}
RANK, ALPHA = 4, 6.0  # scaling 1.5: a wrong formula (alpha, 1/r, alpha*r) shows up


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _adapted(mode: str = "lora", rank: int = RANK, seed: int = 0) -> nn.Module:
    model = _bert(seed)
    inject_adapters(model, ["query", "value"], rank=rank, alpha=ALPHA, mode=mode, head=["classifier"])
    return model.eval()


def _randomise(model: nn.Module, gen: torch.Generator, head: bool = True) -> None:
    """Non-zero random A, B, R (and head), so no term of the forward can hide behind a zero."""
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for mod in (layer.lora_A, layer.lora_B, layer.lora_R):
                if mod is not None:
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.5)
        if head:
            for name in HEAD:
                p = model.get_parameter(name)
                p.copy_(torch.randn(p.shape, generator=gen))


def _inputs(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["lora", "ffa", "sb"])
def test_inject_wraps_exactly_the_targets_and_trains_exactly_the_mode_tensors(mode: str) -> None:
    model = _bert()
    wrapped = inject_adapters(model, ["query", "value"], rank=RANK, alpha=ALPHA, mode=mode, head=["classifier"])
    assert sorted(wrapped) == sorted(BERT_LAYERS)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LowRankLinear)) == sorted(BERT_LAYERS)
    # key, pooler, ffn and classifier stay plain nn.Linear
    assert isinstance(model.get_submodule("bert.encoder.layer.0.attention.self.key"), nn.Linear)
    assert type(model.get_submodule("classifier")) is nn.Linear
    expected = {naming.key(layer, r) for layer in BERT_LAYERS for r in ROLES_TRAINED[mode]} | set(HEAD)
    assert set(trainable_names(model)) == expected
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in expected), name


def test_inject_on_llama_q_v_without_head_trains_only_lora() -> None:
    model = _llama()
    wrapped = inject_adapters(model, ["q_proj", "v_proj"], rank=RANK, alpha=ALPHA, mode="lora")
    assert sorted(wrapped) == sorted(LLAMA_LAYERS)
    assert sorted(adapter_layers(model)) == sorted(LLAMA_LAYERS)
    expected = {naming.key(layer, r) for layer in LLAMA_LAYERS for r in ("A", "B")}
    assert set(trainable_names(model)) == expected
    assert not model.lm_head.weight.requires_grad
    assert not model.get_parameter("model.embed_tokens.weight").requires_grad
    # forward still works with the wrapped layers
    assert _logits(model, _inputs()).shape == (3, 7, 100)


def test_bad_target_pattern_lists_the_models_linear_layer_names() -> None:
    model = _bert()
    with pytest.raises(ValueError, match="qkv") as err:
        inject_adapters(model, ["qkv"], rank=RANK, alpha=ALPHA)
    for name in ("query", "key", "value", "dense", "classifier"):
        assert f"'{name}'" in str(err.value)
    assert not adapter_layers(model)


def test_unknown_head_raises() -> None:
    with pytest.raises(ValueError, match="nohead"):
        inject_adapters(_bert(), ["query"], rank=RANK, alpha=ALPHA, head=["nohead"])


@pytest.mark.parametrize("mode", ["lora", "ffa", "sb"])
def test_at_init_logits_equal_the_base_models_exactly(mode: str) -> None:
    base = _bert()
    adapted = copy.deepcopy(base)
    inject_adapters(adapted, ["query", "value"], rank=RANK, alpha=ALPHA, mode=mode, head=["classifier"])
    for layer in adapter_layers(adapted).values():
        assert layer.lora_A.weight.abs().sum() > 0  # A random, as peft
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        if mode == "sb":
            assert torch.count_nonzero(layer.lora_R.weight) == 0
    ids = _inputs()
    assert torch.equal(_logits(adapted.eval(), ids), _logits(base, ids))


@pytest.mark.parametrize("mode", ["lora", "ffa", "sb"])
def test_forward_is_w0x_plus_s_b_r_a_x(mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    base = nn.Linear(12, 10)
    layer = LowRankLinear(copy.deepcopy(base), rank=3, alpha=7.0, mode=mode)
    with torch.no_grad():
        a = torch.randn(3, 12, generator=gen)
        b = torch.randn(10, 3, generator=gen)
        r = torch.randn(3, 3, generator=gen)  # not symmetric: a transposed R fails
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        if mode == "sb":
            layer.lora_R.weight.copy_(r)
        else:
            assert layer.lora_R is None
        x = torch.randn(2, 5, 12, generator=gen)
        mid = r @ a if mode == "sb" else a
        want = x @ base.weight.T + base.bias + (7.0 / 3) * (x @ mid.T @ b.T)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        w_delta = (7.0 / 3) * b @ mid
        torch.testing.assert_close(layer.delta_weight(), w_delta, rtol=1e-5, atol=1e-6)


def test_bad_mode_and_rank_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        LowRankLinear(nn.Linear(4, 4), rank=2, alpha=1.0, mode="dora")
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(nn.Linear(4, 4), rank=0, alpha=1.0)


@pytest.mark.parametrize("mode", ["lora", "ffa", "sb"])
def test_state_round_trips_into_a_fresh_model(mode: str) -> None:
    src = _adapted(mode)
    _randomise(src, torch.Generator().manual_seed(5))
    state = adapter_state(src)
    roles = ("A", "B", "R") if mode == "sb" else ("A", "B")
    assert list(state) == [naming.key(layer, r) for layer in BERT_LAYERS for r in roles] + HEAD
    assert all(t.dtype == torch.float32 for t in state.values())

    dst = _adapted(mode)  # same base weights (same seed), fresh adapters and head
    _randomise(dst, torch.Generator().manual_seed(6))  # so that a no-op load would be noticed
    ids = _inputs()
    assert not torch.allclose(_logits(dst, ids), _logits(src, ids))
    load_adapter_state(dst, state)
    assert torch.equal(_logits(dst, ids), _logits(src, ids))
    for name, t in adapter_state(dst).items():
        assert torch.equal(t, state[name]), name

    # the state is a copy: changing it afterwards does not touch the model
    next(iter(state.values())).add_(1.0)
    assert torch.equal(_logits(dst, ids), _logits(src, ids))


def test_load_rejects_wrong_shape_and_unknown_names() -> None:
    model = _adapted("lora")
    a = naming.key(BERT_LAYERS[0], "A")
    with pytest.raises(ValueError, match=re.escape(a)):
        load_adapter_state(model, {a: torch.zeros(RANK + 1, 32)})
    with pytest.raises(ValueError, match="classifier.weight"):
        load_adapter_state(model, {"classifier.weight": torch.zeros(2, 32)})
    ghost = naming.key("bert.encoder.layer.9.attention.self.query", "A")
    with pytest.raises(KeyError, match=re.escape(ghost)):
        load_adapter_state(model, {ghost: torch.zeros(RANK, 32)})
    with pytest.raises(KeyError, match="not.a.param"):
        load_adapter_state(model, {"not.a.param": torch.zeros(1)})
    r = naming.key(BERT_LAYERS[0], "R")  # lora mode has no R
    with pytest.raises(KeyError, match=re.escape(r)):
        load_adapter_state(model, {r: torch.zeros(RANK, RANK)})


def test_merged_factors_are_added_to_the_base_weight() -> None:
    model = _adapted("lora")
    gen = torch.Generator().manual_seed(7)
    layer = BERT_LAYERS[1]
    w0 = model.get_submodule(layer).base.weight.detach().clone()
    ma, mb = torch.randn(5, 32, generator=gen), torch.randn(32, 5, generator=gen)  # m = 5 != rank
    load_adapter_state(model, {naming.key(layer, "MA"): ma, naming.key(layer, "MB"): mb})
    torch.testing.assert_close(model.get_submodule(layer).base.weight, w0 + mb @ ma, rtol=0, atol=1e-6)
    other = model.get_submodule(BERT_LAYERS[0]).base.weight
    assert torch.equal(other, _bert().get_submodule(BERT_LAYERS[0]).weight)

    # an empty merge (m = 0, FLoRA's initial state) leaves the weight alone
    before = model.get_submodule(layer).base.weight.detach().clone()
    empty = {naming.key(layer, "MA"): torch.zeros(0, 32), naming.key(layer, "MB"): torch.zeros(32, 0)}
    load_adapter_state(model, empty)
    assert torch.equal(model.get_submodule(layer).base.weight, before)

    with pytest.raises(KeyError, match="merged_A and merged_B"):
        load_adapter_state(model, {naming.key(layer, "MA"): ma})
    with pytest.raises(ValueError, match=re.escape(naming.key(layer, "MA"))):
        load_adapter_state(model, {naming.key(layer, "MA"): torch.zeros(5, 31), naming.key(layer, "MB"): mb})
    with pytest.raises(ValueError, match=re.escape(naming.key(layer, "MB"))):
        load_adapter_state(model, {naming.key(layer, "MA"): ma, naming.key(layer, "MB"): torch.zeros(32, 4)})
    assert torch.equal(model.get_submodule(layer).base.weight, before)  # a rejected merge changes nothing


@pytest.mark.parametrize("mode", ["lora", "ffa", "sb"])
def test_merge_keeps_logits_and_restores_plain_linear(mode: str) -> None:
    model = _adapted(mode)
    _randomise(model, torch.Generator().manual_seed(8))
    ids = _inputs()
    before = _logits(model, ids)
    assert not torch.allclose(before, _logits(_bert(), ids), atol=1e-3)  # the adapters do something
    merged = merge_adapters(model)
    assert merged is model
    assert not adapter_layers(model)
    for name in BERT_LAYERS:
        assert type(model.get_submodule(name)) is nn.Linear
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 8])
def test_heterogeneous_ranks_give_state_of_their_rank(rank: int) -> None:
    model = _adapted("lora", rank=rank)
    state = adapter_state(model)
    for layer in BERT_LAYERS:
        assert state[naming.key(layer, "A")].shape == (rank, 32)
        assert state[naming.key(layer, "B")].shape == (32, rank)
        assert model.get_submodule(layer).scaling == pytest.approx(ALPHA / rank)
    sb = adapter_state(_adapted("sb", rank=rank))
    assert sb[naming.key(BERT_LAYERS[0], "R")].shape == (rank, rank)
    assert _logits(model, _inputs()).shape == (3, 3)


@pytest.mark.parametrize("mode", ["lora", "ffa", "sb"])
def test_gradients_reach_only_the_trainable_tensors(mode: str) -> None:
    model = _adapted(mode)
    _randomise(model, torch.Generator().manual_seed(9))
    model.train()
    out = model(input_ids=_inputs(), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    trainable = set(trainable_names(model))
    assert trainable == {naming.key(layer, r) for layer in BERT_LAYERS for r in ROLES_TRAINED[mode]} | set(HEAD)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
