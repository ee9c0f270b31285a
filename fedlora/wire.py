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
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Message

BUDGET_EXHAUSTED = 4201  # Error.code of a train reply from a client that declines: its DP budget is spent


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


def message_wire_bytes(msg: Message) -> int:
    """Serialised size of a Flower message: the sum of its deflated objects (what the runtime pushes)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def validate_update(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], max_abs: float = 1e6
) -> None:
    """Reject an update that is missing tensors, carries unexpected ones (e.g. base weights), has the wrong
    shapes, or holds NaN/Inf or absurdly large values. Raises :class:`InvalidUpdate` with the reason."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise InvalidUpdate(f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise InvalidUpdate(f"unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''} (only adapter tensors "
                            "and the head may be uploaded)")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise InvalidUpdate(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not torch.isfinite(t).all():
            raise InvalidUpdate(f"tensor {name!r} contains NaN or Inf")
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > max_abs or math.isnan(peak):
            raise InvalidUpdate(f"tensor {name!r} has |value| {peak:.3g} > {max_abs:g}")
