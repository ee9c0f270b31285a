"""The server never trusts a client: every kind of bad train reply is dropped with a reason naming the node
and the fault, and the round's aggregate is exactly the aggregator's result on the good replies alone.

Drives LoRAStrategy.configure_train / aggregate_train directly with crafted Flower messages (no clients)."""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora import naming
from fedlora.aggregation import ClientUpdate
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.server import initial_state
from fedlora.strategy import LoRAStrategy
from fedlora.wire import from_record, to_record
from tests.conftest import FAST

NODES = [1000, 1001, 1002]
BAD = 1001
BASE_WEIGHT = "bert.encoder.layer.0.attention.self.query.weight"


class _Grid:
    """All configure_train needs of a Grid: the connected nodes."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


@lru_cache(maxsize=4)
def _initial(method: str, ranks: str) -> OrderedDict[str, torch.Tensor]:
    cfg = FedLoraConfig.from_run_config({**FAST, "method.name": method, "adapter.ranks": ranks})
    return initial_state(cfg, make_aggregator(cfg))


def _strategy(method: str = "fedit", **overrides) -> LoRAStrategy:
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    cfg = FedLoraConfig.from_run_config({**FAST, "method.name": method, **overrides})
    state = OrderedDict((k, v.clone()) for k, v in _initial(method, cfg.adapter.ranks).items())
    return LoRAStrategy(cfg, make_aggregator(cfg), state)


def _upload(strategy: LoRAStrategy, rank: int, seed: int, scale: float = 0.01) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = strategy.agg.expected_upload(strategy.state, rank)
    return OrderedDict((k, scale * torch.randn(s, generator=gen)) for k, s in shapes.items())


Reply = tuple[object, object]  # (arrays record or anything, metrics record or anything)


def _good(strategy: LoRAStrategy, node: int, rank: int) -> Reply:
    return to_record(_upload(strategy, rank, node)), MetricRecord({"num-examples": 10 + node % 7, "rank": float(rank),
                                                                  "train_loss": 1.5})


def _run_round(strategy: LoRAStrategy, bad: Callable[[LoRAStrategy], Reply], ranks: dict[int, int] | None = None):
    """One round: the good nodes send valid uploads, node BAD sends ``bad(strategy)``. Returns the new state
    (or None), the round's stats and the state the aggregator alone makes of the good uploads."""
    ranks = ranks or {n: strategy.cfg.adapter.rank for n in NODES}
    start = OrderedDict((k, v.clone()) for k, v in strategy.state.items())
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid()))
    replies = []
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"msg-{i}"
        node = m.metadata.dst_node_id
        arrays, metrics = bad(strategy) if node == BAD else _good(strategy, node, ranks[node])
        content = RecordDict()
        if arrays is not None:
            content["arrays"] = arrays
        if metrics is not None:
            content["metrics"] = metrics
        replies.append(Message(content, reply_to=m))
    record, _ = strategy.aggregate_train(1, reversed(replies))  # arrival order must not matter
    good = []
    for node in NODES:
        if node != BAD:
            arrays, metrics = _good(strategy, node, ranks[node])
            good.append(ClientUpdate(node, from_record(arrays), int(metrics["num-examples"]), ranks[node]))
    expected = strategy.agg.aggregate(start, good)
    return (from_record(record) if record is not None else None), strategy.stats[1], expected


def _check(strategy: LoRAStrategy, bad: Callable[[LoRAStrategy], Reply], *reason: str, caplog=None,
           ranks: dict[int, int] | None = None) -> None:
    new, stats, expected = _run_round(strategy, bad, ranks)
    assert stats.clients_aggregated == len(NODES) - 1 and len(stats.rejected) == 1 and not stats.failed
    assert stats.rejected[0].startswith(f"node {BAD}: ")
    for part in reason:
        assert part in stats.rejected[0], stats.rejected[0]
    assert new is not None and list(new) == list(expected)
    assert all(torch.equal(new[k], expected[k]) for k in expected), "aggregate differs from the good replies' one"
    if caplog is not None:
        assert any(str(BAD) in r.getMessage() and reason[0] in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)


def _with_tensors(edit: Callable[[OrderedDict[str, torch.Tensor]], None], **metrics) -> Callable:
    def make(strategy: LoRAStrategy) -> Reply:
        t = _upload(strategy, strategy.cfg.adapter.rank, BAD)
        edit(t)
        m = {"num-examples": 12, "rank": float(strategy.cfg.adapter.rank), "train_loss": 1.5, **metrics}
        return to_record(t), MetricRecord(m)

    return make


def _first(t: OrderedDict, role: str = "B") -> str:
    return next(k for k in t if (s := naming.split(k)) and s[1] == role)


# -- tensors ---------------------------------------------------------------------------------------------------
def test_extra_base_weight_is_rejected_as_a_base_weight(caplog):
    caplog.set_level(logging.WARNING, logger="fedlora")
    _check(_strategy(), _with_tensors(lambda t: t.__setitem__(BASE_WEIGHT, torch.zeros(64, 64))),
           "unexpected tensors", BASE_WEIGHT, "base-model weights", caplog=caplog)


def test_adapter_role_the_method_does_not_upload_is_rejected():
    s = _strategy("ffa")  # FFA uploads B only; an A would overwrite the shared frozen A
    a_key = naming.key(naming.layers_of(s.state)[0], "A")
    _check(s, _with_tensors(lambda t: t.__setitem__(a_key, torch.zeros(4, 64))), "unexpected tensors", a_key,
           "does not upload")


def test_missing_tensor_is_rejected():
    s = _strategy()
    key = _first(_upload(s, 4, 0))
    _check(s, _with_tensors(lambda t: t.pop(key)), "missing tensors", key)


def test_wrong_shape_is_rejected():
    s = _strategy()
    key = _first(_upload(s, 4, 0))
    _check(s, _with_tensors(lambda t: t.__setitem__(key, t[key][:, :-1].contiguous())), "shape", key,
           "expected (64, 4)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_wrong_dtype_is_rejected_before_decoding(dtype):
    def make(strategy):
        t = _upload(strategy, 4, BAD)
        key = _first(t)
        record = ArrayRecord(OrderedDict((k, v.to(dtype) if k == key else v) for k, v in t.items()))
        return record, MetricRecord({"num-examples": 12, "rank": 4.0, "train_loss": 1.5})

    _check(_strategy(), make, "dtype", str(dtype).removeprefix("torch."), "expected 'float32'")


def test_array_declaring_float32_but_carrying_float64_is_rejected():
    def make(strategy):
        t = _upload(strategy, 4, BAD)
        key = _first(t)
        buf = io.BytesIO()
        np.save(buf, t[key].double().numpy(), allow_pickle=False)
        arrays = OrderedDict((k, Array(v.numpy())) for k, v in t.items())
        arrays[key] = Array(dtype="float32", shape=tuple(t[key].shape), stype="numpy.ndarray", data=buf.getvalue())
        return ArrayRecord(arrays), MetricRecord({"num-examples": 12, "rank": 4.0, "train_loss": 1.5})

    _check(_strategy(), make, "decodes to dtype float64")


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf")])
def test_non_finite_values_are_rejected(value, word):
    def edit(t):
        key = _first(t)
        t[key][0, 0] = value

    _check(_strategy(), _with_tensors(edit), word)


def test_update_norm_over_the_bound_is_rejected():
    s = _strategy(**{"max-update-norm": 5.0})
    good_norm = max(float(torch.sqrt(sum((v.double() ** 2).sum() for v in _upload(s, 4, n).values())))
                    for n in NODES)
    assert good_norm < 5.0  # the good uploads pass the bound ...

    def edit(t):  # ... and an upload scaled to norm ~10 does not, though every value stays small (< 1e6)
        for k in t:
            t[k] *= 10.0 / good_norm

    _check(s, _with_tensors(edit), "L2 norm", "max-update-norm=5")


def test_norm_bound_off_by_default():
    s = _strategy()
    assert s.cfg.run.max_update_norm == 0.0
    new, stats, _ = _run_round(s, _with_tensors(lambda t: [t[k].mul_(1000.0) for k in t]))
    assert new is not None and stats.clients_aggregated == 3 and not stats.rejected


# -- metrics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "reason"), [
    (0, "num-examples=0 must be > 0"),
    (-5, "num-examples=-5 must be > 0"),
    (10_000_001, "exceeds max-num-examples=10000000"),
    (12.5, "must be an int, got float"),
    (12.0, "must be an int, got float"),  # the client sends an int; a float is not what our codec makes
])
def test_bad_num_examples_is_rejected(value, reason):
    _check(_strategy(), _with_tensors(lambda t: None, **{"num-examples": value}), reason)


def test_num_examples_bound_is_configurable():
    _check(_strategy(**{"max-num-examples": 50}), _with_tensors(lambda t: None, **{"num-examples": 51}),
           "num-examples=51 exceeds max-num-examples=50")


def test_num_examples_of_another_type_is_rejected():
    def make(strategy):
        arrays, _ = _with_tensors(lambda t: None)(strategy)
        return arrays, ConfigRecord({"num-examples": "12", "rank": 4, "train_loss": 1.5})

    _check(_strategy(), make, "num-examples='12' must be an int, got str")


def test_rank_not_configured_is_rejected():
    # fedit at adapter.rank=4: a rank-3 upload with consistent rank-3 shapes is still refused.
    def make(strategy):
        return to_record(_upload(strategy, 3, BAD)), MetricRecord({"num-examples": 12, "rank": 3.0,
                                                                   "train_loss": 1.5})

    _check(_strategy(), make, "rank=3 is not an allowed adapter rank [4]")


def test_rank_outside_adapter_ranks_is_rejected_for_heterogeneous_methods():
    # FLoRA accepts any rank by itself; the server only accepts the configured per-client ranks.
    s = _strategy("flora", **{"adapter.ranks": "2,4"})
    ranks = {1000: 2, 1002: 4}

    def make(strategy):
        return to_record(_upload(strategy, 3, BAD)), MetricRecord({"num-examples": 12, "rank": 3.0,
                                                                   "train_loss": 1.5})

    _check(s, make, "rank=3 is not an allowed adapter rank [2, 4]", ranks=ranks)


def test_fractional_rank_is_rejected():
    _check(_strategy(), _with_tensors(lambda t: None, rank=4.5), "rank=4.5 must be a whole number")


# -- malformed ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "reason"), [
    (lambda s: (None, MetricRecord({"num-examples": 12, "rank": 4.0, "train_loss": 1.5})), "malformed reply"),
    (lambda s: (_good(s, BAD, 4)[0], None), "malformed reply"),
    (lambda s: (_good(s, BAD, 4)[0], MetricRecord({"num-examples": 12, "train_loss": 1.5})), "'rank'"),
    (lambda s: (_good(s, BAD, 4)[0], MetricRecord({"num-examples": 12, "rank": 4.0})), "'train_loss'"),
    (lambda s: (MetricRecord({"x": 1.0}), _good(s, BAD, 4)[1]), "expected an ArrayRecord"),
    (lambda s: (_good(s, BAD, 4)[0], MetricRecord({"num-examples": 12, "rank": 4.0, "train_loss": float("nan")})),
     "train_loss=nan is not finite"),
])
def test_malformed_reply_is_rejected(make, reason):
    _check(_strategy(), make, reason)


def test_valid_replies_from_the_real_codec_pass():
    new, stats, expected = _run_round(_strategy(), lambda s: _good(s, BAD, 4))
    assert stats.clients_aggregated == 3 and not stats.rejected
    assert new is not None and all(k in new for k in expected)
