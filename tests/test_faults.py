"""Faults in a real (in-process) federation: a client that raises, one that never replies, one the SuperLink
reports gone. The round aggregates the others (exactly the good replies' aggregate), names who failed and why;
below the minimum of valid updates the global state stays; max-failed-rounds failures in a row end the run."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from client.app import make_client_app
from fedlora.checkpoint import checkpoint_path, load_checkpoint, read_checkpoint
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.localgrid import LocalGrid, NodeVanished
from fedlora.server import RunFailed
from fedlora.strategy import LoRAStrategy
from server.app import make_server_app
from tests.conftest import FAST, run_local
from tests.test_strategy import expected_aggregate

BAD = 1001
GOOD = {1000, 1002}


class FaultInRound:
    """The real ClientApp, but node ``node``'s train message of round ``server_round`` raises ``error``."""

    def __init__(self, out, overrides: dict, server_round: int, error: Exception, nodes=(BAD,)) -> None:
        self.app = make_client_app({**FAST, "output-dir": str(out), **overrides})
        self.round, self.error, self.nodes = server_round, error, set(nodes)

    def __call__(self, msg: Message, context) -> Message:
        if (context.node_id in self.nodes and msg.metadata.message_type == MessageType.TRAIN
                and int(msg.content["config"]["server-round"]) == self.round):
            raise self.error
        return self.app(msg, context)


def _cfg(out, **overrides) -> FedLoraConfig:
    return FedLoraConfig.from_run_config({**FAST, "output-dir": str(out), **overrides})


def _assert_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected), [k for k in expected
                                                                         if not torch.equal(actual[k], expected[k])]


def test_client_raising_in_round_2_fails_that_node_only(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedlora")
    overrides = {"method.name": "fedit"}
    app = FaultInRound(tmp_path, overrides, 2, RuntimeError("CUDA out of memory"))
    grid, rows, _ = run_local(tmp_path, client_app=app, **overrides)

    assert rows[1]["clients_aggregated"] == 3 and not rows[1]["failed"]
    assert rows[2]["clients_aggregated"] == 2 and not rows[2]["rejected"]
    (failure,) = rows[2]["failed"]
    assert failure.startswith(f"node {BAD}: client error") and "CUDA out of memory" in failure
    assert any(f"node {BAD} failed" in r.getMessage() and "CUDA out of memory" in r.getMessage()
               for r in caplog.records)
    final, last, _ = load_checkpoint(tmp_path)
    assert last == 2
    _assert_state(final, expected_aggregate(grid, _cfg(tmp_path, **overrides), GOOD, server_round=2))


def test_node_vanishing_mid_round_is_named_and_the_round_completes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedlora")
    overrides = {"method.name": "fedit", "round-timeout": 7}
    app = FaultInRound(tmp_path, overrides, 2, NodeVanished())
    grid, rows, _ = run_local(tmp_path, client_app=app, **overrides)

    assert grid.timeouts and all(t == 7.0 for t in grid.timeouts)  # every wait is bounded by round-timeout
    assert rows[2]["clients_aggregated"] == 2
    assert rows[2]["failed"] == [f"node {BAD}: no reply within round-timeout=7 s (node vanished, crashed or too slow)"]
    assert any("no reply within round-timeout=7 s" in r.getMessage() for r in caplog.records)
    _assert_state(load_checkpoint(tmp_path)[0],
                  expected_aggregate(grid, _cfg(tmp_path, **overrides), GOOD, server_round=2))
    assert rows[2]["bytes_up"] < rows[1]["bytes_up"]  # nothing counted for the missing reply


def test_node_reported_unavailable_by_the_superlink_is_attributed_to_that_node(tmp_path):
    # flwr's link state answers for a node that missed its heartbeats with an error whose source is the
    # SuperLink (node id 1): the strategy must match it to the message it answers, not to its source.
    cfg = {**FAST, "output-dir": str(tmp_path), "method.name": "fedit", "num-server-rounds": 1}
    grid = LocalGrid(make_client_app(cfg), 3, unavailable_nodes={BAD})
    make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert any(r.has_error() and r.metadata.src_node_id == 1 for r in grid.replies)
    assert row["clients_aggregated"] == 2
    (failure,) = row["failed"]
    assert failure.startswith(f"node {BAD}: client error (code 5)") and "heartbeats" in failure
    _assert_state(load_checkpoint(tmp_path)[0], expected_aggregate(grid, _cfg(tmp_path, **cfg), GOOD))


@pytest.mark.parametrize(("min_clients", "fraction", "round_2_ok"), [
    (3, 0.0, False),  # 2 valid of 3 sampled < 3
    (1, 0.9, False),  # ceil(0.9 * 3) = 3
    (1, 0.6, True),  # ceil(0.6 * 3) = 2
    (2, 0.0, True),
])
def test_minimum_of_valid_updates(tmp_path, min_clients, fraction, round_2_ok):
    overrides = {"method.name": "fedit", "num-server-rounds": 3, "train.local-steps": 1,
                 "min-fit-clients": min_clients, "min-fit-fraction": fraction, "keep-checkpoints": 3}
    app = FaultInRound(tmp_path, overrides, 2, RuntimeError("node down"))
    grid, rows, summary = run_local(tmp_path, client_app=app, **overrides)

    assert [r["round"] for r in rows] == [0, 1, 2, 3] and summary["rounds"] == 3
    assert rows[2]["clients_required"] == (2 if round_2_ok else 3)
    assert rows[2]["clients_aggregated"] == 2 and len(rows[2]["failed"]) == 1
    after_1, after_2 = (read_checkpoint(checkpoint_path(tmp_path, r))[0] for r in (1, 2))
    if round_2_ok:
        _assert_state(after_2, expected_aggregate(grid, _cfg(tmp_path, **overrides), GOOD, server_round=2))
        assert rows[2]["train_loss"] is not None
    else:  # the two good updates are not enough: the global state stays as it was after round 1
        _assert_state(after_2, after_1)
        assert rows[2]["train_loss"] is None and rows[2]["global_loss"] == rows[1]["global_loss"]
        assert read_checkpoint(checkpoint_path(tmp_path, 2))[2]["failed_rounds"] == 1
    assert rows[3]["clients_aggregated"] == 3  # the run goes on and recovers
    assert read_checkpoint(checkpoint_path(tmp_path, 3))[2]["failed_rounds"] == 0


def test_max_failed_rounds_in_a_row_end_the_run_with_the_last_good_state(tmp_path, capsys, monkeypatch):
    instances: list[LoRAStrategy] = []

    class Recording(LoRAStrategy):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            instances.append(self)

    import fedlora.server

    monkeypatch.setattr(fedlora.server, "LoRAStrategy", Recording)
    overrides = {"method.name": "fedit", "num-server-rounds": 6, "train.local-steps": 1, "max-failed-rounds": 2,
                 "keep-checkpoints": 3}
    app = make_client_app({**FAST, "output-dir": str(tmp_path), **overrides})

    def failing(msg: Message, context) -> Message:  # every node fails from round 2 on
        if msg.metadata.message_type == MessageType.TRAIN and int(msg.content["config"]["server-round"]) >= 2:
            raise RuntimeError("datacenter on fire")
        return app(msg, context)

    _, rows, summary = run_local(tmp_path, client_app=failing, **overrides)
    out = capsys.readouterr().out
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # rounds 2 and 3 failed: the run ends after round 3
    assert [r["clients_aggregated"] for r in rows[1:]] == [3, 0, 0]
    assert "stopping early: 2 consecutive rounds (up to round 3)" in out and "max-failed-rounds=2" in out
    assert summary["rounds"] == 3
    after_1 = read_checkpoint(checkpoint_path(tmp_path, 1))
    final, last, meta = load_checkpoint(tmp_path)
    assert last == 3 and meta["failed_rounds"] == 2
    _assert_state(final, after_1[0])
    _assert_state(instances[0].state, after_1[0])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()  # the last good state is exported


def test_min_fit_clients_above_the_sampled_count_stops_at_once(tmp_path, capsys):
    with pytest.raises(RunFailed, match="no round aggregated"):  # a run that learnt nothing exits non-zero
        run_local(tmp_path, **{"method.name": "fedit", "min-fit-clients": 4})
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]
    assert "needs 4 valid updates (min-fit-clients=4" in out and "only 3 clients can be sampled" in out


class _Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(self.n))


def test_timeout_is_the_wait_for_nodes_not_the_round_wait(tmp_path):
    cfg = _cfg(tmp_path, **{"min-nodes": 3, "timeout": 0, "round-timeout": 30})
    strategy = LoRAStrategy(cfg, make_aggregator(cfg), {})
    with pytest.raises(TimeoutError, match="only 2 nodes connected .* min-nodes=3"):
        strategy._sample(_Nodes(2), 1.0, 1)
    assert strategy._sample(_Nodes(3), 1.0, 1) == [0, 1, 2]
