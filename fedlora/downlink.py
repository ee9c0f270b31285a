"""The delta downlink of stacked merged factors (FLoRA's cumulative update, FedEx-LoRA's folded residual): a node that
already holds the merged factors of an earlier round is sent only the rows of MA and columns of MB appended since, not
the whole cumulative stack (docs/algorithms.md section 3).

Server side, :class:`MergedDownlink` (one per strategy):

- per layer a *generation*, bumped whenever the layer's merged factors stop being an extension of the ones last
  sent (a recompression rewrites them, a rolled-back round shortens them): within one generation they only grow,
  so every copy of that generation agrees with the current factors on its width;
- per node the (generation, width m) of every layer it is known to hold, set from its last successful reply (train
  or evaluate) to what that message carried. A node that failed, was rejected or was not sampled keeps its old
  record (it gets a longer delta later); a node that answers MERGED_STATE_LOST loses its record.

A message to a node that holds width v of the current generation g of a layer carries ``MA[v:]``, ``MB[:, v:]``;
any other node gets the cumulative factors (v = 0). The config record says, per layer, what to append to:
``merged-layers`` (layer paths), ``merged-from`` (v) and ``merged-generation`` (g), aligned lists.

Client side, :func:`apply_merged`: v = 0 replaces the held factors; v > 0 appends to the first v rows/columns of
the held ones, which must be of generation g and at least v wide (a longer copy of the same generation is
truncated: it holds a newer delta whose reply the server never saw). Anything else raises
:class:`MergedStateLost`: the node must not train on a wrong base. Nothing of this is checkpointed: a resumed run
is a new Flower run, its nodes start with an empty context state, and each first gets the cumulative factors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from fedlora import naming

MERGED = ("MA", "MB")
Version = dict[str, tuple[int, int]]  # layer -> (generation, width m of its merged factors)
CONFIG_KEYS = ("merged-layers", "merged-from", "merged-generation")


class MergedStateLost(RuntimeError):
    """The server sent a delta onto merged factors this node does not hold (lost or stale state)."""


def merged_layers(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Sorted layer paths that carry merged factors."""
    return sorted({s[0] for n in tensors if (s := naming.split(n)) is not None and s[1] in MERGED})


def _extends(ma: torch.Tensor, mb: torch.Tensor, old_a: torch.Tensor, old_b: torch.Tensor) -> bool:
    """(ma, mb) = (old_a, old_b) with rows of MA / columns of MB appended, bit for bit."""
    m = old_a.shape[0]
    return (ma.shape[1:] == old_a.shape[1:] and mb.shape[0] == old_b.shape[0] and ma.shape[0] >= m
            and mb.shape[1] == ma.shape[0] and torch.equal(ma[:m], old_a) and torch.equal(mb[:, :m], old_b))


class MergedDownlink:
    """What every node holds of the server's merged factors, and the delta each message carries."""

    def __init__(self) -> None:
        self.generation: dict[str, int] = {}
        self.held: dict[int, Version] = {}
        self._seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the factors of the current version

    def sync(self, state: Mapping[str, torch.Tensor]) -> Version:
        """The version of ``state`` (about to be sent): a layer whose factors do not extend those last seen starts
        a new generation."""
        version: Version = {}
        for layer in merged_layers(state):
            ma, mb = state[naming.key(layer, "MA")], state[naming.key(layer, "MB")]
            seen = self._seen.get(layer)
            if seen is None:
                self.generation.setdefault(layer, 0)
            elif not (seen[0] is ma and seen[1] is mb) and not _extends(ma, mb, *seen):
                self.generation[layer] += 1
            self._seen[layer] = (ma, mb)
            version[layer] = (self.generation[layer], ma.shape[0])
        return version

    def cut(self, node: int, payload: Mapping[str, torch.Tensor], version: Version
            ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, list]]:
        """``payload`` (with the cumulative factors of ``version``) cut to what ``node`` lacks, and the config keys
        that tell it what to append to."""
        held = self.held.get(node, {})
        start = {}
        for layer, (gen, m) in version.items():
            h = held.get(layer)
            start[layer] = h[1] if h is not None and h[0] == gen and h[1] <= m else 0
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, t in payload.items():
            s = naming.split(name)
            if s is None or s[1] not in MERGED:
                out[name] = t
            else:
                v = start[s[0]]
                out[name] = t if v == 0 else (t[v:] if s[1] == "MA" else t[:, v:])
        layers = sorted(version)
        return out, {"merged-layers": layers, "merged-from": [start[la] for la in layers],
                     "merged-generation": [version[la][0] for la in layers]}

    def record(self, node: int, version: Version) -> None:
        """``node`` answered a message that carried ``version``: it holds it now."""
        self.held[node] = dict(version)

    def forget(self, node: int) -> None:
        """``node`` does not hold what the server thought: it gets the cumulative factors next time."""
        self.held.pop(node, None)


def apply_merged(payload: Mapping[str, torch.Tensor], config: Mapping, held: Mapping[str, torch.Tensor],
                 held_generation: Mapping[str, int]
                 ) -> tuple[OrderedDict[str, torch.Tensor], OrderedDict[str, torch.Tensor], dict[str, int]]:
    """Client side: (the payload with cumulative merged factors, the merged factors to hold now, their generation
    per layer) from a received ``payload`` + ``config`` (merged-layers / -from / -generation) and what the node
    held. Raises :class:`MergedStateLost` where the delta extends factors this node does not hold."""
    try:
        layers = [str(x) for x in config["merged-layers"]]
        starts = [int(x) for x in config["merged-from"]]
        gens = [int(x) for x in config["merged-generation"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed merged-factor config ({e!r}); expected the lists {CONFIG_KEYS}") from None
    if not len(layers) == len(starts) == len(gens):
        raise ValueError(f"merged-factor config lists differ in length: {len(layers)}, {len(starts)}, {len(gens)}")
    full: OrderedDict[str, torch.Tensor] = OrderedDict(payload)
    now: OrderedDict[str, torch.Tensor] = OrderedDict()
    now_gen: dict[str, int] = {}
    for layer, v, gen in zip(layers, starts, gens, strict=True):
        ka, kb = naming.key(layer, "MA"), naming.key(layer, "MB")
        if ka not in payload or kb not in payload:
            raise ValueError(f"the server's config lists layer {layer!r} but the payload lacks its merged factors")
        a, b = payload[ka], payload[kb]
        if v:
            ha, hb = held.get(ka), held.get(kb)
            if ha is None or hb is None or held_generation.get(layer) != gen or ha.shape[0] < v:
                holds = ("no merged factors" if ha is None or hb is None else
                         f"width {ha.shape[0]} of generation {held_generation.get(layer)}")
                raise MergedStateLost(
                    f"layer {layer!r}: the server sent merged factors to append at width {v} of generation {gen}, "
                    f"but this node holds {holds} (its state was lost or is stale); it needs the cumulative factors")
            a, b = torch.cat([ha[:v], a]), torch.cat([hb[:, :v], b], dim=1)
        full[ka], full[kb] = a, b
        now[ka], now[kb] = a, b
        now_gen[layer] = gen
    return full, now, now_gen
