"""Checkpoint and resume through the real ServerApp/ClientApp (in-process grid): an interrupted run resumed
with resume=true ends exactly where an uninterrupted one does, with the same metrics history, also when
the newest checkpoint was torn mid-write; only the last keep-checkpoints files stay."""

from __future__ import annotations

import json
import logging

import pytest

from fedlora.checkpoint import list_checkpoints, load_checkpoint
from tests.conftest import RANKS, run_local

ROUNDS = 4
# 2 of 3 nodes sampled per round: a resumed run must sample by the absolute round number.
COMMON = {"fraction-train": 0.67, "train.local-steps": 2, "seed": 3}
METHOD_OVERRIDES = {"fedit": {}, "flora": {"adapter.ranks": RANKS}, "fedsvd": {}}
# Measured on the machine, not derived from the run: they differ between any two runs.
TIMING = ("seconds", "aggregate_seconds", "client_usage", "peak_memory_mb", "tokens_per_second")


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


def _rows_without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_two_rounds_plus_resume_equal_four_rounds(method, straight, tmp_path):
    s_out, s_rows, (s_state, s_round, s_meta) = straight(method)
    grid_a, rows_a, _ = run_local(tmp_path, **_overrides(method, 2))
    assert load_checkpoint(tmp_path)[1] == 2
    grid_b, rows_b, _ = run_local(tmp_path, **_overrides(method, ROUNDS, resume=True))

    assert {int(m.content["config"]["server-round"]) for m in grid_b.sent} == {3, 4}  # only the new rounds
    state, last, meta = load_checkpoint(tmp_path)
    assert last == s_round == ROUNDS
    assert _same_state(state, s_state) <= 1e-6
    # The whole history (metrics.jsonl and the checkpoint's copy) matches the uninterrupted run's.
    assert [r["round"] for r in rows_b] == list(range(ROUNDS + 1))
    assert _rows_without_timing(rows_b) == _rows_without_timing(s_rows)
    assert _rows_without_timing(meta["history"]) == _rows_without_timing(s_meta["history"])
    assert meta["node_rank"] == s_meta["node_rank"] and meta["rng"] == s_meta["rng"]
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from_round"] == 2


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
