"""Server checkpoints: exact round trip, atomic writes (a failed save keeps the old files), the last K kept,
and a torn or corrupted newest file detected and skipped for the previous one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import fedlora.checkpoint as checkpoint
from fedlora.checkpoint import (
    CheckpointError,
    checkpoint_path,
    has_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "z.layer.lora_B.weight": torch.randn(8, 2, generator=gen),  # not sorted: order must survive
        "a.layer.lora_A.weight": torch.randn(2, 8, generator=gen),
        "m.layer.merged_A": torch.zeros(0, 5),
        "classifier.bias": torch.randn(3, generator=gen).to(torch.float64),
    }


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_keeps_order_round_metadata_and_values(tmp_path: Path) -> None:
    state = _state(0)
    meta = {"history": [{"round": 1, "accuracy": 0.5}], "method": "flora", "node_rank": {"1001": 4}}
    path = save_checkpoint(tmp_path / "ckpt", state, server_round=7, meta=meta)
    assert path == tmp_path / "ckpt" / "server_state-000007.safetensors" and path.exists()
    loaded, server_round, info = load_checkpoint(tmp_path / "ckpt")
    assert list(loaded) == list(state)
    assert server_round == 7
    assert info["history"] == meta["history"] and info["method"] == "flora" and info["node_rank"] == {"1001": 4}
    for name, t in state.items():
        assert loaded[name].dtype == torch.float32, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t.to(torch.float32)), name


def test_the_newest_round_is_loaded_and_only_the_last_k_are_kept(tmp_path: Path) -> None:
    for r in range(1, 6):
        save_checkpoint(tmp_path, _state(r), server_round=r, keep=2)
    assert _names(tmp_path) == ["server_state-000004.safetensors", "server_state-000005.safetensors"]
    loaded, server_round, _ = load_checkpoint(tmp_path)
    assert server_round == 5
    assert torch.equal(loaded["a.layer.lora_A.weight"], _state(5)["a.layer.lora_A.weight"])
    save_checkpoint(tmp_path, _state(6), server_round=6, keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [4, 5, 6]
    save_checkpoint(tmp_path, _state(7), server_round=7, keep=1)
    assert _names(tmp_path) == ["server_state-000007.safetensors"]


def test_missing_checkpoint_says_where(tmp_path: Path) -> None:
    assert not has_checkpoint(tmp_path) and not has_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="server_state-<round>.safetensors"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep_bytes", [0, 7, 100, -20])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, caplog, keep_bytes: int) -> None:
    caplog.set_level(logging.WARNING, logger="fedlora")
    save_checkpoint(tmp_path, _state(1), server_round=1, meta={"tag": "one"})
    newest = save_checkpoint(tmp_path, _state(2), server_round=2, meta={"tag": "two"})
    size = newest.stat().st_size
    with open(newest, "r+b") as f:  # torn mid-write: header only, part of the header, or the tail missing
        f.truncate(keep_bytes if keep_bytes >= 0 else size + keep_bytes)
    with pytest.raises(CheckpointError, match=newest.name):
        read_checkpoint(newest)
    loaded, server_round, info = load_checkpoint(tmp_path)
    assert server_round == 1 and info["tag"] == "one"
    assert all(torch.equal(loaded[k], v.to(torch.float32)) for k, v in _state(1).items())
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(newest.name in m and "damaged" in m for m in messages)
    assert any("server_state-000001.safetensors" in m and "previous" in m for m in messages)


def test_flipped_bytes_in_the_tensor_data_are_detected(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1), server_round=1)
    newest = save_checkpoint(tmp_path, _state(2), server_round=2)
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF  # the last tensor's bytes: same length, valid header, wrong values
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        read_checkpoint(newest)
    assert load_checkpoint(tmp_path)[1] == 1


def test_every_checkpoint_damaged_is_an_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _state(1), server_round=1)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="every checkpoint"):
        load_checkpoint(tmp_path)


def test_a_renamed_file_is_not_trusted_for_its_round(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _state(1), server_round=1)
    path.rename(checkpoint_path(tmp_path, 9))
    with pytest.raises(CheckpointError, match="says round 1"):
        load_checkpoint(tmp_path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _state(0)
    save_checkpoint(tmp_path, first, server_round=3, meta={"tag": "first"})
    real_save_file = checkpoint.save_file

    def crash_mid_write(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # leave a torn file behind, as a crash would
            f.truncate(17)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state(1), server_round=4, meta={"tag": "second"})

    assert _names(tmp_path) == ["server_state-000003.safetensors"]  # no temp file, no round-4 file
    loaded, server_round, info = load_checkpoint(tmp_path)
    assert server_round == 3 and info["tag"] == "first"
    for name, t in first.items():
        assert torch.equal(loaded[name], t.to(torch.float32)), name


def test_a_temp_file_left_by_a_killed_writer_is_cleaned_up(tmp_path: Path) -> None:
    (tmp_path / ".ckpt-abc.tmp").write_bytes(b"partial")
    save_checkpoint(tmp_path, _state(0), server_round=1)
    assert _names(tmp_path) == ["server_state-000001.safetensors"]
