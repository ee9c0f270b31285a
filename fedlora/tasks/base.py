"""The task protocol and the registry of tasks: what the model learns to predict, as a plug-in.

A task owns everything that depends on it: the base model and tokenizer, default adapter targets per
``model_type`` (as peft's target-module mapping does), the examples of a split and their encoding, the
per-example loss that plain training and DP-SGD both optimise, evaluation and its metrics, the PEFT task
type for export, and what a run leaves for a person to read at its end. Methods, privacy modes, the wire and
Flower know nothing of it.

The shared data logic lives here, once: a client's partition of a split (iid, Dirichlet or a task's own
scheme), the server's capped held-out set, and a per-process cache of tokenised splits (in simulation one
ray actor serves many rounds; in deployment each message is a fresh process and simply misses the cache).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from fedlora.accel import model_device, resolve_device, rng_devices, to_device
from fedlora.adapters import adapter_layers, inject_adapters
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.data import partition

Encoded = tuple[int, dict[str, torch.Tensor], torch.Tensor]  # (examples, model inputs, targets)


class Split(Protocol):
    """What the shared data logic needs of a task's data set: per-example group labels and subsets."""

    labels: list[int]

    def __len__(self) -> int: ...

    @property
    def num_labels(self) -> int: ...

    def subset(self, indices: Sequence[int]) -> Split: ...


_DATASETS: dict[tuple, Split] = {}
_PARTITIONS: dict[tuple, list[list[int]]] = {}
_ENCODED: dict[tuple, Encoded] = {}


class Task(ABC):
    """One kind of supervised objective. Class attributes tell the rest of fedlora what it needs:

      name:              the ``model.task`` value.
      peft_task_type:    peft's ``task_type`` of the exported adapter (SEQ_CLS, CAUSAL_LM, ...).
      default_targets:   ``model_type`` -> adapter target modules when ``adapter.target-modules='auto'``
                         (key "*" = any other model type).
      default_head:      trainable, aggregated head modules when ``adapter.head='auto'`` ('' = none).
      partition_schemes: the ``data.partition`` values this task can split its data by.
      full_precision:    modules a quantised base (``model.quantization``) keeps in full precision (the output
                         head), besides ``adapter.head``.
    """

    name: ClassVar[str]
    peft_task_type: ClassVar[str]
    default_targets: ClassVar[dict[str, str]]
    default_head: ClassVar[str] = ""
    partition_schemes: ClassVar[tuple[str, ...]] = ("iid", "dirichlet")
    full_precision: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: FedLoraConfig) -> None:
        self.cfg = cfg

    # -- configuration ----------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: FedLoraConfig) -> None:
        """Resolve ``auto`` adapter targets and head for this task, then check the task's own constraints."""
        if cfg.adapter.target_modules.strip() == "auto":
            mt = cls.model_type(cfg.model.name)
            cfg.adapter.target_modules = cls.default_targets.get(mt or "", cls.default_targets["*"])
        if cfg.adapter.head.strip() == "auto":
            cfg.adapter.head = cls.default_head
        cfg.check([(cfg.data.partition in cls.partition_schemes, "data.partition",
                    f"is not a scheme of model.task={cls.name!r}; use one of {list(cls.partition_schemes)}")])

    @classmethod
    def model_type(cls, name: str) -> str | None:
        """transformers' ``model_type`` of ``model.name`` without loading weights (None when unknown)."""
        config = Path(name).expanduser() / "config.json"
        if config.is_file():
            return json.loads(config.read_text(encoding="utf-8")).get("model_type")
        return None

    # -- model ------------------------------------------------------------------------------------------
    @abstractmethod
    def base_model(self) -> nn.Module:
        """The frozen base model (in eval mode); any new head is seeded by ``run.seed`` so that server and clients
        build identical weights without them crossing the wire."""

    @abstractmethod
    def tokenizer(self) -> Any: ...

    @property
    def device(self) -> torch.device:
        """Where this process trains and evaluates (``train.device``, resolved here: docs/gpu.md)."""
        return resolve_device(self.cfg.train.device)

    def build_model(self, mode: str, rank: int, quantization: str | None = None) -> nn.Module:
        """Base model with adapters of ``mode``/``rank`` on the configured targets (and the trainable head), on
        :attr:`device`. The adapter init is seeded by ``run.seed`` in a forked RNG: identical on server and
        clients, and the caller's global RNG (which local training seeds per client and round) is left alone.

        ``quantization`` (default ``model.quantization``) != 'none': every other linear layer of the base is
        4/8-bit (:mod:`fedlora.quantize`), quantised on the device by the move there; the adapters stay fp32."""
        a, device = self.cfg.adapter, self.device
        scheme = self.cfg.model.quantization if quantization is None else quantization
        model = self.base_model()
        if scheme != "none":
            from fedlora.quantize import quantize_base

            bf16 = (self.cfg.train.precision == "bf16" and device.type == "cuda") or self.cfg.model.dtype == "bfloat16"
            quantize_base(model, scheme, keep=[*a.heads(), *self.full_precision],
                          compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)
            inject_adapters(model, a.targets(), rank=rank, alpha=a.alpha, mode=mode, dropout=a.dropout,
                            head=a.heads())
        if scheme != "none" or device.type != "cpu":
            model.to(device)
        return model

    def training_inputs(self, model: nn.Module, data: Encoded) -> Encoded:
        """What local training feeds ``model`` for a client's CPU-side training data (default: ``data``). A task
        may precompute what the frozen base gives every step (classification: ``train.cache-frozen-layers``)."""
        return data

    # -- data: the hooks a task implements ----------------------------------------------------------------
    @abstractmethod
    def load_split(self, split: str) -> Split:
        """All examples of ``split`` ("train" | "test") of ``data.source``."""

    @abstractmethod
    def encode(self, ds: Split) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(model inputs, targets) of ``ds``, tokenised."""

    def data_key(self) -> tuple:
        """The config values :meth:`load_split` depends on (cache key)."""
        return (self.cfg.data.source,)

    def encoding_key(self) -> tuple:
        """The config values :meth:`encode` depends on besides the examples (cache key)."""
        return (self.cfg.model.name, self.cfg.model.max_length)

    def split_groups(self, ds: Split, n: int, scheme: str) -> list[list[int]]:
        """A task's own partition scheme (one not in data.partition's iid | dirichlet)."""
        raise ConfigError(f"run-config data.partition={scheme!r} is not implemented by model.task={self.name!r}")

    # -- data: shared ---------------------------------------------------------------------------------------
    def source_key(self) -> tuple:
        """What decides the examples of a split: the task's :meth:`data_key` and the validation carve-out."""
        f = self.cfg.data.validation_fraction
        return (*self.data_key(), f, self.cfg.run.seed if f else None)

    def dataset(self, split: str) -> Split:
        """All examples of ``split``. With ``data.validation-fraction`` f > 0, "train" is the train split less a
        seeded share f of each class and "test" is that held-out share: every evaluation (the server's, the
        clients' own) then reads validation data, and the test split is never loaded (tuning on it would report
        an optimistic number)."""
        key = (self.name, split, *self.source_key())
        if key not in _DATASETS:
            f = self.cfg.data.validation_fraction
            if f and split in ("train", "test"):
                full = self.load_split("train")
                held = validation_indices(full.labels, f, self.cfg.run.seed)
                keep = sorted(set(range(len(full))) - set(held))
                _DATASETS[key] = full.subset(held if split == "test" else keep)
            else:
                _DATASETS[key] = self.load_split(split)
        return _DATASETS[key]

    def partitions(self, split: str, num_partitions: int) -> list[list[int]]:
        """Indices of every client's share of ``split``: the same scheme for train and test, so federated
        evaluation uses each client's own kind of data; the minimum partition size applies to train only."""
        d = self.cfg.data
        min_size = d.min_partition_size if split == "train" else 0
        key = (self.name, split, *self.source_key(), num_partitions, d.partition, d.dirichlet_alpha, self.cfg.run.seed,
               min_size)
        if key not in _PARTITIONS:
            ds = self.dataset(split)
            if d.partition in ("iid", "dirichlet"):
                _PARTITIONS[key] = partition(ds.labels, num_partitions, scheme=d.partition, alpha=d.dirichlet_alpha,
                                             seed=self.cfg.run.seed, min_partition_size=min_size)
            else:
                _PARTITIONS[key] = self.split_groups(ds, num_partitions, d.partition)
        return _PARTITIONS[key]

    def preflight(self, num_clients: int) -> None:
        """Fail before round 1, with one message, when the training data cannot be split among ``num_clients``."""
        if num_clients <= 1:
            return
        try:
            self.partitions("train", num_clients)
        except ValueError as e:
            raise ConfigError(f"{num_clients} clients: {e}") from None

    def client_dataset(self, split: str, partition_id: int, num_partitions: int) -> Split:
        """The examples of ``split`` the client holding ``partition_id`` owns. ``num_partitions == 1``: the source
        is not shared (a SuperNode's own data-path), all of it is this client's."""
        ds = self.dataset(split)
        if num_partitions == 1:
            return ds
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"node config partition-id={partition_id} must be in [0, num-partitions={num_partitions})")
        return ds.subset(self.partitions(split, num_partitions)[partition_id])

    def client_data(self, split: str, partition_id: int, num_partitions: int) -> Encoded:
        """(num examples, inputs, targets) of a client's split, tokenised once per process."""
        d = self.cfg.data
        key = (self.name, split, *self.source_key(), *self.encoding_key(), partition_id, num_partitions, d.partition,
               d.dirichlet_alpha, d.min_partition_size, self.cfg.run.seed)
        if key not in _ENCODED:
            enc, targets = self.encode(self.client_dataset(split, partition_id, num_partitions))
            _ENCODED[key] = (len(enc["input_ids"]), enc, targets)
        return _ENCODED[key]

    def server_dataset(self) -> Split:
        """Held-out test examples for the server's evaluation (a fixed, seeded subset if data.max-eval-examples caps
        it)."""
        ds = self.dataset("test")
        cap = self.cfg.data.max_eval_examples
        if cap and len(ds) > cap:
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.cfg.run.seed))[:cap]
            ds = ds.subset(sorted(idx.tolist()))
        return ds

    def server_sample(self, n: int) -> Split:
        """``n`` seeded training examples the server may hold (a public or proxy sample), e.g. for an init."""
        ds = self.dataset("train")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.cfg.run.seed + 17))[:n]
        return ds.subset(sorted(idx.tolist()))

    # -- objective and metrics --------------------------------------------------------------------------------
    @abstractmethod
    def batch_loss(self, model: nn.Module, enc: dict[str, torch.Tensor], targets: torch.Tensor, idx: torch.Tensor
                   ) -> tuple[torch.Tensor, int, int]:
        """(loss, correct, counted) of the rows ``idx``. The loss MUST be the batch mean of per-example losses:
        DP-SGD (opacus, loss_reduction='mean') recovers and clips each example's own gradient from it."""

    @abstractmethod
    def evaluate(self, model: nn.Module, enc: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
        """Held-out metrics; "loss" and "accuracy" are always among them."""

    def train_metrics(self, losses: list[float], correct: int, counted: int) -> dict[str, float]:
        nan = math.nan
        return {"train_loss": sum(losses) / len(losses) if losses else nan, "train_accuracy": correct / max(counted, 1),
                "first_loss": losses[0] if losses else nan, "last_loss": losses[-1] if losses else nan}

    def round_metrics(self, global_loss: float | None, fed_loss: float | None) -> dict[str, float | None]:
        """Per-round extras derived from the losses (RoundStats fields), e.g. perplexity."""
        return {}

    def base_gradients(self, model: nn.Module, num_examples: int) -> dict[str, torch.Tensor]:
        """Gradient of the mean loss over :meth:`server_sample` with respect to the base weight of every adapted
        layer (d_out, d_in), keyed by layer path; the model's parameters are left as they were."""
        layers = adapter_layers(model)
        for layer in layers.values():
            layer.base.weight.requires_grad_(True)
        enc, targets = self.encode(self.server_sample(num_examples))
        n = len(targets)
        _, enc, targets = to_device((n, enc, targets), model_device(model))
        bs = self.cfg.train.batch_size
        model.train()
        try:
            with torch.random.fork_rng(devices=rng_devices(model_device(model))):
                torch.manual_seed(self.cfg.run.seed)
                for start in range(0, n, bs):
                    idx = torch.arange(start, min(start + bs, n))
                    loss = self.batch_loss(model, enc, targets, idx)[0] * (len(idx) / n)
                    loss.backward()
            return {path: layer.base.weight.grad.detach().to("cpu", copy=True) for path, layer in layers.items()}
        finally:
            model.eval()
            for layer in layers.values():
                layer.base.weight.requires_grad_(False)
            for p in model.parameters():
                p.grad = None

    def finish(self, aggregator: Any, state: dict[str, torch.Tensor], out: Path) -> str | None:
        """What a run writes for a person to read at its end (e.g. generations); returns a line to print."""
        return None


def validation_indices(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded, per-class share ``fraction`` of the examples (at least one of every class with
    two or more, so that validation sees each class and train keeps it)."""
    gen = torch.Generator().manual_seed(seed + 7919)  # not the partition's own stream: the carve-out is its own draw
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    held: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        order = torch.randperm(len(members), generator=gen)[:take].tolist()
        held.extend(members[j] for j in order)
    return sorted(held)


_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available as ``model.task = cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"task {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    if name not in _REGISTRY:
        raise ConfigError(f"run-config model.task={name!r} is not a known task; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get_task(cfg: FedLoraConfig) -> Task:
    """The task of ``cfg`` (resolved once per use; all state it caches is per process, keyed by config values)."""
    return task_class(cfg.model.task)(cfg)


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def preflight(cfg: FedLoraConfig, num_clients: int) -> None:
    """Start-up check of a simulated federation of ``num_clients``: raises ConfigError naming the fix."""
    get_task(cfg).preflight(num_clients)
