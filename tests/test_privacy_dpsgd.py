"""DP-SGD through opacus on our adapters: per-example clipping, noise scale, accounting across rounds,
what a DP round may and may not touch, and the noise for a budget. Tiny random BERTs, CPU, seconds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import create_accountant
from transformers import BertConfig, BertForSequenceClassification

from fedlora.adapters import adapter_layers, inject_adapters, trainable_names
from fedlora.config import TrainConfig
from fedlora.privacy import (
    ClientAccountant,
    dpsgd,
    load_state_file,
    noise_for_budget,
    privatised_gradient,
    save_state_file,
    train_local_dp,
)
from fedlora.train import take_batch

TRAINED = {"lora": ("lora_A", "lora_B"), "ffa": ("lora_B",), "sb": ("lora_R",)}


def tiny_model(mode: str = "lora", rank: int = 4, seed: int = 0) -> torch.nn.Module:
    """1-layer BERT without dropout (per-example references must see the same function), adapters with a
    random non-zero B (and R), as after some training: with B = 0 the gradient of A and R would vanish."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    inject_adapters(model, ["query", "value"], rank=rank, alpha=8, mode=mode, head=["classifier"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)
            if layer.lora_R is not None:
                layer.lora_R.weight.copy_(torch.randn(layer.lora_R.weight.shape, generator=g) * 0.5)
    return model


def tiny_data(n: int, seed: int = 0, width: int = 12) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids with varied lengths (so per-batch padding trimming matters) and labels."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        mask[i, : 3 + (i * 5) % (width - 2)] = 1
    ids = torch.randint(1, 100, (n, width), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g)


def per_example_grads(model, enc, labels) -> list[dict[str, torch.Tensor]]:
    """Reference: one forward/backward per example, on rows of the batch trimmed as DP-SGD trims it."""
    batch = take_batch(enc, torch.arange(len(labels)))
    out = []
    model.train()
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        logits = model(**{k: v[i : i + 1] for k, v in batch.items()}).logits
        torch.nn.functional.cross_entropy(logits, labels[i : i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out


def flat_norm(g: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in g.values()))


def test_per_example_clipping_matches_a_hand_loop_and_bounds_one_example():
    model = tiny_model("lora")
    enc, labels = tiny_data(6)
    with torch.no_grad():  # a head confident in class 0: examples labelled 0 have small gradients ...
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    labels = torch.tensor([1, 0, 0, 0, 0, 0])  # ... and example 0, labelled 1, a huge one
    grads = per_example_grads(model, enc, labels)
    norms = [flat_norm(g) for g in grads]
    assert norms[0] > 20 * max(norms[1:])
    clip = sorted(norms[1:])[2]  # clips example 0 and some, not all, of the others
    assert sum(nm > clip for nm in norms) >= 3 and sum(nm <= clip for nm in norms) >= 2

    got = privatised_gradient(model, enc, labels, clip=clip, noise_multiplier=0.0)
    factors = [min(1.0, clip / (nm + 1e-6)) for nm in norms]  # opacus' clip factor C / (||g|| + 1e-6)
    for name in got:
        want = sum(f * g[name] for f, g in zip(factors, grads, strict=True)) / len(labels)
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=1e-5)
        assert float((got[name] - want).norm()) <= 1e-5 * float(want.norm()) + 1e-7, name

    # Sensitivity: removing the huge example moves the averaged gradient by exactly its clipped part, C / batch.
    rest = privatised_gradient(model, {k: v[1:] for k, v in enc.items()}, labels[1:], clip=clip,
                               noise_multiplier=0.0, expected_batch_size=len(labels))
    moved = flat_norm({n: got[n] - rest[n] for n in got})
    assert moved <= clip / len(labels) * (1 + 1e-5)
    assert moved == pytest.approx(clip / len(labels), rel=1e-4)


def test_noise_has_std_sigma_clip_over_expected_batch():
    model = tiny_model("lora", rank=8)
    enc, labels = tiny_data(5)
    clip, sigma, expected = 0.5, 1.3, 8  # averaged over the expected batch size, not the 5 rows drawn
    clean = privatised_gradient(model, enc, labels, clip, 0.0, expected_batch_size=expected)
    noise = []
    for seed in range(4):
        noisy = privatised_gradient(model, enc, labels, clip, sigma, expected_batch_size=expected, seed=seed)
        noise.append(torch.cat([(noisy[n] - clean[n]).flatten() for n in clean]))
    noise_all = torch.cat(noise).double()
    assert noise_all.numel() > 4000
    assert float(noise_all.std()) == pytest.approx(sigma * clip / expected, rel=0.05)
    assert abs(float(noise_all.mean())) < 4 * sigma * clip / expected / math.sqrt(noise_all.numel())
    again = privatised_gradient(model, enc, labels, clip, sigma, expected_batch_size=expected, seed=0)
    assert torch.equal(torch.cat([(again[n] - clean[n]).flatten() for n in clean]), noise[0])
    assert not torch.equal(noise[0], noise[1])


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_accountant_across_restarted_rounds_equals_one_run(mechanism):
    rounds, steps, sigma, q, delta = 3, 7, 1.1, 0.05, 1e-5
    state = None
    for _ in range(rounds):  # a client rebuilt each round: state -> JSON -> fresh accountant
        acc = ClientAccountant.from_state(json.loads(json.dumps(state)) if state else None, mechanism)
        acc.step(sigma, q, steps)
        state = acc.state_dict()
    reference = create_accountant(mechanism)
    for _ in range(rounds * steps):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    acc = ClientAccountant.from_state(json.loads(json.dumps(state)), mechanism)
    assert acc.steps == rounds * steps
    assert acc.epsilon(delta) == pytest.approx(reference.get_epsilon(delta), abs=1e-6)

    before = acc.state_dict()
    after = acc.epsilon_after(delta, sigma, q, steps)
    assert acc.state_dict() == before  # a probe, not a step
    reference.history = [(sigma, q, (rounds + 1) * steps)]
    assert after == pytest.approx(reference.get_epsilon(delta), abs=1e-6)
    assert after > acc.epsilon(delta)


def test_accountant_edge_cases_and_state_file(tmp_path):
    assert ClientAccountant.from_state(None, "rdp").epsilon(1e-5) == 0.0
    assert ClientAccountant.from_state({}, "prv").epsilon(1e-5) == 0.0
    with pytest.raises(ValueError, match="privacy.accountant"):
        ClientAccountant.from_state({"mechanism": "rdp", "history": [[1.0, 0.1, 3]]}, "prv")
    acc = ClientAccountant("rdp")
    acc.step(1.0, 0.1, 3)
    acc.step(1.0, 0.1, 2)
    acc.step(0.8, 0.1)
    assert acc.history == [(1.0, 0.1, 5), (0.8, 0.1, 1)]

    path = tmp_path / "clients" / "node-3.json"
    assert load_state_file(path) is None
    save_state_file(path, acc.state_dict())
    save_state_file(path, acc.state_dict())  # replacing an existing file
    assert ClientAccountant.from_state(load_state_file(path), "rdp").history == acc.history
    assert [p.name for p in path.parent.iterdir()] == ["node-3.json"]  # no temp files left


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", ["lora", "ffa", "sb"])
def test_train_local_dp_touches_only_trainable_tensors_and_leaves_a_plain_model(mode):
    enc, labels = tiny_data(24)
    model = tiny_model(mode)
    names, hooks0, before = trainable_names(model), _hook_count(model), _snapshot(model)
    expected_trainable = sorted(n for n in before if n.startswith("classifier.")
                                or any(f".{role}." in n for role in TRAINED[mode]))
    assert sorted(names) == expected_trainable
    prior = ClientAccountant("rdp")
    prior.step(0.7, 0.1, 5)
    acc = ClientAccountant.from_state(prior.state_dict(), "rdp")
    losses, correct, seen = train_local_dp(model, enc, labels, TRAIN, clip=1.0, noise_multiplier=0.8, accountant=acc,
                                           seed=7)
    assert 0 < len(losses) <= 4 and all(math.isfinite(v) for v in losses) and 0 <= correct <= seen

    after = _snapshot(model)
    assert list(after) == list(before)  # names unchanged: no "_module." wrapper
    for n in before:
        if n in expected_trainable:
            assert not torch.equal(after[n], before[n]), n
        else:
            assert torch.equal(after[n], before[n]), n  # base weights and frozen factors bit-identical
    assert trainable_names(model) == names
    assert acc.history == [(0.7, 0.1, 5), (0.8, 7 / 24, 4)]

    # No opacus leftovers: no hooks, no per-sample attributes; a plain forward/backward works.
    assert _hook_count(model) == hooks0
    for m in model.modules():
        assert not {"activations", "max_batch_len", "autograd_grad_sample_hooks"} & set(vars(m))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(**take_batch(enc, torch.arange(6))).logits, labels[:6])
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected_trainable), n
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter")), n

    twin = tiny_model(mode)
    train_local_dp(twin, enc, labels, TRAIN, clip=1.0, noise_multiplier=0.8, accountant=ClientAccountant("rdp"), seed=7)
    assert all(torch.equal(p, after[n]) for n, p in twin.named_parameters())
    other = tiny_model(mode)
    train_local_dp(other, enc, labels, TRAIN, clip=1.0, noise_multiplier=0.8, accountant=ClientAccountant("rdp"),
                   seed=8)
    assert not all(torch.equal(p, after[n]) for n, p in other.named_parameters())


TRAIN = TrainConfig(local_steps=4, batch_size=7, lr=1e-2, weight_decay=0.01)


def test_dp_rounds_through_opacus_hook_match_opacus_epsilon_and_count_empty_batches(monkeypatch):
    """Rounds of train_local_dp with the state round-tripped through JSON; tiny q makes empty Poisson
    batches likely, which must still be (noise-only) steps the accountant counts."""
    empty = []
    real = dpsgd._noise_only_step
    monkeypatch.setattr(dpsgd, "_noise_only_step", lambda opt, prox=None: (empty.append(1), real(opt, prox)))
    enc, labels = tiny_data(40)
    model = tiny_model("ffa")
    sigma, q, state = 1.2, 1 / 40, None
    for rnd in range(2):
        acc = ClientAccountant.from_state(json.loads(json.dumps(state)) if state else None, "prv")
        losses, _, _ = train_local_dp(model, enc, labels, TrainConfig(local_steps=6, batch_size=1, lr=1e-2), clip=1.0,
                                      noise_multiplier=sigma, accountant=acc, seed=rnd)
        assert all(math.isfinite(v) for v in losses)
        state = acc.state_dict()
    assert empty, "expected at least one empty Poisson batch at q = 1/40"
    assert state["history"] == [[sigma, q, 12]]
    reference = create_accountant("prv")
    reference.history = [(sigma, q, 12)]
    assert ClientAccountant.from_state(state, "prv").epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5),
                                                                                     abs=1e-6)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_noise_for_budget_reaches_the_target(mechanism):
    target, delta, q, steps = 3.0, 1e-5, 0.02, 200
    sigma = noise_for_budget(target, delta, q, steps, mechanism)
    acc = ClientAccountant(mechanism)
    acc.step(sigma, q, steps)
    assert 0.99 * target <= acc.epsilon(delta) <= target


def test_noise_for_budget_rejects_unreachable_and_bad_inputs():
    with pytest.raises(ValueError, match="privacy.target-epsilon"):
        noise_for_budget(0.05, 1e-5, 0.5, 1000, "rdp")
    with pytest.raises(ValueError, match="privacy.target-epsilon"):
        noise_for_budget(0.0, 1e-5, 0.5, 1000, "rdp")
    with pytest.raises(ValueError, match="privacy.accountant"):
        noise_for_budget(1.0, 1e-5, 0.5, 1000, "gdp")


@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_micro_batches_give_the_logical_batchs_dp_step_and_hold_fewer_per_example_gradients(mode, monkeypatch):
    """train.micro-batch-size under DP-SGD: the same Poisson batches, per-example clipping and one noise draw per
    logical step as the un-split batch (trained tensors equal to float rounding, the same accountant history),
    while opacus never holds per-example gradients of more than the micro-batch."""
    from dataclasses import replace

    from opacus.optimizers import DPOptimizer

    enc, labels = tiny_data(40, seed=3)
    held: list[int] = []
    real = DPOptimizer.clip_and_accumulate

    def recording(self):
        held.append(max(g.shape[0] for g in self.grad_samples))
        return real(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", recording)
    train = replace(TRAIN, batch_size=16, local_steps=5)
    runs = {}
    for micro in (0, 5):
        model = tiny_model(mode)
        acc = ClientAccountant("rdp")
        held.clear()
        losses, correct, seen = train_local_dp(model, enc, labels, replace(train, micro_batch_size=micro), clip=0.5,
                                               noise_multiplier=0.7, accountant=acc, seed=11)
        runs[micro] = (losses, correct, seen, acc.history, list(held),
                       {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (l0, c0, s0, h0, held0, p0), (l5, c5, s5, h5, held5, p5) = runs[0], runs[5]
    assert h0 == h5 == [(0.7, 16 / 40, 5)] and (c0, s0) == (c5, s5)
    assert torch.allclose(torch.tensor(l0), torch.tensor(l5), rtol=1e-5, atol=1e-6)
    for name in p0:
        assert torch.allclose(p0[name], p5[name], rtol=1e-4, atol=1e-6), name
    assert max(held0) > 5 and max(held5) <= 5  # whole Poisson batches (about 16) vs chunks of at most 5
    assert len(held5) > len(held0)  # several clip-and-accumulate passes per logical step
