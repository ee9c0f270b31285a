"""The default bounds on one client's influence (weights, delta norms), the divergence guard, and clients whose
local loss turns non-finite."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.checkpoint import checkpoint_path, read_checkpoint
from fedlora.config import ConfigError, FedLoraConfig, TrainConfig
from fedlora.influence import bound_norms, bound_weights, delta_norm, robust_median
from fedlora.robust import RobustConfig
from fedlora.server import RunFailed
from fedlora.tasks import get_task
from fedlora.train import NonFiniteLoss, optimise
from tests.conftest import FAST, run_local
from tests.test_attacks import _attacked

LAYER = "enc.query"


def _state(gen: torch.Generator, r: int = 4) -> dict[str, torch.Tensor]:
    return {naming.key(LAYER, "A"): torch.randn(r, 12, generator=gen),
            naming.key(LAYER, "B"): torch.randn(10, r, generator=gen) * 0.1,
            "classifier.weight": torch.randn(3, 10, generator=gen)}


def test_median_is_the_smaller_of_two_and_the_ordinary_one_from_three() -> None:
    assert robust_median([5.0, 1.0]) == 1.0 and robust_median([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_weights_are_capped_at_a_multiple_of_the_median_and_pinned_to_the_first_claim() -> None:
    ups = [ClientUpdate(i, {}, n, 4) for i, n in enumerate([100, 120, 110, 9_999_999])]
    first: dict[int, int] = {}
    out, notes = bound_weights(ups, first, RobustConfig(weight_cap=2.0))
    assert [u.num_examples for u in out] == [100, 120, 110, 230]  # 2 x median(100, 110, 120, 9999999) = 230
    assert len(notes) == 1 and "node 3: num-examples 9999999 counted as 230" in notes[0]
    later = [ClientUpdate(0, {}, 100, 4), ClientUpdate(1, {}, 500, 4), ClientUpdate(2, {}, 110, 4)]
    out, notes = bound_weights(later, first, RobustConfig(weight_cap=0.0))  # no cap: the pin alone
    assert [u.num_examples for u in out] == [100, 120, 110] and "first reported 120" in notes[0]


def test_linear_method_deltas_are_clipped_exactly_to_the_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    agg = get_aggregator("fedit", AggregatorConfig(rank=4, alpha=8.0))
    state = _state(gen)
    ups = [ClientUpdate(i, {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}, 10, 4)
           for i in range(4)]
    ups[3] = ClientUpdate(3, {k: v - 50 * (ups[3].tensors[k] - v) for k, v in state.items()}, 10, 4)
    payloads = {u.client_id: state for u in ups}
    norms = [delta_norm(agg, state, u) for u in ups]
    kept, clipped, rejected, median = bound_norms(agg, payloads, ups, RobustConfig(norm_bound=2.0))
    assert median == pytest.approx(robust_median(norms)) and not rejected and len(clipped) == 1
    assert delta_norm(agg, state, kept[3]) == pytest.approx(2.0 * median, rel=1e-5)
    direction = {k: (ups[3].tensors[k] - state[k]) / norms[3] for k in state}
    for k in state:  # the clipped delta keeps its direction
        torch.testing.assert_close((kept[3].tensors[k] - state[k]) / (2.0 * median), direction[k], atol=1e-5,
                                   rtol=1e-4)
    assert all(kept[i] is ups[i] for i in range(3))


def test_product_methods_measure_the_product_and_clip_fresh_adapters_or_reject() -> None:
    gen = torch.Generator().manual_seed(1)
    state = _state(gen)
    a, b = state[naming.key(LAYER, "A")], state[naming.key(LAYER, "B")]
    flora = get_aggregator("flora", AggregatorConfig(rank=4, alpha=8.0))
    big = ClientUpdate(0, {**state, naming.key(LAYER, "B"): 100 * b}, 10, 4)
    head = {"classifier.weight": state["classifier.weight"]}
    dense = torch.linalg.matrix_norm(2.0 * 100 * b @ a)  # s = alpha / r = 2; FLoRA starts from B0 = 0
    assert delta_norm(flora, head, big) == pytest.approx(float(dense), rel=1e-6)
    small = [ClientUpdate(i, {**state, naming.key(LAYER, "B"): b * (1 + 0.1 * i)}, 10, 4) for i in range(1, 4)]
    kept, clipped, rejected, _ = bound_norms(flora, {u.client_id: head for u in [big, *small]}, [big, *small],
                                             RobustConfig(norm_bound=2.0))
    assert len(clipped) == 1 and not rejected and torch.allclose(kept[0].tensors[naming.key(LAYER, "A")], a)
    lora_fair = get_aggregator("lora_fair", AggregatorConfig(rank=4, alpha=8.0))
    moved = ClientUpdate(0, {**state, naming.key(LAYER, "B"): b + 100 * b}, 10, 4)
    same_product = ClientUpdate(1, {naming.key(LAYER, "A"): 2 * a, naming.key(LAYER, "B"): b / 2,
                                    "classifier.weight": state["classifier.weight"]}, 10, 4)
    assert delta_norm(lora_fair, state, same_product) == pytest.approx(0.0, abs=1e-5)  # B A unchanged: no delta
    others = [ClientUpdate(i, {**state, naming.key(LAYER, "B"): b * (1 + 0.01 * i)}, 10, 4) for i in range(2, 5)]
    kept, clipped, rejected, _ = bound_norms(lora_fair, {u.client_id: state for u in [moved, *others]},
                                             [moved, *others], RobustConfig(norm_bound=2.0))
    assert not clipped and len(rejected) == 1 and "node 0" in rejected[0] and [u.client_id for u in kept] == [2, 3, 4]


def test_robust_keys_are_validated_and_rules_need_a_linear_method() -> None:
    with pytest.raises(ConfigError, match="robust.weight-cap=0.5 must be >= 1"):
        FedLoraConfig.from_run_config({"robust.weight-cap": 0.5})
    with pytest.raises(ConfigError, match="robust.rule='median' applies to methods whose aggregate is linear"):
        FedLoraConfig.from_run_config({"robust.rule": "median", "method.name": "flora"})
    assert FedLoraConfig.from_run_config({"robust.rule": "median", "method.name": "fed_sb"}).robust.rule == "median"


def test_divergence_guard_rolls_back_a_destructive_round_and_the_run_goes_on(tmp_path) -> None:
    """Defaults off, so the blown-up update reaches the aggregate (server loss 1.79 -> 2.02 -> 57.3 unguarded):
    with the guard at 1.2 x the last accepted loss, round 2 is undone and the run ends normally."""
    cfg = {**FAST, "method.name": "fedit", "robust.norm-bound": 0.0, "robust.weight-cap": 0.0,
           "robust.divergence-factor": 1.2, "output-dir": str(tmp_path)}
    run_local(tmp_path, num_nodes=4, client_app=_attacked(cfg, "scaled", {1003}),
              **{k: v for k, v in cfg.items() if k not in FAST and k != "output-dir"})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["rolled_back"] is None and rows[1]["global_loss"] < 1.2 * rows[0]["global_loss"]
    assert "rolled back to the state before round 2" in rows[2]["rolled_back"] and "1003" in rows[2]["rolled_back"]
    assert rows[2]["global_loss"] == rows[1]["global_loss"]  # the metrics of the state that stands
    after_1, _, _ = read_checkpoint(checkpoint_path(tmp_path, 1))
    after_2, _, _ = read_checkpoint(checkpoint_path(tmp_path, 2))
    assert all(torch.equal(after_1[k], after_2[k]) for k in after_1)  # round 2's checkpoint holds round 1's state


def test_a_client_whose_loss_turns_non_finite_stops_and_reports_it(tmp_path) -> None:
    cfg = FedLoraConfig.from_run_config({**FAST, "train.lr": 1e20})
    task = get_task(cfg)
    model = task.build_model("lora", 4)
    _, enc, labels = task.client_data("train", 0, 3)
    with pytest.raises(NonFiniteLoss, match="is not finite at step"):
        optimise(model, enc, labels, task.batch_loss, TrainConfig(local_steps=5, batch_size=8, lr=1e20), seed=0)
    with pytest.raises(RunFailed):
        run_local(tmp_path, **{"train.lr": 1e20, "train.local-steps": 5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["failed"]) == 3 and all("is not finite at step" in f for f in r["failed"]) for r in rows[1:])
    assert not any(r["rejected"] for r in rows)  # no NaN weights were uploaded


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "multi_krum"])
def test_robust_rules_hold_off_a_blown_up_update_without_the_norm_bound(rule, tmp_path) -> None:
    """The rule alone (norm bound, weight cap and divergence guard off) keeps the attacked run near the clean one."""
    cfg = {**FAST, "method.name": "fed_sb", "robust.norm-bound": 0.0, "robust.weight-cap": 0.0,
           "robust.divergence-factor": 0.0, "robust.rule": rule, "robust.trim-fraction": 0.25,
           "robust.krum-byzantine": 1}
    own = {k: v for k, v in cfg.items() if k not in FAST}
    _, clean, _ = run_local(tmp_path / "clean", num_nodes=5, **own)
    _, rows, _ = run_local(tmp_path / "attacked", num_nodes=5,
                           client_app=_attacked({**cfg, "output-dir": str(tmp_path / "attacked")}, "scaled", {1004}),
                           **own)
    assert abs(rows[-1]["global_loss"] - clean[-1]["global_loss"]) <= 0.05
    assert all(r["robust"]["rule"] == rule for r in rows[1:])
    if rule == "multi_krum":
        assert all(1004 not in r["robust"]["krum_selected"] for r in rows[1:])
    if rule != "median":
        return
    unprotected = {**own, "robust.rule": "mean"}  # once: the same attack, undefended, gets through
    _, bad, _ = run_local(tmp_path / "mean", num_nodes=5,
                          client_app=_attacked({**cfg, **unprotected, "output-dir": str(tmp_path / "mean")}, "scaled",
                                               {1004}), **unprotected)
    assert abs(bad[-1]["global_loss"] - clean[-1]["global_loss"]) > 0.5  # the same attack, undefended, gets through
