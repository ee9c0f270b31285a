"""Tensor names shared by adapters, the wire and the aggregators.

An adapted layer at module path ``p`` owns tensors ``p.lora_A.weight`` (r, d_in), ``p.lora_B.weight``
(d_out, r) and, for LoRA-SB, ``p.lora_R.weight`` (r, r). FLoRA's accumulated base update travels as
``p.merged_A`` (m, d_in) and ``p.merged_B`` (d_out, m) with the scaling folded in. Every other name is an
"extra" (a trainable task head) that all methods average like FedAvg.
"""

from __future__ import annotations

ROLES: dict[str, str] = {
    "A": "lora_A.weight",
    "B": "lora_B.weight",
    "R": "lora_R.weight",
    "MA": "merged_A",
    "MB": "merged_B",
}
_SUFFIX_TO_ROLE = {suffix: role for role, suffix in ROLES.items()}


def key(layer: str, role: str) -> str:
    """Name of ``role`` ("A", "B", "R", "MA", "MB") of the layer at module path ``layer``."""
    return f"{layer}.{ROLES[role]}"


def split(name: str) -> tuple[str, str] | None:
    """``"x.y.lora_A.weight" -> ("x.y", "A")``; ``None`` for an extra (non-adapter) tensor."""
    for suffix, role in _SUFFIX_TO_ROLE.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], role
    return None


def is_extra(name: str) -> bool:
    return split(name) is None


def layers_of(names) -> list[str]:
    """Sorted, de-duplicated layer paths among ``names``."""
    return sorted({s[0] for n in names if (s := split(n)) is not None})
