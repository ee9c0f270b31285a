"""The Flower ClientApp called directly with messages built as the strategy builds them (no grid, no server)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import FROZEN_KEY, make_client_app
from fedlora import naming
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.server import initial_state
from fedlora.tasks import get_task
from fedlora.wire import from_record, to_record
from tests.conftest import FAST

NUM_NODES = 3


@pytest.fixture(autouse=True)
def _task_identity():
    # Message(...) reads the process-global task identity (docs/flower-notes.md note 8).
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def _cfg(method: str, **extra) -> dict:
    return {**FAST, "method.name": method, **extra}


def _context(partition_id: int | None = 0, state: RecordDict | None = None, num_nodes: int = NUM_NODES) -> Context:
    node_config = {"num-partitions": num_nodes}
    if partition_id is not None:
        node_config["partition-id"] = partition_id
    return Context(run_id=1, node_id=1000 + (partition_id or 0), node_config=node_config,
                   state=RecordDict() if state is None else state, run_config={})


def _train_message(payload: dict[str, torch.Tensor], server_round: int, method: str, has_frozen: bool) -> Message:
    """What LoRAStrategy.configure_train sends one node."""
    config = ConfigRecord({"server-round": server_round, "method": method, "has-frozen": has_frozen})
    return Message(RecordDict({"arrays": to_record(payload), "config": config}), dst_node_id=1000,
                   message_type=MessageType.TRAIN)


def _setup(method: str, **extra):
    run_config = _cfg(method, **extra)
    cfg = FedLoraConfig.from_run_config(run_config)
    agg = make_aggregator(cfg)
    state = initial_state(cfg, agg)
    return run_config, cfg, agg, state


@pytest.mark.parametrize("method", ["fedit", "ffa", "fed_sb", "flora"])
def test_train_reply_holds_exactly_the_upload(method):
    run_config, cfg, agg, state = _setup(method)
    app = make_client_app(run_config)
    payload = agg.client_payload(state, cfg.adapter.rank)
    reply = app(_train_message(payload, 1, method, bool(agg.frozen)), _context(0))

    assert not reply.has_error()
    assert set(reply.content.array_records) == {"arrays"}
    tensors = from_record(reply.content["arrays"])
    expected = agg.expected_upload(state, cfg.adapter.rank)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    roles = {s[1] for k in tensors if (s := naming.split(k))}
    assert roles == set(agg.uploads)  # e.g. fed_sb: R only, never its frozen B and A
    extras = [k for k in tensors if naming.split(k) is None]
    assert extras and all(k.startswith("classifier.") for k in extras)
    assert all(torch.isfinite(t).all() for t in tensors.values())

    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0
    assert int(metrics["rank"]) == cfg.adapter.rank
    assert "train_loss" in metrics


def test_frozen_factors_are_cached_in_context_state_and_reused():
    run_config, cfg, agg, state = _setup("fed_sb")
    app = make_client_app(run_config)
    ctx = _context(1)
    full = agg.client_payload(state, cfg.adapter.rank)
    r1 = app(_train_message(full, 1, "fed_sb", True), ctx)
    assert not r1.has_error()
    assert FROZEN_KEY in ctx.state
    cached = from_record(ctx.state[FROZEN_KEY])
    assert {naming.split(k)[1] for k in cached} == {"A", "B"}
    assert all(torch.equal(cached[k], full[k]) for k in cached)

    # Round 2: the server sends only R + head; the client fills in A, B from its cache.
    lean = {k: v for k, v in full.items() if not ((s := naming.split(k)) and s[1] in agg.frozen)}
    r2 = app(_train_message(lean, 2, "fed_sb", False), ctx)
    assert not r2.has_error()
    assert set(from_record(r2.content["arrays"])) == set(agg.expected_upload(state, cfg.adapter.rank))


def test_fed_sb_without_frozen_factors_and_no_cache_fails_clearly():
    run_config, cfg, agg, state = _setup("fed_sb")
    app = make_client_app(run_config)
    payload = agg.client_payload(state, cfg.adapter.rank)
    lean = {k: v for k, v in payload.items() if not ((s := naming.split(k)) and s[1] in agg.frozen)}
    with pytest.raises(RuntimeError, match="frozen factors") as err:
        app(_train_message(lean, 2, "fed_sb", False), _context(0))
    assert "'A'" in str(err.value) and "'B'" in str(err.value)
    assert "fed_sb" in str(err.value)


def test_node_without_partition_id_gets_a_clear_error():
    run_config, cfg, agg, state = _setup("fedit")
    app = make_client_app(run_config)
    payload = agg.client_payload(state, cfg.adapter.rank)
    with pytest.raises(ValueError, match="partition-id") as err:
        app(_train_message(payload, 1, "fedit", False), _context(None))
    assert "--node-config" in str(err.value)


@pytest.mark.parametrize("partition_id", range(NUM_NODES))
def test_num_examples_is_the_partition_size(partition_id):
    # Dirichlet partitions have different sizes, so a client reporting the wrong one is caught.
    run_config, cfg, agg, state = _setup("fedit", **{"data.partition": "dirichlet", "train.local-steps": 1})
    sizes = [len(get_task(cfg).client_dataset("train", i, NUM_NODES)) for i in range(NUM_NODES)]
    assert len(set(sizes)) > 1
    app = make_client_app(run_config)
    payload = agg.client_payload(state, cfg.adapter.rank)
    reply = app(_train_message(payload, 1, "fedit", False), _context(partition_id))
    assert int(reply.content["metrics"]["num-examples"]) == sizes[partition_id]


def test_evaluate_reply_carries_metrics_only():
    run_config, cfg, agg, state = _setup("fedit")
    app = make_client_app(run_config)
    payload = agg.client_payload(state, cfg.adapter.rank)
    msg = Message(RecordDict({"arrays": to_record(payload),
                              "config": ConfigRecord({"server-round": 1, "method": "fedit", "has-frozen": False})}),
                  dst_node_id=1000, message_type=MessageType.EVALUATE)
    ctx = _context(2)
    reply = app(msg, ctx)
    assert not reply.has_error()
    assert not reply.content.array_records  # nothing travels back up in evaluation
    m = reply.content["metrics"]
    assert int(m["num-examples"]) == len(get_task(cfg).client_dataset("test", 2, NUM_NODES)) > 0
    assert 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0
