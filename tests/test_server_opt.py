"""Server optimisers (FedAvgM, FedAdam, FedYogi) on the pseudo-gradient of linear methods, and FedProx's term.

Each optimiser is checked against its update rule written out here by hand, on random client updates over several
rounds; the strategy keeps its moments across a checkpoint and a rollback; FedProx equals its loss term."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.checkpoint import load_checkpoint
from fedlora.config import ConfigError, FedLoraConfig, TrainConfig
from fedlora.server_opt import PREFIX, ServerOptimizer, split_state
from fedlora.train import optimise
from tests.conftest import run_local

LAYERS = ("m.0.q", "m.0.v")
D_OUT, D_IN, R = 12, 10, 3


def _state(method: str, gen: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    agg = get_aggregator(method, AggregatorConfig(rank=R))
    init = OrderedDict()
    for layer in LAYERS:
        init[naming.key(layer, "A")] = torch.randn(R, D_IN, generator=gen)
        init[naming.key(layer, "B")] = torch.randn(D_OUT, R, generator=gen)
        if agg.mode == "sb":
            init[naming.key(layer, "R")] = torch.randn(R, R, generator=gen)
    init["classifier.weight"] = torch.randn(4, D_OUT, generator=gen)
    return agg.init_state(init) if method != "fed_sb" else init


def _updates(agg, state, gen: torch.Generator, k: int = 3) -> list[ClientUpdate]:
    shapes = agg.expected_upload(state, R)
    return [ClientUpdate(i, {n: state[n] + 0.1 * torch.randn(s, generator=gen) for n, s in shapes.items()},
                         num_examples=10 * (i + 1), rank=R) for i in range(k)]


def _mean(agg, updates, name):
    return agg.weighted_mean([u.tensors[name] for u in updates], agg.weights(updates))


@pytest.mark.parametrize("method", ["fedit", "ffa", "fed_sb"])
def test_sgd_at_lr_1_without_momentum_is_plain_aggregation(method):
    gen = torch.Generator().manual_seed(0)
    agg = get_aggregator(method, AggregatorConfig(rank=R))
    state = _state(method, gen)
    opt = ServerOptimizer(agg, "avgm", lr=1.0, momentum=0.0)
    for _ in range(3):
        updates = _updates(agg, state, gen)
        plain = agg.aggregate(state, updates)
        stepped = agg.aggregate(state, opt.step(state, updates))
        assert list(plain) == list(stepped)
        for k in plain:
            torch.testing.assert_close(stepped[k], plain[k], rtol=1e-6, atol=1e-6)
        state = plain


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi"])
def test_each_optimiser_follows_its_rule_over_rounds(name):
    """x <- x - lr * direction(g), g = x - weighted mean of the uploads, with each rule's moments by hand."""
    gen = torch.Generator().manual_seed(1)
    agg = get_aggregator("fedit", AggregatorConfig(rank=R))
    state = _state("fedit", gen)
    lr, mom, b1, b2, eps = 0.5, 0.8, 0.9, 0.99, 1e-3
    opt = ServerOptimizer(agg, name, lr=lr, momentum=mom, beta1=b1, beta2=b2, tau=eps)
    keys = list(agg.expected_upload(state, R))
    m = {k: torch.zeros_like(state[k]) for k in keys}
    v = {k: torch.zeros_like(state[k]) for k in keys}
    for t in range(1, 5):
        updates = _updates(agg, state, gen)
        new = agg.aggregate(state, opt.step(state, updates))
        for k in keys:
            g = state[k] - _mean(agg, updates, k)
            if name == "avgm":  # torch SGD: buf = mom buf + g (buf = g at the first step)
                m[k] = g if t == 1 else mom * m[k] + g
                expected = state[k] - lr * m[k]
            else:
                m[k] = b1 * m[k] + (1 - b1) * g
                if name == "adam":
                    v[k] = b2 * v[k] + (1 - b2) * g * g
                else:  # Yogi: additive, sign-controlled
                    v[k] = v[k] - (1 - b2) * torch.sign(v[k] - g * g) * g * g
                m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
                expected = state[k] - lr * m_hat / (v_hat.sqrt() + eps)
            torch.testing.assert_close(new[k], expected, rtol=1e-5, atol=1e-6)
        state = new


def test_yogi_differs_from_adam_once_the_gradient_shrinks():
    agg = get_aggregator("ffa", AggregatorConfig(rank=R))
    out = {}
    for name in ("adam", "yogi"):
        state = _state("ffa", torch.Generator().manual_seed(3))
        opt = ServerOptimizer(agg, name, lr=0.1)
        for scale in (1.0, 0.01):
            updates = _updates(agg, state, torch.Generator().manual_seed(int(scale * 100)))
            updates = [ClientUpdate(u.client_id, {k: state[k] + scale * (t - state[k]) for k, t in u.tensors.items()},
                                    u.num_examples, u.rank) for u in updates]
            state = agg.aggregate(state, opt.step(state, updates))
        out[name] = state
    assert not torch.allclose(out["adam"][naming.key(LAYERS[0], "B")], out["yogi"][naming.key(LAYERS[0], "B")])


def test_a_tensor_not_uploaded_keeps_its_moments_for_its_next_round():
    """RoLoRA uploads B in odd rounds and A in even ones: each factor's moments step only in its own rounds."""
    gen = torch.Generator().manual_seed(6)
    agg = get_aggregator("rolora", AggregatorConfig(rank=R))
    state = _state("fedit", gen)
    opt = ServerOptimizer(agg, "adam", lr=0.1)
    b1, b2, eps = 0.9, 0.99, 1e-3
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    t: dict[str, int] = {}
    for rnd in range(1, 6):
        shapes = agg.expected_upload(state, R, rnd)
        updates = [ClientUpdate(i, {n: state[n] + 0.1 * torch.randn(s, generator=gen) for n, s in shapes.items()},
                                10, R) for i in range(3)]
        new = agg.aggregate(state, opt.step(state, updates))
        for k in shapes:
            g = state[k] - _mean(agg, updates, k)
            t[k] = t.get(k, 0) + 1
            m[k] = b1 * m.get(k, torch.zeros_like(g)) + (1 - b1) * g
            v[k] = b2 * v.get(k, torch.zeros_like(g)) + (1 - b2) * g * g
            expected = state[k] - 0.1 * (m[k] / (1 - b1 ** t[k])) / ((v[k] / (1 - b2 ** t[k])).sqrt() + eps)
            torch.testing.assert_close(new[k], expected, rtol=1e-5, atol=1e-6)
        state = new
    a = naming.key(LAYERS[0], "A")
    assert t[a] == 2 and t["classifier.weight"] == 5  # A stepped in rounds 2 and 4 only, the head every round


def test_refused_where_there_is_no_pseudo_gradient():
    for method, why in (("fedsvd", "re-factorises"), ("flora", "not a weighted mean"), ("lora_fair", "not a weighted")):
        match = rf"method.server-opt='adam' does not apply to method.name='{method}'.*{why}"
        with pytest.raises(ConfigError, match=match):
            FedLoraConfig.from_run_config({"method.name": method, "method.server-opt": "adam"})
    with pytest.raises(ConfigError, match="method.server-opt='sgd'"):
        FedLoraConfig.from_run_config({"method.server-opt": "sgd"})
    with pytest.raises(ConfigError, match="method.server-beta2"):
        FedLoraConfig.from_run_config({"method.server-opt": "adam", "method.server-beta2": 1.0})


def test_snapshot_and_restore_undo_a_step():
    gen = torch.Generator().manual_seed(4)
    agg = get_aggregator("fedit", AggregatorConfig(rank=R))
    state = _state("fedit", gen)
    opt = ServerOptimizer(agg, "adam", lr=0.1)
    u1, u2, u3 = (_updates(agg, state, gen) for _ in range(3))
    state = agg.aggregate(state, opt.step(state, u1))
    snap = opt.snapshot()
    agg.aggregate(state, opt.step(state, u2))  # rolled back
    opt.restore(snap)
    a = agg.aggregate(state, opt.step(state, u3))
    fresh = ServerOptimizer(agg, "adam", lr=0.1)
    s0 = _state("fedit", torch.Generator().manual_seed(4))
    s1 = agg.aggregate(s0, fresh.step(s0, u1))
    b = agg.aggregate(s1, fresh.step(s1, u3))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_moments_are_checkpointed_and_resume_is_exact(tmp_path):
    common = {"method.name": "fedit", "method.server-opt": "adam", "method.server-lr": 0.05, "train.local-steps": 2}
    run_local(tmp_path / "resumed", **common, **{"num-server-rounds": 2})
    state, _, meta = load_checkpoint(tmp_path / "resumed")
    _, moments = split_state(state)
    assert {k.split(".")[2] for k in moments} == {"exp_avg", "exp_avg_sq"} and meta["server_opt"]["steps"] == 2
    _, rows_b, _ = run_local(tmp_path / "resumed", **common, **{"num-server-rounds": 3, "resume": True})
    _, rows_c, _ = run_local(tmp_path / "straight", **common, **{"num-server-rounds": 3})
    resumed, _, _ = load_checkpoint(tmp_path / "resumed")
    straight, _, _ = load_checkpoint(tmp_path / "straight")
    assert list(resumed) == list(straight) and any(k.startswith(PREFIX) for k in straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert rows_b[3]["global_loss"] == rows_c[3]["global_loss"]
    assert rows_c[1]["exactness"] is not None  # the meter still reports the plain aggregation's error


# -- FedProx -----------------------------------------------------------------------------------------------------
def _toy():
    gen = torch.Generator().manual_seed(5)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    return model, {"input_ids": x, "attention_mask": torch.ones(32, 1)}, y


def _loss(model, enc, targets, idx):
    logits = model(enc["input_ids"][idx])
    return torch.nn.functional.cross_entropy(logits, targets[idx]), 0, len(idx)


def test_fedprox_equals_its_loss_term():
    mu = 0.7
    model_a, enc, y = _toy()
    model_b, _, _ = _toy()
    start = [p.detach().clone() for p in model_b.parameters()]

    def with_term(model, enc, targets, idx):
        loss, c, k = _loss(model, enc, targets, idx)
        prox = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start, strict=True))
        return loss + mu / 2 * prox, c, k

    train = TrainConfig(local_steps=5, batch_size=8, lr=0.05, max_grad_norm=0.5)
    optimise(model_a, enc, y, _loss, TrainConfig(**{**train.__dict__, "prox_mu": mu}), seed=0)
    optimise(model_b, enc, y, with_term, train, seed=0)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model_c, _, _ = _toy()
    optimise(model_c, enc, y, _loss, train, seed=0)  # without it: a different result
    assert not torch.allclose(next(model_c.parameters()), next(model_a.parameters()), atol=1e-4)


def test_fedprox_under_dp_sgd_adds_its_gradient_once_per_logical_step(monkeypatch):
    from fedlora import train as train_module
    from fedlora.privacy.accountant import ClientAccountant
    from fedlora.privacy.dpsgd import train_local_dp

    calls = []
    real = train_module.Proximal.add_gradient

    def spy(self):
        calls.append([p.grad.clone() for p in self.params])
        real(self)

    monkeypatch.setattr(train_module.Proximal, "add_gradient", spy)
    drift = {}
    for mu in (0.0, 50.0):
        model, enc, y = _toy()
        start = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(local_steps=4, batch_size=8, lr=0.05, prox_mu=mu, micro_batch_size=3)
        train_local_dp(model, enc, y, cfg, clip=1.0, noise_multiplier=0.5, accountant=ClientAccountant(),
                       seed=0, loss_fn=_loss)
        drift[mu] = sum(float((p - p0).norm()) for p, p0 in zip(model.parameters(), start, strict=True))
    assert len(calls) == 8  # 4 logical steps per run (micro-batches do not add calls), both runs
    assert drift[50.0] < drift[0.0]
