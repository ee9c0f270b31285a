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
"""

from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

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


PACKED, MANIFEST = "fedlora.packed", "fedlora.manifest"
MAX_MANIFEST = 8 << 20  # bytes of decompressed manifest accepted (a zip bomb stops here)


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The packed record of ``tensors`` (float32, CPU); an empty mapping gives an empty record."""
    if not tensors:
        return ArrayRecord()
    flat = [v.detach().to("cpu", torch.float32).reshape(-1) for v in tensors.values()]
    manifest = json.dumps([[k, list(v.shape)] for k, v in tensors.items()], separators=(",", ":"))
    packed = torch.cat(flat).numpy() if len(flat) > 1 else flat[0].contiguous().numpy()
    return ArrayRecord(OrderedDict([
        (PACKED, Array(packed)),
        (MANIFEST, Array(np.frombuffer(zlib.compress(manifest.encode(), 9), dtype=np.uint8))),
    ]))


def is_packed(record: ArrayRecord) -> bool:
    return PACKED in record or MANIFEST in record


def read_manifest(record: ArrayRecord) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a packed record, from its manifest alone; InvalidUpdate if malformed."""
    if set(record.keys()) != {PACKED, MANIFEST}:
        raise InvalidUpdate(f"a packed record holds exactly {PACKED!r} and {MANIFEST!r}, got {sorted(record.keys())}")
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


def _unpack(record: ArrayRecord, manifest: list[tuple[str, tuple[int, ...]]]) -> OrderedDict[str, torch.Tensor]:
    arr = record[PACKED]
    total = sum(math.prod(shape) for _, shape in manifest)
    if arr.stype != SType.NUMPY or arr.dtype != "float32" or tuple(arr.shape) != (total,):
        raise InvalidUpdate(f"{PACKED!r} must be float32 of shape ({total},) as its manifest says, got dtype "
                            f"{arr.dtype!r} shape {tuple(arr.shape)}")
    try:
        values = arr.numpy()
    except Exception as e:  # noqa: BLE001
        raise InvalidUpdate(f"{PACKED!r} cannot be decoded ({e!r})") from None
    if values.dtype != np.float32 or values.shape != (total,):
        raise InvalidUpdate(f"{PACKED!r} decodes to dtype {values.dtype} shape {values.shape}, expected float32 "
                            f"({total},)")
    flat = torch.from_numpy(values.copy())
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    pos = 0
    for name, shape in manifest:
        n = math.prod(shape)
        out[name] = flat[pos:pos + n].view(shape)
        pos += n
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


def logical_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensor payload as it travels (float32)."""
    return sum(t.numel() * 4 for t in tensors.values())


def record_logical_bytes(record: ArrayRecord) -> int:
    """Payload bytes of a received record from its arrays' declared shapes and dtypes, without decoding it
    (equals :func:`logical_bytes` of the decoded tensors for a valid float32 upload; a packed record's manifest
    is overhead, not payload)."""
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
