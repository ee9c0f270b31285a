"""A quantised frozen base (``model.quantization`` = nf4 | fp4 | int8, bitsandbytes on the CPU): what is quantised
and what is not, that the quantised model computes exactly with its dequantised weights (forward and backward),
the size of the quantisation error per scheme, that only adapters and the head train and travel, FLoRA's merged
factors beside a quantised base, export onto the full-precision base, a federation, config errors and DP-SGD.

Every model here runs on the CPU (``train.device=cpu``): the path CI runs, and the one these numbers describe.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from fedlora import naming
from fedlora.adapters import adapter_layers, adapter_state, load_adapter_state, merge_adapters
from fedlora.adapters.peft_io import save_peft_adapter
from fedlora.components import make_aggregator
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.tasks import get_task
from fedlora.train import optimise

bnb = pytest.importorskip("bitsandbytes", reason="model.quantization needs the optional extra: pip install "
                                                 "'fedlora[quant]' (bitsandbytes>=0.50)")

SCHEMES = ("nf4", "fp4", "int8")
TASKS = ("classification", "causal_lm")
HEAD = {"classification": "classifier", "causal_lm": "lm_head"}
BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)

# Relative Frobenius error ||deq(Q(W)) - W|| / ||W|| of one layer's weight. The tiny models' weights are N(0, 0.02^2)
# (transformers' init), for which bitsandbytes gives, measured on torch.randn matrices: nf4 0.092, fp4 0.122 (blocks
# of 64 with their own absmax), int8 0.006 (LLM.int8: one absmax per output row, 127 levels). The bands allow for
# the spread over a few thousand weights per layer and nothing more: a wrong block size, absmax or data type
# lands outside them.
WEIGHT_ERROR = {"nf4": (0.08, 0.105), "fp4": (0.11, 0.135), "int8": (0.003, 0.01)}
# The logits' relative Frobenius error against the full-precision model with the same adapters. The quantised
# layers lie in series, their errors independent in sign and damped by each LayerNorm/RMSNorm, so the logits' error
# stays near one layer's (0.4-1x of it measured). Bound: 2.5x the nominal per-layer error. A model with no quantised
# layer, or one that lost its adapters or quantised the wrong tensors, is off by O(1) or 0.
LOGIT_ERROR = {"nf4": (1e-4, 0.25), "fp4": (1e-4, 0.30), "int8": (1e-4, 0.02)}
# 4-bit layers need in_features % 64 == 0 (fedlora.quantize.BLOCK: bitsandbytes' CPU kernels assume blocks within a
# row). The tiny LLaMA is 32 wide but for down_proj (64 -> 32), so its causal-LM tests put the adapters there: every
# adapter layer sits on a quantised base for every scheme (4-bit leaves the 32-wide layers in full precision).
CAUSAL_TARGETS = "down_proj"


def _cfg(task: str = "classification", scheme: str = "none", **overrides) -> FedLoraConfig:
    targets = {"adapter.target-modules": CAUSAL_TARGETS} if task == "causal_lm" else {}
    return FedLoraConfig.from_run_config({"model.task": task, "model.quantization": scheme, "adapter.rank": 4,
                                          "train.device": "cpu", "model.max-length": 32, **targets, **overrides})


def _build(task: str, scheme: str, mode: str = "lora", rank: int = 4, **overrides) -> nn.Module:
    return get_task(_cfg(task, scheme, **overrides)).build_model(mode, rank)


def _quantised(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BNB_LAYERS)}


def _int8_scale(layer: nn.Module) -> torch.Tensor:
    """LLM.int8's per-row absmax; the first forward moves it from the weight to the layer's state."""
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    assert scb is not None
    return scb


def _dequantised(layer: nn.Module) -> torch.Tensor:
    """The float weight (d_out, d_in) the layer computes with, read back from its packed storage."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data.float() * _int8_scale(layer)[:, None] / 127


def _frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored byte of the base: packed weights, their scales, and every other frozen parameter."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for name, layer in _quantised(model).items():
        if isinstance(layer, bnb.nn.Linear4bit):
            qs = layer.weight.quant_state
            out[f"{name}.absmax"] = qs.absmax.clone()
            if qs.nested:
                out[f"{name}.absmax2"] = qs.state2.absmax.clone()
        else:
            out[f"{name}.SCB"] = _int8_scale(layer).clone()
    return out


def _assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = _frozen_snapshot(model)
    assert now.keys() == snapshot.keys()
    for name, t in snapshot.items():
        assert now[name].dtype == t.dtype and torch.equal(now[name], t), name


def _random_state(model: nn.Module, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random values for every adapter tensor and the head (B != 0, so every factor gets a gradient)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in adapter_state(model).items()}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 4000, (4, 16), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a - ref).norm() / ref.norm())


def _twin(task: str, quantised: nn.Module, mode: str = "lora") -> nn.Module:
    """The full-precision model with every quantised layer's weight replaced by the one that layer computes with."""
    twin = _build(task, "none", mode)
    with torch.no_grad():
        for name, layer in _quantised(quantised).items():
            twin.get_submodule(name).weight.copy_(_dequantised(layer))
    return twin


def _train_data(task: str):
    """~20 training examples, one full batch per step: each step descends the same loss."""
    t = get_task(_cfg(task))
    return t.client_data("train", 0, 128)


# -- what build_model builds -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_build_model_quantises_every_base_linear_but_the_head(task, scheme) -> None:
    from fedlora.quantize import quantized_bytes

    full = get_task(_cfg(task, scheme)).build_model("lora", 4, quantization="none")  # the override wins
    model = _build(task, scheme)
    assert not _quantised(full)
    linear = {n: m for n, m in full.named_modules() if type(m) is nn.Linear}
    head = HEAD[task]
    expected = {n for n in linear if not n.endswith("lora_A") and not n.endswith("lora_B") and n != head
                and (scheme == "int8" or linear[n].in_features % 64 == 0)}  # 4-bit: blocks of 64 within a row
    quantised = _quantised(model)
    assert set(quantised) == expected and len(expected) >= 2

    for name, layer in quantised.items():
        d_out, d_in = linear[name].out_features, linear[name].in_features
        assert (layer.out_features, layer.in_features) == (d_out, d_in)
        assert not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
        if scheme == "int8":
            assert type(layer) is bnb.nn.Linear8bitLt and not layer.state.has_fp16_weights
            assert layer.weight.dtype == torch.int8 and layer.weight.shape == (d_out, d_in)
            assert _int8_scale(layer).shape == (d_out,)
        else:
            assert type(layer) is bnb.nn.Linear4bit and layer.weight.bnb_quantized
            assert layer.weight.quant_type == scheme and layer.weight.quant_state.blocksize == 64
            assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == d_out * d_in // 2  # 2 per byte
            assert layer.compute_dtype == torch.float32

    # the head stays a plain float layer: trained and aggregated for classification, frozen for the causal LM
    h = model.get_submodule(head)
    assert type(h) is nn.Linear and h.weight.dtype == torch.float32
    assert h.weight.requires_grad == (task == "classification")

    # the adapters: fp32, trainable, over the quantised layers (the LoRA mode trains A and B)
    layers = adapter_layers(model)
    assert layers.keys() == adapter_layers(full).keys() and layers
    assert any(layer.quantized_base for layer in layers.values())
    for path, layer in layers.items():
        assert layer.quantized_base == (f"{path}.base" in quantised) == isinstance(layer.base, BNB_LAYERS)
        for f in (layer.lora_A, layer.lora_B):
            assert f.weight.dtype == torch.float32 and f.weight.requires_grad
        assert layer.merged_A is None and layer.merged_B is None
    assert not any(layer.quantized_base for layer in adapter_layers(full).values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in full.named_parameters() if p.requires_grad]

    # the wire format: the same names, shapes and dtypes, and the same seeded initial values, as without quantisation
    q_state, f_state = adapter_state(model), adapter_state(full)
    assert list(q_state) == list(f_state)
    for k, v in f_state.items():
        assert q_state[k].dtype == torch.float32 and q_state[k].device.type == "cpu"
        assert torch.equal(q_state[k], v), k

    # storage: each quantised weight holds 1/8 (4-bit) or 1/4 (int8) of its fp32 bytes, plus its scales (4-bit: one
    # 8-bit absmax per block of 64 and one fp32 per 256 blocks; int8: one fp32 per row); the rest is unchanged
    ratio = 4 if scheme == "int8" else 8
    for name, layer in quantised.items():
        assert layer.weight.numel() * layer.weight.element_size() * ratio == linear[name].weight.numel() * 4
    saved = sum(linear[n].weight.numel() * 4 * (1 - 1 / ratio) for n in quantised)
    blocks = {n: linear[n].weight.numel() // 64 for n in quantised}
    scales = sum(4 * linear[n].out_features if scheme == "int8" else blocks[n] + 4 * -(-blocks[n] // 256)
                 for n in quantised)
    assert quantized_bytes(model) == quantized_bytes(full) - saved + scales


def test_bfloat16_causal_lm_computes_its_4bit_layers_in_bfloat16() -> None:
    model = _build("causal_lm", "nf4", **{"model.dtype": "bfloat16"})
    quantised = _quantised(model)
    assert quantised and all(m.compute_dtype == torch.bfloat16 for m in quantised.values())
    logits = _logits(model, _ids())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# -- what it computes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_quantised_model_is_the_float_model_with_its_dequantised_weights(task, scheme) -> None:
    """Forward and backward (training mode, as fit runs it) through the bitsandbytes layers: the same logits and
    adapter gradients as full precision with the dequantised weights, so fedlora's wiring (adapters beside a packed
    base, gradients through it to earlier layers) adds no error of its own. On the CPU even int8 dequantises (no
    int8 activations), hence float-rounding agreement for every scheme."""
    model = _build(task, scheme)
    state = _random_state(model, seed=1)
    load_adapter_state(model, state)
    twin = _twin(task, model)
    load_adapter_state(twin, state)
    ids = _ids(2)
    grads, outs = [], []
    for m in (model, twin):
        m.train()
        out = m(input_ids=ids).logits
        (out**2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert _rel(outs[0], outs[1]) < 1e-5
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(state)
    for name, g in grads[0].items():
        assert g.abs().sum() > 0 and _rel(g, grads[1][name]) < 1e-4, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_layer_computes_with_a_weight_within_the_schemes_error(task, scheme) -> None:
    full = get_task(_cfg(task)).base_model()
    model = _build(task, scheme)
    lo, hi = WEIGHT_ERROR[scheme]
    errors = {}
    for name, layer in _quantised(model).items():
        w = full.get_submodule(name.removesuffix(".base")).weight
        errors[name] = _rel(_dequantised(layer), w)
    bad = {n: round(e, 3) for n, e in errors.items() if not lo < e < hi}
    assert not bad, f"{scheme}: relative weight error outside ({lo}, {hi}): {bad}"


@pytest.mark.parametrize("task", TASKS)
def test_logit_error_per_scheme_is_bounded_and_int8_is_the_smallest(task) -> None:
    full = _build(task, "none")
    state = _random_state(full, seed=3)
    load_adapter_state(full, state)
    ids = _ids(4)
    ref = _logits(full, ids)
    errors = {}
    for scheme in SCHEMES:
        model = _build(task, scheme)
        load_adapter_state(model, state)
        errors[scheme] = _rel(_logits(model, ids), ref)
    print(f"\n{task}: logits' relative error vs full precision", {s: round(e, 4) for s, e in errors.items()})
    for scheme, e in errors.items():
        lo, hi = LOGIT_ERROR[scheme]
        assert lo < e < hi, (scheme, e)
    if task == "classification":  # the causal LM's 4-bit schemes quantise only its 64-wide layers: not comparable
        assert errors["int8"] * 5 < min(errors["nf4"], errors["fp4"])


# -- training ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_moves_the_adapters_and_leaves_the_quantised_base_bit_identical(task, scheme) -> None:
    cfg = _cfg(task, scheme, **{"train.local-steps": 3, "train.batch-size": 64, "train.lr": 0.01})
    model = get_task(cfg).build_model("lora", 4)
    load_adapter_state(model, _random_state(model, seed=5))
    before, frozen = adapter_state(model), _frozen_snapshot(model)
    _, enc, targets = _train_data(task)
    losses, _, _ = optimise(model, enc, targets, get_task(cfg).batch_loss, cfg.train, seed=1)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    after = adapter_state(model)
    assert [k for k in before if torch.equal(before[k], after[k])] == []  # every adapter tensor (and head) moved
    _assert_unchanged(model, frozen)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["ffa", "sb"])
def test_ffa_and_sb_train_only_their_own_factor_over_a_quantised_base(task, mode) -> None:
    cfg = _cfg(task, "nf4", **{"train.local-steps": 2, "train.batch-size": 64, "train.lr": 0.01})
    model = get_task(cfg).build_model(mode, 4)
    trains = {"ffa": {"B"}, "sb": {"R"}}[mode]
    roles = {"ffa": {"A", "B"}, "sb": {"A", "B", "R"}}[mode]
    for layer in adapter_layers(model).values():
        assert layer.quantized_base
        for role in ("A", "B", "R"):
            f = getattr(layer, {"A": "lora_A", "B": "lora_B", "R": "lora_R"}[role])
            assert (f is not None) == (role in roles)
            if f is not None:
                assert f.weight.dtype == torch.float32 and f.weight.requires_grad == (role in trains)
    load_adapter_state(model, _random_state(model, seed=6))  # B != 0: R has a gradient
    before, frozen = adapter_state(model), _frozen_snapshot(model)
    _, enc, targets = _train_data(task)
    optimise(model, enc, targets, get_task(cfg).batch_loss, cfg.train, seed=2)
    after = adapter_state(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if naming.is_extra(k) or naming.split(k)[1] in trains}
    assert moved == expected and expected
    _assert_unchanged(model, frozen)


def test_a_quantised_model_trains_after_it_was_evaluated() -> None:
    """fedlora builds a fresh model per fit and per evaluation, so this order does not occur in a round today; it
    failed on AVX512-BF16 CPUs until quantize_base turned bitsandbytes' eval-mode repacking off."""
    cfg = _cfg("classification", "nf4", **{"train.local-steps": 2})
    t = get_task(cfg)
    model = t.build_model("lora", 4)
    _, enc, targets = _train_data("classification")
    t.evaluate(model, enc, targets)
    losses, _, _ = optimise(model, enc, targets, t.batch_loss, cfg.train, seed=1)
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_task_evaluate_on_a_quantised_base_matches_its_dequantised_twin(task, scheme) -> None:
    """What the server's and the clients' evaluation run (eval mode, no grad). int8 then quantises the activations
    too (per row, 8 bit): the loss stays within 1e-3 of the exact twin's (measured 4e-5). 4-bit layers compute with
    the same kernel as in training (quantize_base turns bitsandbytes' AVX512-BF16 eval repacking off): 1e-5."""
    t = get_task(_cfg(task, scheme))
    model = t.build_model("lora", 4)
    state = _random_state(model, seed=7)
    load_adapter_state(model, state)
    twin = _twin(task, model)
    load_adapter_state(twin, state)
    _, enc, targets = t.client_data("test", 0, 64)
    ours, exact = t.evaluate(model, enc, targets), t.evaluate(twin, enc, targets)
    assert all(math.isfinite(v) for v in ours.values())
    assert ours["loss"] == pytest.approx(exact["loss"], rel=1e-3 if scheme == "int8" else 1e-5)


# -- FLoRA's merged factors beside a quantised base --------------------------------------------------------------------
def _merged(model: nn.Module, m: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, layer in adapter_layers(model).items():
        out[naming.key(path, "MA")] = torch.randn(m, layer.in_features, generator=gen) * 0.2
        out[naming.key(path, "MB")] = torch.randn(layer.out_features, m, generator=gen) * 0.2
    return out


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merged_factors_on_a_quantised_base_add_exactly_their_product(task, scheme) -> None:
    m = 3
    model = _build(task, scheme, rank=m)  # fresh adapter (B = 0): the output is base + merged update only
    ids = _ids(8)
    plain, frozen, wire = _logits(model, ids), _frozen_snapshot(model), adapter_state(model)
    merged = _merged(model, m, seed=9)
    load_adapter_state(model, merged)
    _assert_unchanged(model, frozen)  # nothing is added into the packed weights
    assert adapter_state(model).keys() == wire.keys()  # the factors are not uploaded
    assert not any("merged" in n for n, _ in model.named_parameters())
    d_in = next(iter(adapter_layers(model).values())).in_features
    x = torch.randn(5, 7, d_in, generator=torch.Generator().manual_seed(0))
    for path, layer in adapter_layers(model).items():
        ma, mb = merged[naming.key(path, "MA")], merged[naming.key(path, "MB")]
        assert torch.equal(layer.merged_A, ma) and torch.equal(layer.merged_B, mb)
        assert layer.merged_A.dtype == torch.float32 and not layer.merged_A.requires_grad
        if layer.in_features == d_in:
            with torch.no_grad():
                # (x MA^T) MB^T against x (MB MA)^T: float rounding of the other association only (measured 2e-6)
                torch.testing.assert_close(layer(x) - layer.base(x), x @ (mb @ ma).T, rtol=1e-5, atol=1e-5)
    with_merged = _logits(model, ids)
    assert _rel(with_merged, plain) > 0.05  # the update really is applied

    # the same update as the LoRA of rank m of the same quantised base: B A s = MB MA with A = MA, B = MB / s
    lora = _build(task, scheme, rank=m)
    s = next(iter(adapter_layers(lora).values())).scaling
    as_lora = {}
    for path in adapter_layers(lora):
        as_lora[naming.key(path, "A")] = merged[naming.key(path, "MA")]
        as_lora[naming.key(path, "B")] = merged[naming.key(path, "MB")] / s
    load_adapter_state(lora, as_lora)
    assert _rel(_logits(lora, ids), with_merged) < 1e-5

    # and, to the scheme's quantisation error, the full-precision model with MB MA added into its weights
    full = _build(task, "none", rank=m)
    load_adapter_state(full, merged)
    assert _rel(with_merged, _logits(full, ids)) < LOGIT_ERROR[scheme][1]


def test_merged_factors_accumulate_and_empty_ones_change_nothing() -> None:
    model = _build("causal_lm", "nf4")
    ids = _ids(10)
    plain = _logits(model, ids)
    empty = {}
    for path, layer in adapter_layers(model).items():  # FLoRA's initial state: m = 0
        empty[naming.key(path, "MA")] = torch.zeros(0, layer.in_features)
        empty[naming.key(path, "MB")] = torch.zeros(layer.out_features, 0)
    load_adapter_state(model, empty)
    assert all(layer.merged_A is None for layer in adapter_layers(model).values())
    assert torch.equal(_logits(model, ids), plain)

    first, second = _merged(model, 2, seed=11), _merged(model, 3, seed=12)
    load_adapter_state(model, first)
    load_adapter_state(model, second)
    once = _build("causal_lm", "nf4")
    both = {}
    for path in adapter_layers(model):
        ka, kb = naming.key(path, "MA"), naming.key(path, "MB")
        both[ka], both[kb] = torch.cat([first[ka], second[ka]]), torch.cat([first[kb], second[kb]], dim=1)
        layer = adapter_layers(model)[path]
        assert torch.equal(layer.merged_A, both[ka]) and torch.equal(layer.merged_B, both[kb])
    load_adapter_state(once, both)
    assert _rel(_logits(model, ids), _logits(once, ids)) < 1e-6

    # frozen through local training too
    cfg = _cfg("causal_lm", "nf4", **{"train.local-steps": 2, "train.batch-size": 8})
    _, enc, targets = _train_data("causal_lm")
    optimise(model, enc, targets, get_task(cfg).batch_loss, cfg.train, seed=3)
    for path, layer in adapter_layers(model).items():
        assert torch.equal(layer.merged_A, both[naming.key(path, "MA")])
        assert torch.equal(layer.merged_B, both[naming.key(path, "MB")])


def test_merge_adapters_refuses_a_quantised_base() -> None:
    model = _build("classification", "nf4")
    with pytest.raises(ValueError, match="quantised base.*model.quantization=none"):
        merge_adapters(model)


# -- export: onto the full-precision base ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_peft_export_of_a_quantised_models_adapter_loads_onto_the_full_precision_base(task, tmp_path) -> None:
    from peft import PeftModel

    cfg = _cfg(task, "nf4")
    model = get_task(cfg).build_model("lora", 4)
    load_adapter_state(model, _random_state(model, seed=13))
    state = adapter_state(model)
    folder = save_peft_adapter(state, cfg, tmp_path / "adapter")
    full_cfg = _cfg(task, "none")
    peft_model = PeftModel.from_pretrained(get_task(full_cfg).base_model(), str(folder)).eval()
    assert not _quantised(peft_model)
    ours = get_task(full_cfg).build_model("lora", 4)
    load_adapter_state(ours, state)
    ids = _ids(14)
    theirs, expected = _logits(peft_model, ids), _logits(ours, ids)
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-5)
    assert (expected - _logits(get_task(full_cfg).base_model(), ids)).abs().max() > 1e-3  # the adapter is in it
    assert (expected - _logits(model, ids)).abs().max() > 1e-4  # and the quantised model really is another one


@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_merged_export_of_a_quantised_run_merges_onto_the_full_precision_base(method) -> None:
    from fedlora.export import merged_model

    cfg = _cfg("classification", "nf4", **{"method.name": method})
    agg = make_aggregator(cfg)
    model = get_task(cfg).build_model(agg.mode, 4)
    state = agg.init_state(_random_state(model, seed=15))
    if method == "flora":
        state.update(_merged(model, 3, seed=16))
    merged = merged_model(cfg, agg, state)
    assert not _quantised(merged) and not adapter_layers(merged)
    assert all(m.weight.dtype == torch.float32 for m in merged.modules() if isinstance(m, nn.Linear))
    ours = get_task(_cfg("classification", "none", **{"method.name": method})).build_model(agg.mode, 4)
    load_adapter_state(ours, agg.client_payload(state, 4))
    ids = _ids(17)
    torch.testing.assert_close(_logits(merged, ids), _logits(ours, ids), rtol=0, atol=1e-5)
    assert (_logits(merged, ids) - _logits(get_task(cfg).base_model(), ids)).abs().max() > 1e-3


# -- a federation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_a_quantised_federation_runs_and_sends_what_an_unquantised_one_sends(method, local_run, tmp_path,
                                                                             monkeypatch) -> None:
    import fedlora.quantize

    calls: list[str] = []
    real = fedlora.quantize.quantize_base

    def spy(model, scheme, *args, **kwargs):
        calls.append(scheme)
        return real(model, scheme, *args, **kwargs)

    monkeypatch.setattr(fedlora.quantize, "quantize_base", spy)
    runs = {}
    for scheme in ("none", "nf4"):
        calls.clear()
        _, rows, summary = local_run(tmp_path / scheme, num_nodes=2, **{
            "model.quantization": scheme, "method.name": method, "train.device": "cpu", "train.local-steps": 2})
        runs[scheme] = rows
        assert summary["rounds"] == 2
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(math.isfinite(r["global_loss"]) for r in rows)
        assert all(math.isfinite(r["train_loss"]) and r["clients_aggregated"] == 2 for r in rows[1:])
        if scheme == "none":
            assert calls == []
        else:  # every model of the run was quantised: the server's init and 3 evaluations, 2 clients x 2 rounds
            assert len(calls) >= 3 + 2 * 2 and set(calls) == {"nf4"}
    for plain, quant in zip(runs["none"], runs["nf4"], strict=True):
        for key in ("bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down"):
            assert quant[key] == plain[key], (key, quant["round"])
        assert quant["global_loss"] != plain["global_loss"]  # evaluated on the quantised base ...
        assert quant["global_loss"] == pytest.approx(plain["global_loss"], rel=0.05)  # ... which is close to it
    assert runs["nf4"][1]["bytes_up"] > 0


# -- configuration -----------------------------------------------------------------------------------------------------
def test_config_and_quantize_base_reject_what_they_cannot_do(monkeypatch) -> None:
    from fedlora.quantize import bitsandbytes, quantize_base

    assert FedLoraConfig().model.quantization == "none"
    assert not _quantised(_build("classification", "none"))
    with pytest.raises(ConfigError, match="model.quantization"):
        FedLoraConfig.from_run_config({"model.quantization": "bogus"})
    with pytest.raises(ConfigError, match="model.quantization"):
        quantize_base(nn.Sequential(nn.Linear(4, 4)), "int4")
    with pytest.raises(ConfigError, match="no nn.Linear"):
        quantize_base(nn.Sequential(nn.ReLU()), "nf4")
    keep = quantize_base(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2)), "nf4", keep=["1"])
    assert keep == ["0"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"fedlora\[quant\]"):
        bitsandbytes()


# -- DP-SGD ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_dp_sgd_trains_the_adapters_of_a_quantised_model(scheme) -> None:
    from fedlora.client import fit

    cfg = _cfg("classification", scheme, **{"privacy.mode": "sample", "privacy.noise-multiplier": 1.0,
                                            "train.local-steps": 2, "train.batch-size": 8})
    agg = make_aggregator(cfg)
    payload = agg.client_payload(agg.init_state(adapter_state(get_task(cfg).build_model(agg.mode, 4))), 4)
    res = fit(cfg, payload, 0, 128, server_round=1, aggregator=agg)
    assert list(res.tensors) == list(adapter_state(_build("classification", "none")))
    assert all(torch.isfinite(t).all() for t in res.tensors.values())
    assert all(not torch.equal(t, payload[k]) for k, t in res.tensors.items())  # noise alone moves every tensor
    assert res.metrics["epsilon"] > 0 and math.isfinite(res.metrics["train_loss"])
    assert res.privacy_state is not None


def test_dp_sgd_leaves_the_quantised_base_of_a_causal_lm_bit_identical() -> None:
    from fedlora.privacy.accountant import ClientAccountant
    from fedlora.privacy.dpsgd import train_local_dp

    cfg = _cfg("causal_lm", "nf4", **{"train.local-steps": 2, "train.batch-size": 8})
    t = get_task(cfg)
    model = t.build_model("lora", 4)
    load_adapter_state(model, _random_state(model, seed=18))
    before, frozen = adapter_state(model), _frozen_snapshot(model)
    _, enc, targets = _train_data("causal_lm")
    accountant = ClientAccountant.from_state(None, cfg.privacy.accountant)
    losses, _, _ = train_local_dp(model, enc, targets, cfg.train, clip=1.0, noise_multiplier=1.0,
                                  accountant=accountant, seed=4, loss_fn=t.batch_loss)
    assert losses and all(math.isfinite(x) for x in losses)
    assert accountant.epsilon(cfg.privacy.delta) > 0
    after = adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    _assert_unchanged(model, frozen)
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())  # opacus cleaned up
