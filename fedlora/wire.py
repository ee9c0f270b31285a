"""The one codec between named tensors and Flower records, the one place bytes are counted, and the one
validation of what clients send.

Tensors travel as float32 ``ArrayRecord`` items keyed by their :mod:`fedlora.naming` names (bf16 cannot go
into an ArrayRecord; float32 keeps aggregation exact). "Logical bytes" are sum(numel * itemsize) of the
payload; Flower's wire format adds a few hundred bytes per tensor and deduplicates identical chunks (an
all-zero B is almost free), so :func:`message_wire_bytes` measures the serialised message separately.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.common.constant import SType

from fedlora import naming

BUDGET_EXHAUSTED = 4201  # Error.code of a train reply from a client that declines: its DP budget is spent
NON_FINITE_LOSS = 4202  # Error.code of a train reply whose local loss became non-finite (no weights uploaded)
# Error.code of a train or evaluate reply from a node that lacks the merged factors the server's delta extends
# (its context state was lost, e.g. a SuperNode restart): it did not train; the server resends the cumulative factors.
MERGED_STATE_LOST = 4203


class InvalidUpdate(ValueError):
    """A client update that must not enter aggregation; the message is the logged reason."""


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().to(torch.float32).cpu().contiguous()) for k, v in tensors.items()))


def from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, arr in record.items():
        out[name] = torch.from_numpy(arr.numpy().copy())
    return out


def logical_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensor payload as it travels (float32)."""
    return sum(t.numel() * 4 for t in tensors.values())


def record_logical_bytes(record: ArrayRecord) -> int:
    """Payload bytes of a received record from its arrays' declared shapes and dtypes, without decoding it
    (equals :func:`logical_bytes` of the decoded tensors for a valid float32 upload)."""
    total = 0
    for arr in record.values():
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
    record's metadata before any array is decoded; the decoded arrays are checked again (a crafted Array can
    declare one dtype/shape and carry another), then their values (:func:`validate_update`)."""
    if not isinstance(record, ArrayRecord):
        raise InvalidUpdate(f"'arrays' is a {type(record).__name__}, expected an ArrayRecord")
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
