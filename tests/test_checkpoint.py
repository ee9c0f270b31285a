"""Server checkpoints: an exact round trip, and a write that is atomic (a failed save keeps the old file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedlora.checkpoint as checkpoint
from fedlora.checkpoint import FILENAME, load_checkpoint, save_checkpoint


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "z.layer.lora_B.weight": torch.randn(8, 2, generator=gen),  # not sorted: order must survive
        "a.layer.lora_A.weight": torch.randn(2, 8, generator=gen),
        "m.layer.merged_A": torch.zeros(0, 5),
        "classifier.bias": torch.randn(3, generator=gen).to(torch.float64),
    }


def test_round_trip_keeps_order_round_metadata_and_values(tmp_path: Path) -> None:
    state = _state(0)
    meta = {"history": [{"round": 1, "accuracy": 0.5}], "method": "flora"}
    path = save_checkpoint(tmp_path / "ckpt", state, server_round=7, meta=meta)
    assert path == tmp_path / "ckpt" / FILENAME and path.exists()
    loaded, server_round, info = load_checkpoint(tmp_path / "ckpt")
    assert list(loaded) == list(state)
    assert server_round == 7
    assert info["history"] == meta["history"] and info["method"] == "flora"
    for name, t in state.items():
        assert loaded[name].dtype == torch.float32, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t.to(torch.float32)), name


def test_a_later_save_replaces_the_earlier(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(0), server_round=1)
    save_checkpoint(tmp_path, _state(1), server_round=2)
    loaded, server_round, _ = load_checkpoint(tmp_path)
    assert server_round == 2
    assert torch.equal(loaded["a.layer.lora_A.weight"], _state(1)["a.layer.lora_A.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_missing_checkpoint_says_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=FILENAME):
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

    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]  # no temp file left
    loaded, server_round, info = load_checkpoint(tmp_path)
    assert server_round == 3 and info["tag"] == "first"
    for name, t in first.items():
        assert torch.equal(loaded[name], t.to(torch.float32)), name
