"""The one codec between named tensors and Flower records, the one place bytes are counted, and the one
validation of what clients send.

Packed format (docs/flower-notes.md note 12): all tensors of one message travel as ONE float32 array
(``fedlora.packed``, the tensors flattened in order) plus a manifest (``fedlora.manifest``: zlib-compressed JSON
``[[name, [shape ...]], ...]`` as uint8), both in the message's ``ArrayRecord``. Flower frames every Array with a
few hundred bytes, so one Array per tensor cost 4-30 % over the payload (1.045 MiniLM, 1.30 tiny); packed, the
overhead is the manifest and the message's own envelope. float32 keeps aggregation exact (bf16 cannot go into an
ArrayRecord). "Logical bytes" are sum(numel * 4) of the tensors; :func:`message_wire_bytes` measures the
serialised message. Names, shapes, dtype and length are validated on the manifest and the packed array's metadata
before anything is unpacked (:func:`decode_update`). Records of one Array per tensor (the format before packing)
are still read and validated the same way.

Compression (``wire.upload`` / ``wire.download``, docs/flower-notes.md note 13): the packed array may instead be
float16, bfloat16 (its bits as uint16: an ArrayRecord has no bf16) or int8 with one float32 scale per row or per
column of each tensor, whichever is fewer (``fedlora.scales``: A (r, d_in) and B (d_out, r) both get r scales). The
packed array's dtype says which; the decoder always returns float32, so aggregation is unchanged and only the values
carry the codec's rounding, which the sender measures (:func:`roundtrip_error`) and metrics.jsonl reports.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SType

from fedlora import naming

BUDGET_EXHAUSTED = 4201  # Error.code of a train reply from a client that declines: its DP budget is spent
NON_FINITE_LOSS = 4202  # Error.code of a train reply whose local loss became non-finite (no weights uploaded)
# Error.code of a train or evaluate reply from a node that lacks the merged factors the server's delta extends
# (its context state was lost, e.g. a SuperNode restart): it did not train; the server resends the cumulative factors.
MERGED_STATE_LOST = 4203


class InvalidUpdate(ValueError):
    """A client update that must not enter aggregation; the message is the logged reason."""


PACKED, MANIFEST, SCALES = "fedlora.packed", "fedlora.manifest", "fedlora.scales"
MAX_MANIFEST = 8 << 20  # bytes of decompressed manifest accepted (a zip bomb stops here)
# codec -> dtype of the packed array (what the receiver reads the codec from) and bytes per value
CODECS: dict[str, str] = {"float32": "float32", "bfloat16": "uint16", "float16": "float16", "int8": "int8"}
_CODEC_OF = {dtype: codec for codec, dtype in CODECS.items()}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
FLOAT16_MAX = 65504.0


@dataclass
class WireConfig:
    """How adapter tensors travel (run-config section ``wire``): float32 is exact; the others trade rounding for
    bytes (2x and ~4x smaller), as NVIDIA FLARE's fp16 / 8-bit filters do. The server decodes every codec."""

    upload: str = field(default="float32", metadata={"help": "client -> server: float32 | bfloat16 | float16 | "
                                                             "int8 (one scale per row or column)"})
    download: str = field(default="float32", metadata={"help": "server -> client: float32 | bfloat16 | float16 | "
                                                               "int8"})


def _scale_axis(shape: tuple[int, ...]) -> tuple[int, int, bool]:
    """(rows, cols, per_column) of a tensor's 2-D view for int8: one scale per row, or per column where the
    columns are fewer (a B of shape (d_out, r) gets r scales, not d_out). A vector is one row."""
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1), False
    rows, cols = shape[0], math.prod(shape[1:])
    return rows, cols, cols < rows


def num_scales(shape: tuple[int, ...]) -> int:
    rows, cols, per_column = _scale_axis(shape)
    return 0 if rows * cols == 0 else (cols if per_column else rows)


def _encode(flat: list[torch.Tensor], shapes: list[tuple[int, ...]], codec: str) -> list[tuple[str, np.ndarray]]:
    """The packed array (and int8's scales) of float32 tensors flattened in order."""
    whole = torch.cat(flat) if len(flat) > 1 else flat[0].contiguous()
    if codec == "float32":
        return [(PACKED, whole.numpy())]
    if codec == "float16":
        peak = float(whole.abs().max()) if whole.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise ValueError(f"wire codec float16 cannot carry |value| {peak:.4g} > {FLOAT16_MAX:g}; use bfloat16")
        return [(PACKED, whole.to(torch.float16).numpy())]
    if codec == "bfloat16":  # round to nearest even in torch, then ship the 16 bits
        return [(PACKED, whole.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))]
    if codec != "int8":
        raise ValueError(f"unknown wire codec {codec!r}; use one of {list(CODECS)}")
    values, scales = [], []
    for t, shape in zip(flat, shapes, strict=True):
        rows, cols, per_column = _scale_axis(shape)
        if rows * cols == 0:
            continue
        m = t.reshape(rows, cols)
        peak = m.abs().amax(dim=0 if per_column else 1)
        scale = peak / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(m / (safe[None, :] if per_column else safe[:, None])).clamp_(-127, 127)
        values.append(q.to(torch.int8).reshape(-1))
        scales.append(scale)
    q = torch.cat(values) if values else torch.zeros(0, dtype=torch.int8)
    s = torch.cat(scales) if scales else torch.zeros(0)
    return [(PACKED, q.numpy()), (SCALES, s.to(torch.float32).numpy())]


def to_record(tensors: Mapping[str, torch.Tensor], codec: str = "float32") -> ArrayRecord:
    """The packed record of ``tensors`` (CPU) in ``codec`` (float32 = exact); an empty mapping gives an empty
    record."""
    if not tensors:
        return ArrayRecord()
    flat = [v.detach().to("cpu", torch.float32).reshape(-1) for v in tensors.values()]
    shapes = [tuple(v.shape) for v in tensors.values()]
    manifest = json.dumps([[k, list(v.shape)] for k, v in tensors.items()], separators=(",", ":"))
    arrays = [(name, Array(a)) for name, a in _encode(flat, shapes, codec)]
    arrays.insert(1, (MANIFEST, Array(np.frombuffer(zlib.compress(manifest.encode(), 9), dtype=np.uint8))))
    return ArrayRecord(OrderedDict(arrays))


def roundtrip_error(tensors: Mapping[str, torch.Tensor], record: ArrayRecord) -> float:
    """||decoded - tensors|| / ||tensors|| over all tensors together: the rounding a codec added (0 for float32;
    0 when the tensors are all zero)."""
    back = from_record(record)
    num = sum(float(torch.linalg.vector_norm(back[k] - v.detach().to("cpu", torch.float32))) ** 2
              for k, v in tensors.items())
    den = sum(float(torch.linalg.vector_norm(v.detach().to("cpu", torch.float32))) ** 2 for v in tensors.values())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def is_packed(record: ArrayRecord) -> bool:
    return PACKED in record or MANIFEST in record or SCALES in record


def read_manifest(record: ArrayRecord) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a packed record, from its manifest alone; InvalidUpdate if malformed."""
    if set(record.keys()) - {SCALES} != {PACKED, MANIFEST}:
        raise InvalidUpdate(f"a packed record holds exactly {PACKED!r} and {MANIFEST!r} (and {SCALES!r} for int8), "
                            f"got {sorted(record.keys())}")
    arr = record[MANIFEST]
    if arr.stype != SType.NUMPY or arr.dtype != "uint8" or len(arr.shape) != 1:
        raise InvalidUpdate(f"{MANIFEST!r} must be a 1-D uint8 array, got dtype {arr.dtype!r} shape {arr.shape}")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(arr.numpy().tobytes(), MAX_MANIFEST)
        if inflater.unconsumed_tail:
            raise InvalidUpdate(f"{MANIFEST!r} decompresses to more than {MAX_MANIFEST} bytes")
        entries = json.loads(text)
    except InvalidUpdate:
        raise
    except Exception as e:  # noqa: BLE001 (any failure to read untrusted bytes is a bad record)
        raise InvalidUpdate(f"{MANIFEST!r} cannot be read ({e!r})") from None
    out: list[tuple[str, tuple[int, ...]]] = []
    ok = isinstance(entries, list)
    for entry in entries if ok else []:
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1]))
        if not ok:
            break
        out.append((entry[0], tuple(entry[1])))
    if not ok:
        raise InvalidUpdate(f"{MANIFEST!r} must list [name, [dims >= 0]] pairs")
    if len({n for n, _ in out}) != len(out):
        raise InvalidUpdate(f"{MANIFEST!r} names a tensor twice")
    return out


def _numpy(record: ArrayRecord, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """One array of a packed record, checked on its declared and its decoded dtype and shape."""
    arr = record[name]
    if arr.stype != SType.NUMPY or arr.dtype != dtype or tuple(arr.shape) != shape:
        raise InvalidUpdate(f"{name!r} must be {dtype} of shape {shape} as its manifest says, got dtype "
                            f"{arr.dtype!r} shape {tuple(arr.shape)}")
    try:
        values = arr.numpy()
    except Exception as e:  # noqa: BLE001
        raise InvalidUpdate(f"{name!r} cannot be decoded ({e!r})") from None
    if values.dtype != np.dtype(dtype) or values.shape != shape:
        raise InvalidUpdate(f"{name!r} decodes to dtype {values.dtype} shape {values.shape}, expected {dtype} "
                            f"{shape}")
    return values


def _unpack(record: ArrayRecord, manifest: list[tuple[str, tuple[int, ...]]]) -> OrderedDict[str, torch.Tensor]:
    total = sum(math.prod(shape) for _, shape in manifest)
    codec = _CODEC_OF.get(str(record[PACKED].dtype))
    if codec is None:
        raise InvalidUpdate(f"{PACKED!r} has dtype {record[PACKED].dtype!r}; the wire codecs send "
                            f"{sorted(_CODEC_OF)}")
    if (SCALES in record) != (codec == "int8"):
        raise InvalidUpdate(f"{SCALES!r} comes with an int8 {PACKED!r} and only then")
    values = _numpy(record, PACKED, CODECS[codec], (total,))
    if codec == "float32":
        flat = torch.from_numpy(values.copy())
    elif codec == "float16":
        flat = torch.from_numpy(values.astype(np.float32))
    elif codec == "bfloat16":
        flat = torch.from_numpy((values.astype(np.uint32) << 16).view(np.float32))
    else:
        return _unpack_int8(record, manifest, torch.from_numpy(values.astype(np.float32)))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    pos = 0
    for name, shape in manifest:
        n = math.prod(shape)
        out[name] = flat[pos:pos + n].view(shape)
        pos += n
    return out


def _unpack_int8(record: ArrayRecord, manifest: list[tuple[str, tuple[int, ...]]], q: torch.Tensor
                 ) -> OrderedDict[str, torch.Tensor]:
    scales = torch.from_numpy(_numpy(record, SCALES, "float32", (sum(num_scales(s) for _, s in manifest),)).copy())
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise InvalidUpdate(f"{SCALES!r} must be finite and >= 0")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    pos = at = 0
    for name, shape in manifest:
        rows, cols, per_column = _scale_axis(shape)
        n, k = rows * cols, num_scales(shape)
        m = q[pos:pos + n].view(rows, cols)
        s = scales[at:at + k]
        out[name] = (m * (s[None, :] if per_column else s[:, None])).view(shape) if n else torch.zeros(shape)
        pos, at = pos + n, at + k
    return out


def record_shapes(record: ArrayRecord) -> OrderedDict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a record carries, without decoding it (the manifest of a packed record)."""
    if is_packed(record):
        return OrderedDict(read_manifest(record))
    return OrderedDict((k, tuple(a.shape)) for k, a in record.items())


def from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """The tensors of a record (packed, or one Array per tensor)."""
    if is_packed(record):
        return _unpack(record, read_manifest(record))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, arr in record.items():
        out[name] = torch.from_numpy(arr.numpy().copy())
    return out


def logical_bytes(tensors: Mapping[str, torch.Tensor], codec: str = "float32") -> int:
    """Bytes of the tensor payload as it travels in ``codec`` (float32: numel x 4; int8 adds its float32 scales)."""
    total = sum(t.numel() for t in tensors.values()) * _ITEMSIZE[codec]
    if codec == "int8":
        total += 4 * sum(num_scales(tuple(t.shape)) for t in tensors.values())
    return total


def record_logical_bytes(record: ArrayRecord) -> int:
    """Payload bytes of a received record from its arrays' declared shapes and dtypes, without decoding it
    (equals :func:`logical_bytes` of the decoded tensors in the record's codec for a valid upload; a packed record's
    manifest is overhead, not payload, int8's scales are payload)."""
    total = 0
    for name, arr in record.items():
        if name == MANIFEST:
            continue
        try:
            total += math.prod(arr.shape) * np.dtype(arr.dtype).itemsize
        except TypeError:  # a dtype numpy does not know: count the bytes that came
            total += len(arr.data)
    return total


def message_wire_bytes(msg: Message) -> int:
    """Serialised size of a Flower message: the sum of its deflated objects (what the runtime pushes)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds a client update must respect (run config: max-update-norm, max-num-examples)."""

    max_abs: float = 1e6  # any single value; catches overflowed or adversarial uploads
    max_norm: float = 0.0  # L2 norm of all uploaded tensors together; 0 = no bound
    max_num_examples: int = 10_000_000


def _check_keys(names: Iterable[str], expected: Mapping[str, tuple[int, ...]]) -> None:
    names = set(names)
    missing = sorted(set(expected) - names)
    if missing:
        raise InvalidUpdate(f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    extra = sorted(names - set(expected))
    if extra:
        base = [k for k in extra if naming.split(k) is None]
        if base:
            raise InvalidUpdate(f"unexpected tensors {base[:3]}{' ...' if len(base) > 3 else ''}: not adapter "
                                "tensors, they look like base-model weights (only adapter tensors and the head "
                                "may be uploaded)")
        raise InvalidUpdate(f"unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''}: adapter roles "
                            "this method does not upload (only adapter tensors and the head may be uploaded)")


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise InvalidUpdate(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(expected)}")


def _check_values(tensors: Mapping[str, torch.Tensor], limits: UpdateLimits) -> None:
    total = 0.0
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise InvalidUpdate(f"tensor {name!r} contains NaN or Inf")
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > limits.max_abs or math.isnan(peak):
            raise InvalidUpdate(f"tensor {name!r} has |value| {peak:.3g} > {limits.max_abs:g}")
        total += float(t.double().pow(2).sum())
    norm = math.sqrt(total)
    if limits.max_norm > 0 and norm > limits.max_norm:
        raise InvalidUpdate(f"update L2 norm {norm:.4g} (all uploaded tensors) exceeds max-update-norm="
                            f"{limits.max_norm:g}")


def validate_update(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], max_abs: float = 1e6,
    max_norm: float = 0.0,
) -> None:
    """Reject an update that is missing tensors, carries unexpected ones (e.g. base weights), has the wrong
    shapes, holds NaN/Inf or absurdly large values, or whose L2 norm over all uploaded tensors exceeds
    ``max_norm`` (0 = no bound). Raises :class:`InvalidUpdate` with the reason."""
    _check_keys(tensors, expected)
    for name, shape in expected.items():
        _check_shape(name, tuple(tensors[name].shape), shape)
    _check_values(tensors, UpdateLimits(max_abs=max_abs, max_norm=max_norm))


def decode_update(
    record: object, expected: Mapping[str, tuple[int, ...]], limits: UpdateLimits = UpdateLimits()
) -> OrderedDict[str, torch.Tensor]:
    """The validated tensors of an uploaded ``ArrayRecord``.

    Names, declared dtype (float32, as :func:`to_record` sends) and declared shapes are checked on the
    record's metadata (a packed record's manifest and its array's declared dtype and length) before any array is
    decoded; the decoded arrays are checked again (a crafted Array can declare one dtype/shape and carry
    another), then their values (:func:`validate_update`)."""
    if not isinstance(record, ArrayRecord):
        raise InvalidUpdate(f"'arrays' is a {type(record).__name__}, expected an ArrayRecord")
    if is_packed(record):
        manifest = read_manifest(record)
        _check_keys([n for n, _ in manifest], expected)
        for name, shape in manifest:
            _check_shape(name, shape, expected[name])
        tensors = _unpack(record, manifest)
        validate_update(tensors, expected, limits.max_abs, limits.max_norm)
        return tensors
    _check_keys(record.keys(), expected)
    for name, arr in record.items():
        if arr.stype != SType.NUMPY or arr.dtype != "float32":
            raise InvalidUpdate(f"tensor {name!r} has dtype {arr.dtype!r} (stype {arr.stype!r}), expected "
                                "'float32' as fedlora's codec sends")
        _check_shape(name, tuple(arr.shape), expected[name])
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, arr in record.items():
        try:
            values = arr.numpy()
        except Exception as e:  # noqa: BLE001 (any decoding failure of untrusted bytes is a bad update)
            raise InvalidUpdate(f"tensor {name!r} cannot be decoded ({e!r})") from None
        if values.dtype != np.float32:
            raise InvalidUpdate(f"tensor {name!r} decodes to dtype {values.dtype}, expected float32")
        tensors[name] = torch.from_numpy(values.copy())
    validate_update(tensors, expected, limits.max_abs, limits.max_norm)
    return tensors


def check_num_examples(value: object, limits: UpdateLimits = UpdateLimits()) -> int:
    """num-examples must be a positive int (not a float, not a bool) within max-num-examples."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidUpdate(f"num-examples={value!r} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise InvalidUpdate(f"num-examples={value} must be > 0")
    if value > limits.max_num_examples:
        raise InvalidUpdate(f"num-examples={value} exceeds max-num-examples={limits.max_num_examples}")
    return value


def check_rank(value: object, allowed: Collection[int]) -> int:
    """The declared adapter rank: a whole number in ``allowed`` (the configured adapter.rank / adapter.ranks)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InvalidUpdate(f"rank={value!r} must be a whole number")
    rank = int(value)
    if rank not in allowed:
        raise InvalidUpdate(f"rank={rank} is not an allowed adapter rank {sorted(allowed)} (adapter.rank / "
                            "adapter.ranks)")
    return rank
