"""The wire codec round-trips named float32 tensors exactly; validation rejects every malformed update and
names the offending tensor."""

from __future__ import annotations

import re

import pytest
import torch
from flwr.app import ArrayRecord

from fedlora import naming
from fedlora.wire import InvalidUpdate, from_record, logical_bytes, to_record, validate_update

LAYER = "bert.encoder.layer.0.attention.self.query"
A, B = naming.key(LAYER, "A"), naming.key(LAYER, "B")
MA = naming.key(LAYER, "MA")


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        B: torch.randn(32, 4, generator=gen),  # not sorted: order must survive
        A: torch.randn(4, 32, generator=gen),
        MA: torch.zeros(0, 5),
        "classifier.weight": torch.randn(3, 32, generator=gen),
        "classifier.bias": torch.randn(3, generator=gen),
    }


def test_record_round_trip_keeps_names_order_shapes_and_values() -> None:
    src = _tensors()
    record = to_record(src)
    assert isinstance(record, ArrayRecord)
    back = from_record(record)
    assert list(back) == list(src)
    for name, t in src.items():
        assert back[name].dtype == torch.float32, name
        assert back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert back[MA].shape == (0, 5)


def test_record_casts_to_float32_and_decouples_from_the_source() -> None:
    src = {"x": torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16), "y": torch.arange(6, dtype=torch.float64)}
    back = from_record(to_record(src))
    assert back["x"].dtype == torch.float32 and back["y"].dtype == torch.float32
    assert back["x"].tolist() == [[1.5, -2.25]]
    assert back["y"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    record = to_record({"z": torch.ones(3)})
    z = from_record(record)["z"]
    z.add_(1.0)  # a decoded tensor is writable and owns its memory
    assert torch.equal(from_record(record)["z"], torch.ones(3))


def test_logical_bytes_is_float32_numel() -> None:
    tensors = _tensors()
    assert logical_bytes(tensors) == (32 * 4 + 4 * 32 + 0 + 3 * 32 + 3) * 4
    assert logical_bytes({"h": torch.zeros(10, dtype=torch.bfloat16)}) == 40  # counted as it travels
    assert logical_bytes({}) == 0


def _expected() -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in _tensors().items()}


def test_validate_accepts_a_valid_update() -> None:
    validate_update(_tensors(), _expected())
    validate_update(from_record(to_record(_tensors())), _expected())


def test_validate_rejects_missing_tensor() -> None:
    update = _tensors()
    del update[A]
    with pytest.raises(InvalidUpdate, match=re.escape(A)):
        validate_update(update, _expected())


def test_validate_rejects_extra_tensor() -> None:
    update = _tensors()
    base = f"{LAYER}.base.weight"
    update[base] = torch.zeros(32, 32)
    with pytest.raises(InvalidUpdate, match=re.escape(base)):
        validate_update(update, _expected())


def test_validate_rejects_wrong_shape() -> None:
    update = _tensors()
    update[B] = torch.zeros(32, 5)
    with pytest.raises(InvalidUpdate, match=re.escape(B)) as err:
        validate_update(update, _expected())
    assert "(32, 5)" in str(err.value) and "(32, 4)" in str(err.value)
    update = _tensors()
    update[A] = update[A].T.contiguous()  # same numel, transposed
    with pytest.raises(InvalidUpdate, match=re.escape(A)):
        validate_update(update, _expected())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e7, -1e9])
def test_validate_rejects_non_finite_and_huge_values(bad: float) -> None:
    update = _tensors()
    update["classifier.bias"] = torch.tensor([0.0, bad, 1.0])
    with pytest.raises(InvalidUpdate, match=re.escape("classifier.bias")):
        validate_update(update, _expected())


def test_validate_max_abs_is_a_parameter() -> None:
    update = _tensors()
    update[A] = torch.full((4, 32), 50.0)
    assert max(float(t.abs().max()) for n, t in update.items() if n != A and t.numel()) < 10.0
    validate_update(update, _expected())
    with pytest.raises(InvalidUpdate, match=re.escape(A)):
        validate_update(update, _expected(), max_abs=10.0)


# -- the packed format: one float32 array and a manifest per message ------------------------------------------------
def _expected() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _tensors().items()}


def _forged(entries: list, values: torch.Tensor | None = None, manifest_bytes: bytes | None = None) -> ArrayRecord:
    """A packed record with an arbitrary manifest (what a malicious client can send)."""
    import json
    import zlib
    from collections import OrderedDict

    import numpy as np
    from flwr.app import Array

    from fedlora.wire import MANIFEST, PACKED

    try:
        total = sum(int(np.prod(shape)) for _, shape in entries)
    except (TypeError, ValueError):
        total = 4  # a malformed manifest: any payload
    flat = values if values is not None else torch.randn(max(total, 0))
    raw = manifest_bytes if manifest_bytes is not None else zlib.compress(json.dumps(entries).encode())
    return ArrayRecord(OrderedDict([(PACKED, Array(flat.numpy())),
                                    (MANIFEST, Array(np.frombuffer(raw, dtype=np.uint8)))]))


def test_a_message_travels_as_one_packed_array_and_a_small_manifest() -> None:
    from fedlora.wire import MANIFEST, PACKED, record_logical_bytes, record_shapes

    src = _tensors()
    record = to_record(src)
    assert list(record.keys()) == [PACKED, MANIFEST]
    assert record[PACKED].dtype == "float32" and record[PACKED].shape == (sum(t.numel() for t in src.values()),)
    assert len(record[MANIFEST].data) < 400  # names and shapes, compressed
    assert record_logical_bytes(record) == logical_bytes(src)  # the manifest is not payload
    assert dict(record_shapes(record)) == {k: tuple(v.shape) for k, v in src.items()}
    assert len(to_record({})) == 0


def test_packed_uploads_are_validated_on_the_manifest_before_unpacking() -> None:
    from fedlora.wire import decode_update

    good = [[k, list(s)] for k, s in _expected().items()]
    assert list(decode_update(to_record(_tensors()), _expected())) == list(_tensors())
    bad = {
        "base weight": ([*good, ["bert.embeddings.word_embeddings.weight", [4, 32]]], "base-model weights"),
        "missing": (good[1:], "missing tensors"),
        "shape": ([[good[0][0], [32, 5]], *good[1:]], r"has shape \(32, 5\), expected \(32, 4\)"),
        "twice": ([*good, good[0]], "names a tensor twice"),
        "not pairs": ([["x"]], r"\[name, \[dims >= 0\]\] pairs"),
        "negative dim": ([[good[0][0], [-1, 4]], *good[1:]], r"\[name, \[dims >= 0\]\] pairs"),
    }
    for why, (entries, match) in bad.items():
        with pytest.raises(InvalidUpdate, match=match):
            decode_update(_forged(entries), _expected())
            pytest.fail(f"accepted a forged manifest ({why})")
    n = sum(torch.Size(s).numel() for s in _expected().values())
    with pytest.raises(InvalidUpdate, match=r"must be float32 of shape"):  # length differs from the manifest's
        decode_update(_forged(good, values=torch.randn(n + 1)), _expected())
    with pytest.raises(InvalidUpdate, match=r"has dtype 'float64'; the wire codecs send"):
        decode_update(_forged(good, values=torch.randn(n).double()), _expected())
    with pytest.raises(InvalidUpdate, match="cannot be read"):
        decode_update(_forged(good, manifest_bytes=b"not zlib"), _expected())
    import zlib

    with pytest.raises(InvalidUpdate, match="decompresses to more than"):  # a zip bomb stops at the cap
        decode_update(_forged(good, manifest_bytes=zlib.compress(b" " * (9 << 20))), _expected())
    poisoned = torch.cat([t.reshape(-1) for t in _tensors().values()])
    poisoned[3] = float("nan")
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        decode_update(_forged(good, values=poisoned), _expected())
    extra = to_record(_tensors())
    extra["smuggled"] = extra["fedlora.packed"]
    with pytest.raises(InvalidUpdate, match="holds exactly"):
        decode_update(extra, _expected())
