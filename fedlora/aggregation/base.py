"""The aggregation protocol and the registry of methods.

An aggregator is a pure function of (global state, client updates, config): no I/O, no Flower. That keeps
every method testable on random tensors in milliseconds and lets the ServerApp stay a thin adapter.

Global state: an ordered dict of float tensors named as in :mod:`fedlora.naming`. It holds what the server
must remember between rounds (e.g. A and B for FedIT, R and the frozen A, B for Fed-SB, FLoRA's merged
factors, FedEx-LoRA's A and B and its folded residual). What a client receives is derived from it by
:meth:`Aggregator.client_payload`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedlora import naming
from fedlora.adapters.layer import TRAINABLE


@dataclass
class ClientUpdate:
    """What one client sent back: the tensors it trained, how many examples, and its adapter rank."""

    client_id: int
    tensors: dict[str, torch.Tensor]
    num_examples: int
    rank: int


@dataclass
class AggregatorConfig:
    """Server-side knobs shared by all methods. A method's own knobs live in its ``Options`` dataclass."""

    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    weighting: str = "num_examples"  # or "uniform": p_k = 1/K (Fed-SB's official code)

    def __post_init__(self) -> None:
        if self.weighting not in ("num_examples", "uniform"):
            raise ValueError(
                f"method.weighting={self.weighting!r} is not valid; use 'num_examples' or 'uniform'"
            )
        if self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank} must be >= 1")

    def scaling(self, rank: int) -> float:
        """LoRA scaling s = alpha / r (the same rule the client's adapter layer uses)."""
        return self.alpha / rank


@dataclass
class NoOptions:
    """A method without knobs of its own."""

    def validate(self) -> None:
        """Raise ValueError naming the run-config key (``method.<field>``) and the fix."""


@dataclass
class ServerContext:
    """What the server offers a method's :meth:`Aggregator.server_init` beyond the fresh adapter tensors.

    base_gradients(n): gradient of the task's loss on n seeded training examples with respect to the base
    weight (d_out, d_in) of every adapted layer, keyed by layer path (data the server may hold: a public or
    proxy sample). lr: the clients' learning rate (train.lr).
    """

    base_gradients: Callable[[int], dict[str, torch.Tensor]]
    lr: float


class Aggregator(ABC):
    """One federated LoRA method.

    Class attributes tell the client and the strategy how the method behaves:
      mode:       adapter parameterisation clients train ("lora": B A; "ffa": B with A frozen; "sb": R only).
      uploads:    roles a client sends up (subset of "A", "B", "R"); extras (the head) always go up.
      frozen:     roles constant for the whole run: sent to a client once, then cached in its context state.
      personal:   roles each client trains and keeps as its own (FedSA-LoRA's B): never uploaded nor sent, held in
                  the node's context state (and a state file); the server keeps their initial value.
      fresh_each_round: clients start every round from a freshly initialised adapter of their own rank.
      heterogeneous_ranks: clients may use different ranks.
      stacked:    the state's merged factors MA (m, d_in) and MB (d_out, m) only grow, by appended rows of MA and
                  columns of MB, until a recompression: a node that holds them is sent only what was appended since
                  (fedlora.downlink, docs/algorithms.md section 3). Clients add MB @ MA to their base; FLoRA (fresh
                  adapters, no global A/B) and FedEx-LoRA (global A/B beside its folded residual) are stacked.
      linear:     the new global state is a weighted mean of the uploads (plus constants), so clipping and
                  noising each upload privatises the aggregate (client-level DP) and a secure sum suffices.
      Per round, :meth:`trainable` says which factors clients train in round t (default: the mode's, every
      round; RoLoRA alternates B and A) and :meth:`round_uploads` which of ``uploads`` they send and the server
      validates (those of ``uploads`` that trained in t).
      Options:    the method's own knobs, a dataclass whose fields become run-config keys ``method.<field>``
                  (field names carry the method's prefix, e.g. ``fair_lambda``, so keys never clash).
    """

    name: ClassVar[str]
    mode: ClassVar[str]
    uploads: ClassVar[tuple[str, ...]]
    frozen: ClassVar[tuple[str, ...]] = ()
    personal: ClassVar[tuple[str, ...]] = ()
    fresh_each_round: ClassVar[bool] = False
    heterogeneous_ranks: ClassVar[bool] = False
    stacked: ClassVar[bool] = False
    linear: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, config: AggregatorConfig | None = None, options: Any = None) -> None:
        self.config = config or AggregatorConfig()
        self.options = options if options is not None else self.Options()
        self.options.validate()

    # -- state ------------------------------------------------------------------------------------------
    def init_state(self, init: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Initial global state from a freshly injected model's adapter tensors (A random, B zero) + extras.

        The default keeps them all (as float32); methods that re-initialise (Fed-SB) or keep no adapter
        on the server (FLoRA) override this.
        """
        return OrderedDict((n, t.detach().to(torch.float32).clone()) for n, t in init.items())

    def server_init(self, state: OrderedDict[str, torch.Tensor], context: ServerContext
                    ) -> OrderedDict[str, torch.Tensor]:
        """Round-0 state once the server's model and data are at hand (default: ``state`` unchanged). A method
        whose initialisation needs more than random factors (LoRA-SB's gradient init) overrides this."""
        return state

    def client_payload(self, state: dict[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
        """Tensors a client of adapter rank ``rank`` must receive next round (default: the whole state)."""
        self.check_rank(rank)
        return OrderedDict(state)

    @abstractmethod
    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        """New global state from the previous one and this round's client updates."""

    # -- shared helpers ---------------------------------------------------------------------------------
    def check_rank(self, rank: int) -> None:
        if not self.heterogeneous_ranks and rank != self.config.rank:
            raise ValueError(
                f"method {self.name!r} needs every client at adapter.rank={self.config.rank}, got rank {rank}; "
                "use method 'flora' for heterogeneous ranks"
            )

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """p_k = n_k / sum n (or 1/K when weighting='uniform')."""
        if not updates:
            raise ValueError("aggregate() needs at least one client update")
        if self.config.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        total = sum(u.num_examples for u in updates)
        if total <= 0:
            raise ValueError("client updates report num_examples=0 in total; cannot weight them")
        return [u.num_examples / total for u in updates]

    def trainable(self, server_round: int) -> tuple[str, ...]:
        """Adapter roles clients train in ``server_round`` (1-based and absolute, as the train message's
        ``server-round``, so a resumed run keeps the schedule); the other factors stay as received. Default: the
        mode's roles, every round."""
        return TRAINABLE[self.mode]

    def round_uploads(self, server_round: int) -> tuple[str, ...]:
        """Roles clients upload in ``server_round``: those of ``uploads`` that trained in that round."""
        trained = self.trainable(server_round)
        return tuple(r for r in self.uploads if r in trained)

    def expected_upload(self, state: dict[str, torch.Tensor], rank: int, server_round: int | None = None
                        ) -> dict[str, tuple[int, ...]]:
        """Names and shapes a client of rank ``rank`` must upload in ``server_round`` (used to validate updates;
        None: every role of ``uploads``, for methods whose upload does not depend on the round)."""
        roles = self.uploads if server_round is None else self.round_uploads(server_round)
        shapes: dict[str, tuple[int, ...]] = {}
        for name, t in state.items():
            s = naming.split(name)
            if s is None:
                shapes[name] = tuple(t.shape)
        for layer, (d_out, d_in) in self.layer_dims(state).items():
            dims = {"A": (rank, d_in), "B": (d_out, rank), "R": (rank, rank)}
            for role in roles:
                shapes[naming.key(layer, role)] = dims[role]
        return shapes

    def global_scaling(self, state: dict[str, torch.Tensor], layer: str) -> float:
        """Scaling that turns the stored B (R) A of ``layer`` into the global update: alpha / r of the global
        adapter. Methods that store the update already scaled (FlexLoRA, HetLoRA) return 1."""
        return self.config.scaling(state[naming.key(layer, "A")].shape[0])

    @staticmethod
    def layer_dims(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted layer, read off A/B or FLoRA's merged factors."""
        dims: dict[str, list[int]] = {}
        for name, t in state.items():
            s = naming.split(name)
            if s is None:
                continue
            layer, role = s
            d = dims.setdefault(layer, [0, 0])
            if role in ("A", "MA"):
                d[1] = t.shape[1]
            elif role in ("B", "MB"):
                d[0] = t.shape[0]
        return {k: (v[0], v[1]) for k, v in sorted(dims.items())}

    @staticmethod
    def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        out = torch.zeros_like(tensors[0], dtype=torch.float32)
        for t, w in zip(tensors, weights, strict=True):
            out += w * t.to(torch.float32)
        return out

    def average_extras(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> OrderedDict[str, torch.Tensor]:
        """Weighted mean of every extra (head) tensor; adapter tensors are left to the method."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in state:
            if naming.is_extra(name):
                out[name] = self.weighted_mean([u.tensors[name] for u in updates], weights)
        return out


_REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make a method available by its ``name`` (and its Options as ``method.*`` keys)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"aggregator {cls.name!r} registered twice")
    owner = {f.name: other.name for other in _REGISTRY.values() for f in dataclasses.fields(other.Options)}
    for f in dataclasses.fields(cls.Options):
        if owner.get(f.name, cls.name) != cls.name and _REGISTRY[owner[f.name]].Options is not cls.Options:
            raise ValueError(f"{cls.name}.Options field {f.name!r} is already method.{f.name} of {owner[f.name]!r}; "
                             "prefix it with the method's name")
    _REGISTRY[cls.name] = cls
    return cls


def aggregator_class(name: str) -> type[Aggregator]:
    if name not in _REGISTRY:
        raise ValueError(f"method={name!r} is not a known aggregator; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get_aggregator(name: str, config: AggregatorConfig | None = None, **options: Any) -> Aggregator:
    """The method ``name`` with the shared ``config`` and its own ``options`` (fields of its Options)."""
    cls = aggregator_class(name)
    return cls(config, cls.Options(**options))


def option_fields() -> list[dataclasses.Field]:
    """Every registered method's own knobs (each Options class once): the ``method.*`` run-config keys."""
    seen: dict[str, dataclasses.Field] = {}
    for cls in (_REGISTRY[n] for n in sorted(_REGISTRY)):
        for f in dataclasses.fields(cls.Options):
            seen.setdefault(f.name, f)
    return list(seen.values())


def available() -> list[str]:
    return sorted(_REGISTRY)

