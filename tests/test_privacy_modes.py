"""Privacy modes as plug-ins: the registry, the config checks each mode owns, and the hooks the strategy and the
client call without knowing which mode runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.adapters import load_adapter_state
from fedlora.aggregation import base as aggregation_base
from fedlora.aggregation.fedit import FedIT
from fedlora.checkpoint import load_checkpoint
from fedlora.client import fit, round_seed
from fedlora.components import make_aggregator
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.privacy import PrivacyMode, get_privacy_mode, privacy_modes
from fedlora.privacy import modes as privacy_base
from fedlora.server import initial_state
from fedlora.strategy import LoRAStrategy
from fedlora.tasks import get_task
from fedlora.train import optimise
from tests.conftest import FAST, run_local


def test_registry_and_unknown_mode() -> None:
    assert privacy_modes() == ["client", "none", "sample"]
    assert get_privacy_mode(FedLoraConfig.from_run_config({})).name == "none"
    with pytest.raises(ConfigError, match=r"privacy.mode='local' must be one of \['client', 'none', 'sample'\]"):
        FedLoraConfig.from_run_config({"privacy.mode": "local"})


def test_client_level_dp_follows_the_methods_linear_attribute(monkeypatch) -> None:
    client = {"privacy.mode": "client", "privacy.noise-multiplier": 1.0, "method.weighting": "uniform"}
    linear = r"linear in the uploads \['fed_sb', 'fedit', 'fedsa_lora', 'fedsvd', 'ffa', 'rolora'\]"
    with pytest.raises(ConfigError, match=linear):
        FedLoraConfig.from_run_config({**client, "method.name": "lora_fair"})
    monkeypatch.setattr(aggregation_base, "_REGISTRY", dict(aggregation_base._REGISTRY))

    @aggregation_base.register
    class MeanOfB(FedIT):  # a new linear method: one class attribute, no list elsewhere to extend
        name = "mean_of_b"
        linear = True

    assert FedLoraConfig.from_run_config({**client, "method.name": "mean_of_b"}).method.name == "mean_of_b"


def test_sample_mode_owns_its_constraints() -> None:
    base = {"privacy.mode": "sample", "privacy.noise-multiplier": 1.0}
    with pytest.raises(ConfigError, match="data.packing"):
        FedLoraConfig.from_run_config({**base, "model.task": "causal_lm", "data.packing": True})
    with pytest.raises(ConfigError, match="needs privacy.target-epsilon > 0 .* or privacy.noise-multiplier > 0"):
        FedLoraConfig.from_run_config({"privacy.mode": "sample"})
    with pytest.raises(ConfigError, match="privacy.adaptive-clip"):
        FedLoraConfig.from_run_config({**base, "privacy.adaptive-clip": True})


def test_no_privacy_trains_exactly_like_the_plain_optimiser() -> None:
    cfg = FedLoraConfig.from_run_config({"model.max-length": 32, "adapter.rank": 4, "train.local-steps": 3,
                                         "train.batch-size": 4, "data.partition": "iid"})
    task, agg = get_task(cfg), make_aggregator(cfg)
    payload = initial_state(cfg, agg)
    res = fit(cfg, payload, 1, 4, 1, agg)
    model = task.build_model(agg.mode, 4)
    load_adapter_state(model, payload)
    _, enc, labels = task.client_data("train", 1, 4)
    losses, _, _ = optimise(model, enc, labels, task.batch_loss, cfg.train, round_seed(cfg.run.seed, 1, 1))
    assert res.metrics["first_loss"] == losses[0] and res.metrics["last_loss"] == losses[-1]
    assert res.privacy_state is None


class _Halving(PrivacyMode):
    """A test mode: halves every update (relative to the state the clients started from) and counts rounds."""

    name = "halving"
    calls: list[int] = []

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self.rounds = 0

    def privatise(self, reference, updates, num_nodes, clients_sampled):
        self.rounds += 1
        _Halving.calls.append(len(updates))
        half = [{k: reference[k] + 0.5 * (t - reference[k]) for k, t in u.tensors.items()} for u in updates]
        out = [dataclasses.replace(u, tensors=t) for u, t in zip(updates, half, strict=True)]
        return out, {"clip": 0.5}

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state) -> None:
        self.rounds = int(state.get("rounds", 0))


def test_the_strategy_calls_the_modes_hooks_and_checkpoints_its_state(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(privacy_base, "_REGISTRY", {**privacy_base._REGISTRY, "halving": _Halving})
    _Halving.calls.clear()
    _, rows, _ = run_local(tmp_path, **{"privacy.mode": "halving", "method.name": "fedit"})
    assert _Halving.calls == [3, 3]  # every round, all valid updates
    assert [r["clip"] for r in rows[1:]] == [0.5, 0.5]  # the mode's round stats reach metrics.jsonl
    state, rnd, meta = load_checkpoint(tmp_path)
    assert rnd == 2 and meta["privacy"] == {"rounds": 2}
    cfg = FedLoraConfig.from_run_config({"privacy.mode": "halving"})
    resumed = LoRAStrategy(cfg, make_aggregator(cfg), state, round_offset=rnd, resume_meta=meta)
    assert isinstance(resumed.privacy, _Halving) and resumed.privacy.rounds == 2


def test_halving_mode_changes_the_aggregate_by_half(tmp_path, monkeypatch) -> None:
    """FedIT is linear in the uploads: halving every delta halves the aggregate's move (head and B; A too)."""
    monkeypatch.setattr(privacy_base, "_REGISTRY", {**privacy_base._REGISTRY, "halving": _Halving})
    over = {"method.name": "fedit", "num-server-rounds": 1}
    run_local(tmp_path / "plain", **over)
    run_local(tmp_path / "half", **over, **{"privacy.mode": "halving"})
    plain, _, _ = load_checkpoint(tmp_path / "plain")
    half, _, _ = load_checkpoint(tmp_path / "half")
    cfg = FedLoraConfig.from_run_config({**FAST, **over})
    start = initial_state(cfg, make_aggregator(cfg))
    for k in start:
        torch.testing.assert_close(half[k] - start[k], 0.5 * (plain[k] - start[k]), atol=1e-6, rtol=1e-4)
