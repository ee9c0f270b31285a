"""train.cache-frozen-layers: the frozen lower layers' output, computed once, gives the same losses, gradients and
trained tensors as running the whole model (dropout off), in plain training and under DP-SGD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedlora.prefix as prefix
from fedlora.adapters import adapter_state
from fedlora.config import FedLoraConfig
from fedlora.privacy.accountant import ClientAccountant
from fedlora.privacy.dpsgd import train_local_dp
from fedlora.tasks import get_task
from fedlora.train import optimise
from tests.conftest import run_local

TOP = r".*layer\.1\..*(query|value)"  # the tiny BERT has 2 layers: adapters on the top one only


def _setup(**extra):
    cfg = FedLoraConfig.from_run_config({"model.max-length": 32, "adapter.rank": 4, "adapter.target-modules": TOP,
                                         "train.cache-frozen-layers": True, **extra})
    task = get_task(cfg)
    model = task.build_model("lora", 4)
    for m in model.modules():  # dropout off: the cached path runs the frozen layers in eval mode
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.no_grad():  # a non-zero B, so the adapters shape the output and the gradients of A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    n, enc, targets = task.client_data("train", 0, 4)
    keep = torch.arange(48)
    data = (48, {k: v[keep] for k, v in enc.items()}, targets[keep])
    return cfg, task, model, data


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_prefix_gives_the_same_loss_and_gradients():
    cfg, task, model, data = _setup()
    n, enc, targets = data
    cached = task.training_inputs(model, data)[1]
    assert set(cached) == {"inputs_embeds", "attention_mask"} and model.fedlora_prefix_start == 1
    idx = torch.tensor([0, 5, 9, 17, 30])
    model.train()
    full, _, _ = task.batch_loss(model, enc, targets, idx)
    full.backward()
    g_full = _grads(model)
    model.zero_grad()
    part, _, _ = task.batch_loss(model, cached, targets, idx)
    part.backward()
    g_part = _grads(model)
    assert torch.allclose(full, part, atol=1e-6)
    assert g_full.keys() == g_part.keys() and any("lora_A" in k for k in g_full)
    for k in g_full:
        torch.testing.assert_close(g_part[k], g_full[k], rtol=1e-4, atol=1e-6)
    # the model is whole again afterwards
    assert len(model.base_model.encoder.layer) == 2 and not isinstance(model.base_model.embeddings, prefix._PassThrough)


@pytest.mark.parametrize("dp", [False, True])
def test_training_on_the_cached_prefix_equals_training_the_whole_model(dp):
    out = []
    for cache in (False, True):
        cfg, task, model, data = _setup(**{"train.local-steps": 3, "train.batch-size": 8})
        n, enc, targets = task.training_inputs(model, data) if cache else data
        if dp:
            train_local_dp(model, enc, targets, cfg.train, clip=1.0, noise_multiplier=0.7,
                           accountant=ClientAccountant(), seed=3, loss_fn=task.batch_loss)
        else:
            optimise(model, enc, targets, task.batch_loss, cfg.train, seed=3)
        out.append(adapter_state(model))
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=1e-4, atol=1e-6)


def test_the_prefix_is_computed_once_per_encoding(monkeypatch):
    cfg, task, model, data = _setup()
    calls = []
    real = type(model.base_model).forward
    monkeypatch.setattr(type(model.base_model), "forward",
                        lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    first = task.training_inputs(model, data)[1]
    count = len(calls)
    assert count > 0 and task.training_inputs(model, data)[1] is first and len(calls) == count


def test_adapters_on_the_bottom_layer_leave_nothing_to_cache():
    cfg = FedLoraConfig.from_run_config({"model.max-length": 32, "train.cache-frozen-layers": True})
    task = get_task(cfg)
    model = task.build_model("lora", 8)
    with pytest.raises(ValueError, match="start at encoder layer 0.*adapter.target-modules"):
        task.training_inputs(model, task.client_data("train", 0, 4))


def test_a_federation_trains_on_the_cached_prefix(tmp_path):
    _, rows, _ = run_local(tmp_path, num_nodes=2, **{"adapter.target-modules": TOP, "train.cache-frozen-layers": True})
    assert all(r["clients_aggregated"] == 2 for r in rows[1:]) and rows[-1]["train_loss"] is not None


def test_evaluation_on_the_cached_prefix_equals_the_full_forward_and_is_cached(monkeypatch):
    cfg, task, model, data = _setup()
    n, enc, targets = data
    plain = get_task(FedLoraConfig.from_run_config({**cfg.to_run_config(), "train.cache-frozen-layers": False}))
    full = plain.evaluate(model, enc, targets)
    calls = []
    real = type(model.base_model).forward
    monkeypatch.setattr(type(model.base_model), "forward",
                        lambda self, *a, **k: (calls.append(k.get("inputs_embeds") is None), real(self, *a, **k))[1])
    cached = task.evaluate(model, enc, targets)
    first_pass = calls.count(True)
    again = task.evaluate(model, enc, targets)
    assert cached == pytest.approx(full, abs=1e-6) and again == pytest.approx(full, abs=1e-6)
    assert first_pass > 0 and calls.count(True) == first_pass  # the second evaluation ran no frozen layer
    assert len(model.base_model.encoder.layer) == 2
