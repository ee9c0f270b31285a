"""LoRAStrategy through the real ServerApp/ClientApp on the in-process grid: what crosses the wire, frozen
factors sent once, rejection of bad updates, failures, exact byte accounting, checkpoint/resume, sampling."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict

import fedlora.server
from client.app import make_client_app
from fedlora import naming
from fedlora.aggregation import ClientUpdate
from fedlora.checkpoint import load_checkpoint
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.server import RunFailed, initial_state
from fedlora.strategy import LoRAStrategy
from fedlora.wire import from_record, logical_bytes, record_shapes, to_record
from tests.conftest import FAST, HETEROGENEOUS, METHODS, RANKS, run_local

NODES = 3


def _overrides(method: str) -> dict:
    o = {"method.name": method}
    if method in HETEROGENEOUS:
        o["adapter.ranks"] = RANKS
    return o


def _cfg(out, **overrides) -> FedLoraConfig:
    return FedLoraConfig.from_run_config({**FAST, "output-dir": str(out), **overrides})


def _train_msgs(grid, server_round: int | None = None) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
            and (server_round is None or int(m.content["config"]["server-round"]) == server_round)]


def _replies_to(grid, msgs: list[Message]) -> list[Message]:
    by_id = {r.metadata.reply_to_message_id: r for r in grid.replies}
    out = [by_id[m.metadata.message_id] for m in msgs]
    assert all(r.metadata.src_node_id == m.metadata.dst_node_id for m, r in zip(msgs, out, strict=True))
    return out


def _roles(keys) -> set[str]:
    return {s[1] for k in keys if (s := naming.split(k))}


def _frozen_keys(keys, frozen) -> list[str]:
    return [k for k in keys if (s := naming.split(k)) and s[1] in frozen]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """One 2-round, 3-node run per method, shared by the tests that only inspect it."""
    cache: dict[str, tuple] = {}

    def get(method: str):
        if method not in cache:
            out = tmp_path_factory.mktemp(method)
            grid, rows, summary = run_local(out, **_overrides(method))
            cache[method] = (out, grid, rows, summary)
        return cache[method]

    return get


# -- nothing but adapters and the head crosses the wire ----------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_and_head_tensors_cross_the_wire(method, method_runs):
    out, grid, rows, _ = method_runs(method)
    agg = make_aggregator(_cfg(out, **_overrides(method)))
    sent = _train_msgs(grid)
    assert len(sent) == 2 * NODES and len(grid.replies) == 2 * NODES
    assert all(r["clients_aggregated"] == NODES and not r["rejected"] for r in rows[1:])

    def allowed(k: str) -> bool:
        return naming.split(k) is not None or k.startswith("classifier.")

    for m in sent:
        keys = list(record_shapes(m.content["arrays"]))
        assert keys and all(allowed(k) for k in keys), f"{method}: non-adapter tensor sent down: {keys}"
    for r in grid.replies:
        assert not r.has_error()
        keys = list(record_shapes(r.content["arrays"]))
        assert all(allowed(k) for k in keys), f"{method}: non-adapter tensor sent up: {keys}"
        # Only the roles the method uploads (fed_sb: R; ffa/fedsvd: B) plus the head, for every layer.
        assert _roles(keys) == set(agg.uploads)
        layers = naming.layers_of(keys)
        assert len([k for k in keys if naming.split(k)]) == len(layers) * len(agg.uploads)
        assert any(k.startswith("classifier.") for k in keys)


# -- frozen factors travel once per node ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fed_sb", "ffa", "fedsvd", "fedit"])
def test_frozen_factors_are_sent_once_per_node(method, method_runs):
    out, grid, rows, _ = method_runs(method)
    agg = make_aggregator(_cfg(out, **_overrides(method)))
    r1, r2 = _train_msgs(grid, 1), _train_msgs(grid, 2)
    assert len(r1) == len(r2) == NODES
    if method == "fed_sb":
        assert agg.frozen == ("A", "B")
    elif method == "ffa":
        assert agg.frozen == ("A",)
    else:  # fedsvd re-derives A every round; fedit trains both: nothing is frozen, everything is resent
        assert agg.frozen == ()
    for m in r1:
        keys = list(record_shapes(m.content["arrays"]))
        assert _roles(keys) >= set(agg.frozen)
        assert bool(m.content["config"]["has-frozen"]) == bool(agg.frozen)
    for m in r2:
        keys = list(record_shapes(m.content["arrays"]))
        assert not _frozen_keys(keys, agg.frozen), f"{method}: frozen factors resent in round 2"
        assert m.content["config"]["has-frozen"] is False
        if not agg.frozen:
            assert set(keys) == set(record_shapes(r1[0].content["arrays"]))
    # Round 2 still trained on every node: the clients used their cached factors.
    assert rows[2]["round"] == 2 and rows[2]["clients_aggregated"] == NODES and not rows[2]["rejected"]
    assert all(not r.has_error() for r in _replies_to(grid, r2))
    if agg.frozen:
        assert rows[2]["bytes_down"] < rows[1]["bytes_down"]


# -- bad updates are dropped with a reason; the round goes on -------------------------------------------------
BAD_NODE = 1001
BASE_WEIGHT = "bert.encoder.layer.0.attention.self.query.weight"


def _nan(t: OrderedDict) -> OrderedDict:
    k = next(k for k in t if naming.split(k))
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")
    return t


def _wrong_shape(t: OrderedDict) -> OrderedDict:
    k = next(k for k in t if naming.split(k) and naming.split(k)[1] == "B")
    t[k] = t[k][:, :-1].contiguous()
    return t


def _base_weight(t: OrderedDict) -> OrderedDict:
    t[BASE_WEIGHT] = torch.zeros(64, 64)
    return t


def _missing(t: OrderedDict) -> OrderedDict:
    del t[next(k for k in t if naming.split(k))]
    return t


class CorruptingApp:
    """The real ClientApp, but node ``node``'s train reply is rebuilt with corrupted tensors."""

    def __init__(self, app, node: int, corrupt) -> None:
        self.app, self.node, self.corrupt = app, node, corrupt

    def __call__(self, msg: Message, context) -> Message:
        reply = self.app(msg, context)
        if context.node_id != self.node or msg.metadata.message_type != MessageType.TRAIN:
            return reply
        tensors = self.corrupt(from_record(reply.content["arrays"]))
        metrics = MetricRecord(dict(reply.content["metrics"]))
        return Message(RecordDict({"arrays": to_record(tensors), "metrics": metrics}), reply_to=msg)


def expected_aggregate(grid, cfg: FedLoraConfig, good_nodes: set[int], server_round: int = 1) -> OrderedDict:
    """What the aggregator makes of the good replies of ``server_round``, from the state that was sent then
    (fedit sends its whole state)."""
    agg = make_aggregator(cfg)
    sent = _train_msgs(grid, server_round)
    start = from_record(sent[0].content["arrays"])
    updates = []
    for r in _replies_to(grid, [m for m in sent if m.metadata.dst_node_id in good_nodes]):
        if not r.has_error():
            m = r.content["metrics"]
            updates.append(ClientUpdate(r.metadata.src_node_id, from_record(r.content["arrays"]),
                                        int(m["num-examples"]), int(m["rank"])))
    assert len(updates) == len(good_nodes)
    return agg.aggregate(start, updates)


@pytest.mark.parametrize(("corrupt", "reason"), [
    (_nan, "NaN"), (_wrong_shape, "shape"), (_base_weight, "unexpected tensors"), (_missing, "missing tensors"),
])
def test_bad_update_is_rejected_with_a_reason(corrupt, reason, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedlora")
    overrides = {"method.name": "fedit", "num-server-rounds": 1}
    app = CorruptingApp(make_client_app({**FAST, "output-dir": str(tmp_path), **overrides}), BAD_NODE, corrupt)
    grid, rows, _ = run_local(tmp_path, client_app=app, **overrides)

    assert [r["round"] for r in rows] == [0, 1]
    row = rows[1]
    assert row["clients_sampled"] == NODES and row["clients_aggregated"] == NODES - 1
    assert len(row["rejected"]) == 1
    assert f"node {BAD_NODE}" in row["rejected"][0] and reason in row["rejected"][0]
    if corrupt is _base_weight:
        assert BASE_WEIGHT in row["rejected"][0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fedlora"]
    assert any(str(BAD_NODE) in r.getMessage() and reason in r.getMessage() for r in warnings)

    # The new global state is exactly the aggregate of the two good updates.
    final, last_round, _ = load_checkpoint(tmp_path)
    assert last_round == 1
    expected = expected_aggregate(grid, _cfg(tmp_path, **overrides), {1000, 1002})
    assert list(final) == list(expected)
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_client_exception_fails_the_node_and_the_round_aggregates_the_rest(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedlora")
    overrides = {"method.name": "fedit", "num-server-rounds": 1}
    grid, rows, _ = run_local(tmp_path, fail_nodes={BAD_NODE}, **overrides)
    row = rows[1]
    assert row["clients_aggregated"] == NODES - 1 and len(row["failed"]) == 1 and not row["rejected"]
    assert f"node {BAD_NODE}" in row["failed"][0]
    assert "client error" in row["failed"][0] and "simulated failure" in row["failed"][0]
    assert any(r.levelno == logging.WARNING and "client error" in r.getMessage() for r in caplog.records)
    final, last_round, _ = load_checkpoint(tmp_path)
    expected = expected_aggregate(grid, _cfg(tmp_path, **overrides), {1000, 1002})
    assert last_round == 1 and all(torch.equal(final[k], expected[k]) for k in expected)


class _Recording(LoRAStrategy):
    instances: list[LoRAStrategy] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Recording.instances.append(self)


class FailInRound:
    def __init__(self, app, server_round: int) -> None:
        self.app, self.round = app, server_round

    def __call__(self, msg: Message, context) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and int(msg.content["config"]["server-round"]) == self.round:
            raise RuntimeError(f"node {context.node_id} is down")
        return self.app(msg, context)


def test_every_client_failing_leaves_the_state_unchanged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fedlora.server, "LoRAStrategy", _Recording)
    _Recording.instances.clear()
    caplog.set_level(logging.WARNING, logger="fedlora")
    overrides = {"method.name": "fed_sb", "num-server-rounds": 3}
    app = FailInRound(make_client_app({**FAST, "output-dir": str(tmp_path), **overrides}), 2)
    _, rows, summary = run_local(tmp_path, client_app=app, **overrides)  # must not raise

    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["clients_aggregated"] == NODES
    assert rows[2]["clients_aggregated"] == 0 and len(rows[2]["failed"]) == NODES
    assert rows[2]["train_loss"] is None
    assert rows[2]["global_loss"] == rows[1]["global_loss"]  # the same global adapter was evaluated
    assert rows[3]["clients_aggregated"] == NODES  # and the run recovers in the next round
    assert any("round 2 failed: 0 valid client update(s)" in r.getMessage() for r in caplog.records)
    assert summary["rounds"] == 3


def test_every_client_failing_in_every_round_ends_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(fedlora.server, "LoRAStrategy", _Recording)
    _Recording.instances.clear()
    overrides = {"method.name": "fedit"}
    with pytest.raises(RunFailed, match="no round aggregated a single client update"):  # not a success: exit != 0
        run_local(tmp_path, fail_nodes={1000, 1001, 1002}, **overrides)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["clients_aggregated"] for r in rows[1:]] == [0, 0]
    assert all(len(r["failed"]) == NODES for r in rows[1:])
    (strategy,) = _Recording.instances
    cfg = _cfg(tmp_path, **overrides)
    start = initial_state(cfg, make_aggregator(cfg))
    assert list(strategy.state) == list(start) and all(torch.equal(strategy.state[k], start[k]) for k in start)
    saved, last_round, meta = load_checkpoint(tmp_path)  # failed rounds are checkpointed: state unchanged
    assert last_round == 2 and meta["failed_rounds"] == 2 and all(torch.equal(saved[k], start[k]) for k in start)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert summary["rounds"] == 2


# -- exact byte accounting ---------------------------------------------------------------------------------
def test_fedit_bytes_are_exact(method_runs):
    out, grid, rows, summary = method_runs("fedit")
    cfg = _cfg(out, **{"method.name": "fedit"})
    state = initial_state(cfg, make_aggregator(cfg))
    state_bytes = sum(t.numel() * 4 for t in state.values())
    for r in rows[1:]:
        assert r["bytes_down"] == NODES * state_bytes
        assert r["bytes_up"] == NODES * state_bytes  # fedit uploads A, B and the head: the whole state
    _check_wire(grid, rows)
    assert summary["bytes_down_per_round"] == [NODES * state_bytes] * 2


def test_fed_sb_bytes_are_exact(method_runs):
    out, grid, rows, _ = method_runs("fed_sb")
    cfg = _cfg(out, **{"method.name": "fed_sb"})
    state = initial_state(cfg, make_aggregator(cfg))
    full = sum(t.numel() * 4 for t in state.values())
    lean = sum(t.numel() * 4 for k, t in state.items() if naming.split(k) is None or naming.split(k)[1] == "R")
    r = cfg.adapter.rank
    assert lean == 4 * (len(naming.layers_of(state)) * r * r + sum(t.numel() for k, t in state.items()
                                                                   if naming.split(k) is None))
    assert rows[1]["bytes_down"] == NODES * full  # round 1 ships the frozen B, A once
    assert rows[2]["bytes_down"] == NODES * lean
    assert rows[1]["bytes_up"] == rows[2]["bytes_up"] == NODES * lean  # R (r x r per layer) + head
    _check_wire(grid, rows)


def _check_wire(grid, rows) -> None:
    for row in rows[1:]:
        sent = _train_msgs(grid, row["round"])
        assert row["bytes_down"] == sum(logical_bytes(from_record(m.content["arrays"])) for m in sent)
        assert row["bytes_up"] == sum(logical_bytes(from_record(r.content["arrays"])) for r in _replies_to(grid, sent))
        assert row["wire_bytes_down"] > row["bytes_down"] and row["wire_bytes_up"] > row["bytes_up"]
    # No evaluation messages in these runs: the strategy's wire counts equal what the grid serialised.
    assert all(m.metadata.message_type == MessageType.TRAIN for m in grid.sent)
    assert sum(r["wire_bytes_down"] for r in rows) == grid.bytes_down
    assert sum(r["wire_bytes_up"] for r in rows) == grid.bytes_up


# -- checkpoint and resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fedit", "fed_sb"])
def test_resume_continues_exactly_where_the_run_stopped(method, tmp_path):
    # 4 nodes, half sampled per round: sampling and client seeds must follow the absolute round number.
    # Seed 1 samples different nodes in rounds 1 and 3 (checked below), so a resumed run that restarted its
    # round counter would train round 3 on round 1's nodes and diverge.
    common = {"method.name": method, "fraction-train": 0.5, "train.local-steps": 2, "seed": 1}
    grid_a, rows_a, _ = run_local(tmp_path / "resumed", num_nodes=4, **common, **{"num-server-rounds": 2})
    assert load_checkpoint(tmp_path / "resumed")[1] == 2
    grid_b, rows_b, _ = run_local(tmp_path / "resumed", num_nodes=4, **common,
                                  **{"num-server-rounds": 3, "resume": True})
    grid_c, rows_c, _ = run_local(tmp_path / "straight", num_nodes=4, **common, **{"num-server-rounds": 3})

    assert [r["round"] for r in rows_a] == [0, 1, 2]
    assert [r["round"] for r in rows_b] == [0, 1, 2, 3]  # exactly one new training row
    assert {int(m.content["config"]["server-round"]) for m in grid_b.sent} == {3}  # only round 3 trained
    resumed, last, _ = load_checkpoint(tmp_path / "resumed")
    straight, last_c, _ = load_checkpoint(tmp_path / "straight")
    assert last == last_c == 3
    sampled = _sampled(grid_c)
    assert sampled[1] != sampled[3]
    assert sorted(m.metadata.dst_node_id for m in grid_b.sent) == sampled[3]
    assert list(resumed) == list(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), \
        [k for k in straight if not torch.equal(resumed[k], straight[k])]
    assert rows_b[3]["global_loss"] == rows_c[3]["global_loss"]


# -- seeded sampling -------------------------------------------------------------------------------------------
def _sampled(grid) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in _train_msgs(grid):
        out.setdefault(int(m.content["config"]["server-round"]), []).append(m.metadata.dst_node_id)
    return {k: sorted(v) for k, v in out.items()}


def test_sampling_is_seeded(tmp_path):
    common = {"method.name": "fed_sb", "fraction-train": 0.5, "num-server-rounds": 3, "train.local-steps": 1}
    grid_a, rows_a, _ = run_local(tmp_path / "a", num_nodes=4, **common)
    grid_b, _, _ = run_local(tmp_path / "b", num_nodes=4, **common)
    a, b = _sampled(grid_a), _sampled(grid_b)
    assert sorted(a) == [1, 2, 3]
    assert all(len(set(nodes)) == 2 for nodes in a.values())
    assert all(r["clients_sampled"] == r["clients_aggregated"] == 2 for r in rows_a[1:])
    assert a == b

    # Frozen factors go to each node the first time it is sampled, whenever that is, and never again.
    seen: set[int] = set()
    for m in sorted(_train_msgs(grid_a), key=lambda m: int(m.content["config"]["server-round"])):
        nid, keys = m.metadata.dst_node_id, list(record_shapes(m.content["arrays"]))
        first = nid not in seen
        assert bool(_frozen_keys(keys, ("A", "B"))) == first, (nid, m.content["config"]["server-round"])
        assert m.content["config"]["has-frozen"] is first
        seen.add(nid)


class _Nodes:
    def __init__(self, ids) -> None:
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def test_sample_depends_on_seed_and_round_only(tmp_path):
    def sample(seed: int, server_round: int, nodes) -> list[int]:
        cfg = _cfg(tmp_path, **{"fraction-train": 0.5, "seed": seed})
        strategy = LoRAStrategy(cfg, make_aggregator(cfg), OrderedDict())
        return strategy._sample(_Nodes(nodes), cfg.run.fraction_train, server_round)

    nodes = [17, 5, 99, 42, 8, 63]
    assert len(sample(1, 1, nodes)) == 3
    assert sample(1, 1, nodes) == sample(1, 1, list(reversed(nodes)))  # node order does not matter
    assert len({tuple(sample(s, 1, nodes)) for s in range(10)}) > 1
    assert len({tuple(sample(1, r, nodes)) for r in range(1, 11)}) > 1


class ForgetStateInRound:
    """Node ``node`` loses its context.state (e.g. its SuperNode restarted) right before round ``server_round``."""

    def __init__(self, app, node: int, server_round: int) -> None:
        self.app, self.node, self.round = app, node, server_round

    def __call__(self, msg: Message, context) -> Message:
        if (context.node_id == self.node and msg.metadata.message_type == MessageType.TRAIN
                and int(msg.content["config"]["server-round"]) == self.round):
            for key in list(context.state.keys()):
                del context.state[key]
        return self.app(msg, context)


def test_node_that_lost_its_frozen_factors_gets_them_again(tmp_path):
    overrides = {"method.name": "fed_sb", "num-server-rounds": 3, "train.local-steps": 1}
    app = ForgetStateInRound(make_client_app({**FAST, "output-dir": str(tmp_path), **overrides}), BAD_NODE, 2)
    grid, rows, _ = run_local(tmp_path, client_app=app, **overrides)
    # Round 2: the server did not resend A, B (it had delivered them), so the node fails clearly ...
    assert rows[2]["clients_aggregated"] == NODES - 1
    assert "frozen factors" in rows[2]["failed"][0] and f"node {BAD_NODE}" in rows[2]["failed"][0]
    # ... and round 3 resends them to that node only, so it trains again.
    r3 = {m.metadata.dst_node_id: list(record_shapes(m.content["arrays"])) for m in _train_msgs(grid, 3)}
    assert [n for n, keys in r3.items() if _frozen_keys(keys, ("A", "B"))] == [BAD_NODE]
    assert rows[3]["clients_aggregated"] == NODES and not rows[3]["rejected"] and not rows[3]["failed"]
