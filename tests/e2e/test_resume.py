"""Checkpoint and resume through the real ServerApp/ClientApp (in-process grid): an interrupted run resumed
with resume=true ends exactly where an uninterrupted one does, with the same metrics history, also when
the newest checkpoint was torn mid-write; only the last keep-checkpoints files stay. FLoRA's and FedEx-LoRA's
resumed runs send each node the cumulative merged factors once (its nodes start with an empty context state), then
deltas again."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import MessageType

from client.app import MERGED_KEY
from fedlora import naming
from fedlora.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, read_checkpoint
from fedlora.wire import from_record, logical_bytes, record_shapes
from tests.conftest import RANKS, run_local

ROUNDS = 4
# 2 of 3 nodes sampled per round: a resumed run must sample by the absolute round number.
COMMON = {"fraction-train": 0.67, "train.local-steps": 2, "seed": 3}
METHOD_OVERRIDES = {"fedit": {}, "flora": {"adapter.ranks": RANKS}, "fedsvd": {}, "fedex_lora": {}}
STACKED = ("flora", "fedex_lora")  # merged factors with the delta downlink
# Measured on the machine, not derived from the run: they differ between any two runs.
TIMING = ("seconds", "aggregate_seconds", "client_usage", "peak_memory_mb", "tokens_per_second")
# Stacked methods' downlink after a resume: the cumulative merged factors once per node (the straight run: deltas).
DOWNLINK = ("bytes_down", "wire_bytes_down")


def _overrides(method: str, rounds: int, **extra) -> dict:
    return {"method.name": method, **METHOD_OVERRIDES[method], **COMMON, "num-server-rounds": rounds, **extra}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 4-round run per method: (output dir, metrics rows, final state)."""
    cache: dict[str, tuple] = {}

    def get(method: str):
        if method not in cache:
            out = tmp_path_factory.mktemp(f"straight-{method}")
            _, rows, _ = run_local(out, **_overrides(method, ROUNDS))
            cache[method] = (out, rows, load_checkpoint(out))
        return cache[method]

    return get


def _same_state(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    return max((float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()), default=0.0)


def _rows_without_timing(rows: list[dict], drop: tuple[str, ...] = ()) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING + drop} for r in rows]


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_two_rounds_plus_resume_equal_four_rounds(method, straight, tmp_path):
    s_out, s_rows, (s_state, s_round, s_meta) = straight(method)
    grid_a, rows_a, _ = run_local(tmp_path, **_overrides(method, 2))
    state_2, last_a, _ = load_checkpoint(tmp_path)
    assert last_a == 2
    grid_b, rows_b, _ = run_local(tmp_path, **_overrides(method, ROUNDS, resume=True))

    assert {int(m.content["config"]["server-round"]) for m in grid_b.sent} == {3, 4}  # only the new rounds
    state, last, meta = load_checkpoint(tmp_path)
    assert last == s_round == ROUNDS
    assert _same_state(state, s_state) <= 1e-6
    # The whole history (metrics.jsonl and the checkpoint's copy) matches the uninterrupted run's.
    assert [r["round"] for r in rows_b] == list(range(ROUNDS + 1))
    drop = DOWNLINK if method in STACKED else ()
    assert _rows_without_timing(rows_b, drop) == _rows_without_timing(s_rows, drop)
    assert _rows_without_timing(meta["history"], drop) == _rows_without_timing(s_meta["history"], drop)
    if method in STACKED:
        _cumulative_once_then_deltas(grid_b, rows_b, s_rows, state_2, tmp_path)
    assert meta["node_rank"] == s_meta["node_rank"] and meta["rng"] == s_meta["rng"]
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from_round"] == 2


def _cumulative_once_then_deltas(grid, rows, straight_rows, state_2, folder) -> None:
    """Round 3 (the first after the resume) sends every node the cumulative factors of round 2; in round 4 a node
    that trained in round 3 gets only round 3's stack, one that did not the cumulative factors; every node that
    trained in round 4 holds the checkpointed state after round 3 bit for bit."""
    def train(rnd: int):
        return [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
                and int(m.content["config"]["server-round"]) == rnd]

    def merged(shapes) -> set[tuple[int, ...]]:
        return {a for k, a in shapes.items() if (s := naming.split(k)) and s[1] in ("MA", "MB")}

    def width(state) -> int:
        (w,) = {t.shape[0] for k, t in state.items() if (s := naming.split(k)) and s[1] == "MA"}
        return w

    state_3 = read_checkpoint(checkpoint_path(folder, 3))[0]  # kept: keep-checkpoints=2
    w2, w3 = width(state_2), width(state_3)
    assert 0 < w2 < w3
    for msg in train(3):
        assert not any(msg.content["config"]["merged-from"])
        assert merged(record_shapes(msg.content["arrays"])) == {(w2, 64), (64, w2)}
    trained_3 = {m.metadata.dst_node_id for m in train(3)}
    for msg in train(4):
        start = w2 if msg.metadata.dst_node_id in trained_3 else 0
        assert set(msg.content["config"]["merged-from"]) == {start}
        assert merged(record_shapes(msg.content["arrays"])) == {(w3 - start, 64), (64, w3 - start)}
        held = from_record(grid.contexts[msg.metadata.dst_node_id].state[MERGED_KEY])
        keys = [k for k in state_3 if (s := naming.split(k)) and s[1] in ("MA", "MB")]
        assert set(held) == set(keys) and all(torch.equal(held[k], state_3[k]) for k in keys)
    assert {m.metadata.dst_node_id for m in train(4)} & trained_3, "no node gets a delta after the resume"
    for rnd in (3, 4):
        assert rows[rnd]["bytes_down"] == sum(logical_bytes(from_record(m.content["arrays"])) for m in train(rnd))
    # The straight run had already delivered round 2's factors to a node of round 3: it sent fewer bytes.
    assert rows[3]["bytes_down"] > straight_rows[3]["bytes_down"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_round(straight, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedlora")
    method = "fedit"
    _, s_rows, (s_state, _, _) = straight(method)
    run_local(tmp_path, **_overrides(method, 3))
    (r2, p2), (r3, p3) = list_checkpoints(tmp_path)
    assert (r2, r3) == (2, 3)
    p3.write_bytes(p3.read_bytes()[: p3.stat().st_size // 2])  # the machine died while writing round 3

    grid, rows, _ = run_local(tmp_path, **_overrides(method, ROUNDS, resume=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(p3.name in w and "damaged" in w for w in warnings)
    assert any(p2.name in w and "previous" in w for w in warnings)
    assert {int(m.content["config"]["server-round"]) for m in grid.sent} == {3, 4}  # round 3 is trained again
    state, last, _ = load_checkpoint(tmp_path)
    assert last == ROUNDS and _same_state(state, s_state) <= 1e-6
    assert _rows_without_timing(rows) == _rows_without_timing(s_rows)  # round 3's row is not duplicated


def test_keep_checkpoints_leaves_exactly_the_last_k(straight, tmp_path):
    s_out, _, _ = straight("fedit")
    assert [r for r, _ in list_checkpoints(s_out)] == [3, 4]  # default keep-checkpoints=2
    assert sorted(p.name for p in s_out.iterdir() if p.suffix == ".safetensors") == [
        "server_state-000003.safetensors", "server_state-000004.safetensors"]
    run_local(tmp_path, **_overrides("fedsvd", 3, **{"keep-checkpoints": 1}))
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3]


def test_resume_with_another_method_is_refused(straight, tmp_path):
    s_out, _, _ = straight("fedit")
    before = [(r, p.read_bytes()) for r, p in list_checkpoints(s_out)]
    with pytest.raises(ValueError, match="from method 'fedit', not 'fedsvd'"):
        run_local(s_out, **_overrides("fedsvd", ROUNDS + 1, resume=True))
    assert [(r, p.read_bytes()) for r, p in list_checkpoints(s_out)] == before  # nothing overwritten
