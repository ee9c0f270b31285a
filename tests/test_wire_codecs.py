"""Wire compression (wire.upload / wire.download): each codec rounds within its own bound, travels at its size,
is validated before it is unpacked, and a federation reports the error it added."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedlora import naming
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.wire import (
    MANIFEST,
    PACKED,
    SCALES,
    InvalidUpdate,
    decode_update,
    from_record,
    logical_bytes,
    message_wire_bytes,
    num_scales,
    record_logical_bytes,
    roundtrip_error,
    to_record,
)
from tests.conftest import run_local

LAYER = "bert.encoder.layer.0.attention.self.query"
A, B = naming.key(LAYER, "A"), naming.key(LAYER, "B")
CODECS = ("float32", "bfloat16", "float16", "int8")


def _tensors(d: int = 384, r: int = 8) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return OrderedDict([
        (A, torch.randn(r, d, generator=gen) * torch.logspace(-3, 0, d)),  # magnitudes spread over a row
        (B, torch.randn(d, r, generator=gen) * 1e-2),
        ("classifier.weight", torch.randn(6, d, generator=gen)),
        ("classifier.bias", torch.randn(6, generator=gen)),
        ("empty", torch.zeros(0, 5)),
    ])


def _expected(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_keeps_names_order_shapes_and_rounds_within_its_bound(codec: str) -> None:
    src = _tensors()
    back = from_record(to_record(src, codec))
    assert list(back) == list(src)
    for name, t in src.items():
        got = back[name]
        assert got.dtype == torch.float32 and got.shape == t.shape, name
        err = (got - t).abs()
        if codec == "float32":
            assert torch.equal(got, t), name
        elif codec == "bfloat16":  # 8 significant bits, round to nearest: |error| <= 2^-8 |x|
            assert bool((err <= 2.0 ** -8 * t.abs()).all()), name
            assert not t.numel() or bool((err > 2.0 ** -12 * t.abs()).any()), name  # not float16's precision
        elif codec == "float16":  # 11 significant bits (normal range): |error| <= 2^-11 |x| (+ subnormal floor)
            assert bool((err <= 2.0 ** -11 * t.abs() + 2.0 ** -25).all()), name
        elif t.numel():  # int8: half a step of 1/127 of the row's (or the column's, for B) largest |value|
            axis = 0 if (t.dim() == 2 and t.shape[1] < t.shape[0]) else -1
            peak = t.abs().amax(dim=axis, keepdim=True) if t.dim() == 2 else t.abs().max()
            assert bool((err <= peak / 127 / 2 * (1 + 1e-5)).all()), name
            assert not torch.equal(got, t), name  # it did round


def test_int8_scales_follow_the_smaller_side() -> None:
    assert num_scales((8, 384)) == 8  # A: one per row
    assert num_scales((384, 8)) == 8  # B: one per column, not 384
    assert num_scales((6,)) == 1 and num_scales(()) == 1 and num_scales((0, 5)) == 0
    record = to_record(_tensors(), "int8")
    assert tuple(record[SCALES].shape) == (8 + 8 + 6 + 1,)
    # a column of B with one huge value does not wipe out the other columns' precision
    b = torch.full((384, 8), 1e-3)
    b[0, 0] = 10.0
    back = from_record(to_record({B: b}, "int8"))[B]
    assert torch.allclose(back[:, 1:], b[:, 1:], rtol=1e-2)


@pytest.mark.parametrize("codec", CODECS)
def test_bytes_as_they_travel(codec: str) -> None:
    src = _tensors()
    record = to_record(src, codec)
    numel = sum(t.numel() for t in src.values())
    per_value = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}[codec]
    scales = 4 * 23 if codec == "int8" else 0
    assert logical_bytes(src, codec) == numel * per_value + scales
    assert record_logical_bytes(record) == logical_bytes(src, codec)


def test_compressed_messages_are_smaller_on_the_wire_by_their_ratio() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() needs a run identity
    src = _tensors(d=1024, r=16)  # ~50k values: the envelope is noise
    wire = {c: message_wire_bytes(Message(RecordDict({"arrays": to_record(src, c),
                                                      "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=0,
                                          message_type="train")) for c in CODECS}
    for codec in CODECS:  # the message shrinks with its payload: the rest is the same small envelope
        assert 0 < wire[codec] - logical_bytes(src, codec) < 2048, codec
    assert wire["bfloat16"] / wire["float32"] < 0.51 and wire["int8"] / wire["float32"] < 0.27


def test_roundtrip_error_is_the_relative_l2_rounding() -> None:
    src = _tensors()
    assert roundtrip_error(src, to_record(src)) == 0.0
    errors = {c: roundtrip_error(src, to_record(src, c)) for c in ("bfloat16", "float16", "int8")}
    assert 0 < errors["float16"] < errors["bfloat16"] < 2.0 ** -8
    assert errors["bfloat16"] < errors["int8"] < 0.05
    back = from_record(to_record(src, "int8"))
    num = sum(float((back[k] - v).pow(2).sum()) for k, v in src.items())
    den = sum(float(v.pow(2).sum()) for v in src.values())
    assert errors["int8"] == pytest.approx((num / den) ** 0.5, rel=1e-6)
    assert roundtrip_error({"z": torch.zeros(3)}, to_record({"z": torch.zeros(3)}, "int8")) == 0.0


def test_float16_refuses_values_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="float16 cannot carry .* use bfloat16"):
        to_record({"x": torch.tensor([7e4])}, "float16")


@pytest.mark.parametrize("codec", CODECS)
def test_the_server_decodes_and_validates_every_codec(codec: str) -> None:
    src = _tensors()
    got = decode_update(to_record(src, codec), _expected(src))
    assert list(got) == list(src)
    with pytest.raises(InvalidUpdate, match="shape"):
        decode_update(to_record(src, codec), {**_expected(src), A: (4, 384)})


def _replace(record: ArrayRecord, **arrays) -> ArrayRecord:
    out = OrderedDict((k, record[k]) for k in record.keys())
    for k, v in arrays.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = Array(v)
    return ArrayRecord(out)


def test_malformed_compressed_updates_are_rejected_before_unpacking() -> None:
    src = _tensors()
    expected = _expected(src)
    int8 = to_record(src, "int8")
    names = {"scales": SCALES, "packed": PACKED, "manifest": MANIFEST}
    scales = int8[SCALES].numpy()
    cases = {
        "int8 without scales": (_replace(int8, **{names["scales"]: None}), "comes with an int8"),
        "scales beside float32": (_replace(to_record(src), **{names["scales"]: scales}), "comes with an int8"),
        "negative scale": (_replace(int8, **{names["scales"]: -scales}), "finite and >= 0"),
        "NaN scale": (_replace(int8, **{names["scales"]: np.full_like(scales, np.nan)}), "finite and >= 0"),
        "short scales": (_replace(int8, **{names["scales"]: scales[:-1]}), "float32 of shape"),
        "float64 values": (_replace(to_record(src), **{names["packed"]: to_record(src)[PACKED].numpy().astype(
            np.float64)}), "dtype 'float64'"),
        "short bf16": (_replace(to_record(src, "bfloat16"), **{names["packed"]: to_record(src, "bfloat16")[
            PACKED].numpy()[:-1]}), "uint16 of shape"),
    }
    for what, (record, reason) in cases.items():
        with pytest.raises(InvalidUpdate, match=reason):
            decode_update(record, expected)
            pytest.fail(what)
    bf16 = to_record(src, "bfloat16")
    bits = bf16[PACKED].numpy().copy()
    bits[0] = 0x7FC0  # a bfloat16 NaN
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        decode_update(_replace(bf16, **{names["packed"]: bits}), expected)


def test_bad_codec_names_fail_at_start_naming_the_key() -> None:
    for key in ("wire.upload", "wire.download"):
        with pytest.raises(ConfigError, match=rf"{key}.*float32"):
            FedLoraConfig.from_run_config({key: "fp8"})


def test_a_compressed_federation_reports_the_rounding_and_the_bytes(tmp_path) -> None:
    _, plain, _ = run_local(tmp_path / "plain", num_nodes=2)
    _, packed, _ = run_local(tmp_path / "int8", num_nodes=2, **{"wire.upload": "int8", "wire.download": "bfloat16"})
    for p, c in zip(plain[1:], packed[1:], strict=True):
        assert p["wire_error_down"] is None and p["wire_error_up"] is None
        assert 1e-4 < c["wire_error_down"] < 2.0 ** -8  # bf16's rounding of the global A, B and head
        assert 1e-4 < c["wire_error_up"] < 0.05  # int8's, as the clients measured it
        assert c["bytes_down"] * 2 == p["bytes_down"]
        assert c["bytes_up"] < 0.3 * p["bytes_up"] and c["wire_bytes_up"] < 0.5 * p["wire_bytes_up"]
        assert c["clients_aggregated"] == 2
