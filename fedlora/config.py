"""Run configuration: one dataclass per concern, built from Flower's flattened run config.

Flower hands the ServerApp/ClientApp ``context.run_config`` as a flat dict: TOML tables under
``[tool.flwr.app.config]`` arrive as dotted keys (``adapter.rank``), values are int/float/bool/str only.
:func:`FedLoraConfig.from_run_config` maps ``section.key-name`` onto ``Section.key_name``, checks types and
ranges, and rejects unknown keys with the list of known ones, so a typo fails at start-up, not at round 7.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fedlora.robust import RobustConfig  # the robust.* section lives beside the rules it configures
from fedlora.wire import CODECS, WireConfig  # the wire.* section lives beside the codec

PRECISIONS = ("fp32", "bf16")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


def device_spec_ok(spec: str) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``: the syntax only (whether the device exists is asked where it is
    used, :func:`fedlora.accel.resolve_device`: a server without a GPU may drive clients that have one)."""
    head, _, index = spec.partition(":")
    return spec in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit())


class ConfigError(ValueError):
    """A run-config value is missing, mistyped or out of range; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = field(default="tiny", metadata={"help": "'tiny' (random, offline), 'minilm' (pip extra), "
                                                       "a local folder, or a hub name"})
    max_length: int = field(default=64, metadata={"help": "tokens per example (truncation)"})
    task: str = field(default="classification", metadata={"help": "classification | causal_lm (next-token "
                                                                   "loss, perplexity; fedlora.causal_lm)"})
    dtype: str = field(default="float32", metadata={"help": "causal_lm: float32 | bfloat16 (base and adapters)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "causal_lm: recompute activations "
                                                                          "in backward (less memory, slower)"})
    quantization: str = field(default="none", metadata={"help": "frozen base in 4/8 bit (QLoRA-style, "
                                                                "bitsandbytes): none | nf4 | fp4 | int8"})


@dataclass
class AdapterConfig:
    rank: int = field(default=8, metadata={"help": "LoRA rank r (global rank for homogeneous methods)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling s = alpha / r"})
    ranks: str = field(default="", metadata={"help": "per-client ranks '4,8,16': client i gets ranks[i % n] "
                                                     "(flora, flexlora, hetlora)"})
    target_modules: str = field(default="auto", metadata={"help": "comma-separated module names/regex; 'auto' = "
                                                                  "the task's default for the model type"})
    dropout: float = 0.0
    head: str = field(default="auto", metadata={"help": "trainable, aggregated task-head modules ('' = none, "
                                                        "'auto' = the task's head: classifier | none)"})

    def targets(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def heads(self) -> list[str]:
        return [t.strip() for t in self.head.split(",") if t.strip()]

    def rank_for(self, partition_id: int) -> int:
        """Adapter rank of the client holding ``partition_id``."""
        if not self.ranks:
            return self.rank
        ranks = [int(r) for r in self.ranks.split(",")]
        return ranks[partition_id % len(ranks)]

    def allowed_ranks(self) -> set[int]:
        """Every rank a client may declare: adapter.ranks when set, else adapter.rank."""
        return {int(r) for r in self.ranks.split(",")} if self.ranks else {self.rank}


def _method_config() -> type:
    """[method]: the aggregator's name and weighting, plus every registered method's own ``Options`` fields
    (declared in the method's file, e.g. ``fair_lambda`` in aggregation/lora_fair.py)."""
    from fedlora.aggregation import available, option_fields

    shared = [
        ("name", str, field(default="fedit", metadata={"help": "aggregator: " + " | ".join(available())})),
        ("weighting", str, field(default="num_examples", metadata={"help": "num_examples | uniform"})),
        ("server_opt", str, field(default="none", metadata={"help": "server optimiser on the linear methods' "
                                                                   "pseudo-gradient: none | avgm | adam | yogi"})),
        ("server_lr", float, field(default=0.0, metadata={"help": "its learning rate (0 = avgm 1.0, adam / yogi "
                                                                  "0.01)"})),
        ("server_momentum", float, field(default=0.9, metadata={"help": "avgm's momentum"})),
        ("server_beta1", float, field(default=0.9, metadata={"help": "adam / yogi first-moment decay"})),
        ("server_beta2", float, field(default=0.99, metadata={"help": "adam / yogi second-moment decay"})),
        ("server_tau", float, field(default=1e-3, metadata={"help": "adam / yogi eps (Reddi et al.'s tau)"})),
    ]
    own = [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in option_fields()]
    cls = dataclasses.make_dataclass("MethodConfig", shared + own)
    cls.__module__ = __name__
    return cls


MethodConfig = _method_config()


@dataclass
class DataConfig:
    source: str = field(default="austen", metadata={"help": "'austen' (built in) or a local folder"})
    partition: str = field(default="dirichlet", metadata={"help": "iid | dirichlet | label (causal_lm: one group "
                                                                  "per client)"})
    dirichlet_alpha: float = 1.0
    min_partition_size: int = 10
    max_eval_examples: int = field(default=400, metadata={"help": "server-side test examples (0 = all)"})
    validation_fraction: float = field(default=0.0, metadata={
        "help": "> 0: hold out this fraction of train per class (seeded by seed) as a validation split that stands "
                "in for test everywhere, so hyperparameters are tuned without reading test (0 = off)"})
    format: str = field(default="text", metadata={"help": "causal_lm: text | instruction (JSONL instruction, "
                                                          "input, response; loss on the response only)"})
    text_field: str = field(default="text", metadata={"help": "causal_lm: JSONL field holding the text"})
    packing: bool = field(default=False, metadata={"help": "causal_lm text: concatenate documents into full "
                                                           "max-length windows"})


@dataclass
class TrainConfig:
    local_steps: int = field(default=20, metadata={"help": "optimizer steps per client per round"})
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 64
    micro_batch_size: int = field(default=0, metadata={"help": "gradient accumulation: forward/backward in chunks "
                                                               "of this many examples (0 = the whole batch)"})
    device: str = field(default="auto", metadata={"help": "auto (first CUDA device, else CPU) | cpu | cuda | cuda:N"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 (autocast of the forward pass on CUDA; "
                                                             "adapters, optimizer and uploads stay fp32)"})
    prox_mu: float = field(default=0.0, metadata={"help": "FedProx: + (mu / 2) ||w - w_global||^2 over the trainable "
                                                          "tensors (0 = off)"})
    cache_frozen_layers: bool = field(default=False, metadata={"help": "classification: compute the frozen layers "
                                                                       "below the first adapted one once per process "
                                                                       "and train only those above"})


@dataclass
class PrivacyConfig:
    """Differential privacy. ``mode``: "none"; "sample" = DP-SGD on every client (opacus; record-level DP,
    one accountant per client); "client" = DP-FedAvg (each client's update clipped to norm ``clip``, Gaussian
    noise of std noise-multiplier * clip / m on the server's average of m clients)."""

    mode: str = field(default="none", metadata={"help": "none | sample (DP-SGD) | client (DP-FedAvg)"})
    target_epsilon: float = field(default=0.0, metadata={"help": "budget for the planned run; derives the noise "
                                                                  "when noise-multiplier = 0 (0 = no budget)"})
    target_epsilons: str = field(default="", metadata={"help": "sample mode: per-client budgets, client i gets "
                                                              "entry i mod len, e.g. '1,3,8' ('' = target-epsilon)"})
    delta: float = 1e-5
    noise_multiplier: float = field(default=0.0, metadata={"help": "sigma (sample) or z (client); 0 = from "
                                                                    "target-epsilon"})
    clip: float = field(default=1.0, metadata={"help": "per-sample norm C (sample) or update norm S (client)"})
    accountant: str = field(default="rdp", metadata={"help": "rdp | prv"})
    state_dir: str = field(default="", metadata={"help": "client accountant files survive SuperNode restarts "
                                                         "here ('' = context state only)"})
    adaptive_clip: bool = field(default=False, metadata={"help": "client mode: clip norm tracks a quantile of "
                                                                 "update norms (Andrew et al. 2021)"})
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float = field(default=0.0, metadata={"help": "sigma_b of the noised count (0 = clients / 20)"})

    def budgets(self) -> list[float]:
        """privacy.target-epsilons as floats (ConfigError on a malformed list)."""
        try:
            out = [float(e) for e in self.target_epsilons.split(",")] if self.target_epsilons.strip() else []
        except ValueError:
            raise ConfigError(f"run-config privacy.target-epsilons={self.target_epsilons!r} must be comma-separated "
                              "numbers, e.g. '1,3,8'") from None
        if any(not e > 0 for e in out):
            raise ConfigError(f"run-config privacy.target-epsilons={self.target_epsilons!r} must hold budgets > 0")
        return out

    def budget_for(self, partition_id: int) -> float:
        """The DP-SGD budget of the client holding ``partition_id`` (target-epsilon without a per-client list)."""
        budgets = self.budgets()
        return budgets[partition_id % len(budgets)] if budgets else self.target_epsilon


@dataclass
class RunConfig:
    num_server_rounds: int = 3
    fraction_train: float = field(default=1.0, metadata={"help": "share of the nodes sampled to train each round"})
    fraction_evaluate: float = field(default=1.0, metadata={"help": "share sampled for federated evaluation"})
    min_nodes: int = field(default=2, metadata={"help": "nodes that must be connected before round 1"})
    seed: int = 42
    output_dir: str = field(default="", metadata={"help": "'' = runs/<method>-<time>"})
    timeout: float = field(default=3600.0, metadata={"help": "seconds the server waits for min-nodes nodes"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output-dir"})
    export_merged: bool = field(default=False, metadata={"help": "also save base + update merged (output/merged)"})
    # Faults: a round needs max(min-fit-clients, ceil(min-fit-fraction * sampled)) valid replies; each
    # phase (train, federated evaluation) waits at most round-timeout seconds for replies.
    min_fit_clients: int = field(default=1, metadata={"help": "valid updates a round needs"})
    min_fit_fraction: float = field(default=0.0, metadata={"help": "... or this share of the sampled clients"})
    round_timeout: float = field(default=600.0, metadata={"help": "seconds each phase waits for replies"})
    max_failed_rounds: int = field(default=3, metadata={"help": "consecutive failed rounds before the run ends"})
    # Update validation: L2 norm over all uploaded tensors (0 = no bound), examples a client may claim.
    max_update_norm: float = field(default=0.0, metadata={"help": "L2 bound of one upload (0 = no bound)"})
    max_num_examples: int = field(default=10_000_000, metadata={"help": "largest num-examples a client may claim"})
    keep_checkpoints: int = field(default=2, metadata={"help": "server_state-<round>.safetensors files kept"})


SECTIONS = {"model": ModelConfig, "adapter": AdapterConfig, "method": MethodConfig, "data": DataConfig,
            "train": TrainConfig, "privacy": PrivacyConfig, "robust": RobustConfig, "wire": WireConfig}


@dataclass
class FedLoraConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    wire: WireConfig = field(default_factory=WireConfig)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FedLoraConfig:
        """Build from Flower's flat run config (missing keys keep their defaults)."""
        cfg = cls()
        for raw_key, value in run_config.items():
            section, _, name = raw_key.rpartition(".")
            target = cfg.run if section == "" else getattr(cfg, section, None)
            if section and section not in SECTIONS:
                raise ConfigError(f"unknown run-config section in key {raw_key!r}; sections are {sorted(SECTIONS)} "
                                  f"and top-level keys {_keys(RunConfig)}")
            attr = name.replace("-", "_")
            known = {f.name: f for f in dataclasses.fields(target)}
            if attr not in known:
                where = f"[{section}]" if section else "top-level"
                raise ConfigError(f"unknown run-config key {raw_key!r}; known {where} keys: {_keys(type(target))}")
            setattr(target, attr, _coerce(raw_key, value, known[attr].type, getattr(target, attr)))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Checks that need no model or data. What depends on the task, the method or the privacy mode is asked
        of their classes (``check_config``), so each plug-in states its own constraints."""
        from fedlora.aggregation import aggregator_class, available
        from fedlora.privacy import privacy_mode_class, privacy_modes
        from fedlora.tasks import available_tasks, task_class

        checks = [
            (self.run.num_server_rounds >= 1, "num-server-rounds", "must be >= 1"),
            (0.0 < self.run.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]"),
            (0.0 <= self.run.fraction_evaluate <= 1.0, "fraction-evaluate", "must be in [0, 1]"),
            (self.run.min_nodes >= 1, "min-nodes", "must be >= 1"),
            (self.run.min_fit_clients >= 1, "min-fit-clients", "must be >= 1"),
            (0.0 <= self.run.min_fit_fraction <= 1.0, "min-fit-fraction", "must be in [0, 1]"),
            (self.run.round_timeout > 0, "round-timeout", "must be > 0 seconds (a vanished client must not stall "
                                                          "a round forever)"),
            (self.run.max_failed_rounds >= 1, "max-failed-rounds", "must be >= 1"),
            (self.run.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0 = no bound)"),
            (self.run.max_num_examples >= 1, "max-num-examples", "must be >= 1"),
            (self.run.keep_checkpoints >= 1, "keep-checkpoints", "must be >= 1 (2 lets a torn newest checkpoint "
                                                                 "fall back to the previous one)"),
            (self.adapter.rank >= 1, "adapter.rank", "must be >= 1"),
            (self.adapter.alpha > 0, "adapter.alpha", "must be > 0"),
            (0.0 <= self.adapter.dropout < 1.0, "adapter.dropout", "must be in [0, 1)"),
            (bool(self.adapter.targets()), "adapter.target-modules",
             "must name at least one module, e.g. 'query,value', or be 'auto'"),
            (self.train.local_steps >= 1, "train.local-steps", "must be >= 1"),
            (self.train.batch_size >= 1, "train.batch-size", "must be >= 1"),
            (self.train.lr > 0, "train.lr", "must be > 0"),
            (self.train.prox_mu >= 0, "train.prox-mu", "must be >= 0 (0 = no proximal term)"),
            (not self.train.cache_frozen_layers or self.model.task == "classification", "train.cache-frozen-layers",
             "applies to model.task='classification' (BERT-family encoders) only; set it to false"),
            (self.train.micro_batch_size >= 0, "train.micro-batch-size", "must be >= 0 (0 = the whole batch)"),
            (self.train.precision in PRECISIONS, "train.precision", f"must be one of {list(PRECISIONS)}"),
            (device_spec_ok(self.train.device), "train.device", "must be auto, cpu, cuda or cuda:N (N a GPU index)"),
            (self.model.quantization in QUANTIZATIONS, "model.quantization", f"must be one of {list(QUANTIZATIONS)}"),
            (self.model.max_length >= 8, "model.max-length", "must be >= 8"),
            (self.model.task in available_tasks(), "model.task", f"must be one of {available_tasks()}"),
            (self.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be 'float32' or 'bfloat16'"),
            (self.data.dirichlet_alpha > 0, "data.dirichlet-alpha", "must be > 0"),
            (self.data.min_partition_size >= 0, "data.min-partition-size", "must be >= 0"),
            (0 <= self.data.validation_fraction < 1, "data.validation-fraction",
             "must be in [0, 1): the share of train held out for validation, e.g. 0.15 (0 = evaluate on test)"),
            (self.method.weighting in ("num_examples", "uniform"), "method.weighting",
             "must be 'num_examples' or 'uniform'"),
            (self.method.name in available(), "method.name", f"is not a known aggregator; choose one of {available()}"),
            (self.privacy.mode in privacy_modes(), "privacy.mode", f"must be one of {privacy_modes()}"),
            (self.privacy.accountant in ("rdp", "prv"), "privacy.accountant", "must be 'rdp' or 'prv'"),
            (self.privacy.clip > 0, "privacy.clip", "must be > 0"),
            (0 < self.privacy.delta < 1, "privacy.delta", "must be in (0, 1), e.g. 1e-5"),
            (self.privacy.target_epsilon >= 0, "privacy.target-epsilon", "must be >= 0 (0 = no budget)"),
            (not self.privacy.budgets() or self.privacy.mode == "sample", "privacy.target-epsilons",
             "(per-client budgets) applies to privacy.mode='sample' (DP-SGD, one accountant per client); clear it"),
            (self.privacy.noise_multiplier >= 0, "privacy.noise-multiplier", "must be >= 0"),
            (0 < self.privacy.target_quantile < 1, "privacy.target-quantile", "must be in (0, 1)"),
            (self.privacy.clip_lr > 0, "privacy.clip-lr", "must be > 0"),
            (self.privacy.count_noise >= 0, "privacy.count-noise", "must be >= 0 (0 = clients / 20)"),
            (self.wire.upload in CODECS, "wire.upload", f"must be one of {list(CODECS)} (float32 = exact)"),
            (self.wire.download in CODECS, "wire.download", f"must be one of {list(CODECS)} (float32 = exact)"),
        ]
        self.check(checks)
        task_class(self.model.task).check_config(self)
        method = aggregator_class(self.method.name)
        try:
            method.Options(**{f.name: getattr(self.method, f.name) for f in dataclasses.fields(method.Options)}
                           ).validate()
        except ValueError as e:
            raise ConfigError(f"run-config {e}") from None
        self._check_ranks(method)
        privacy_mode_class(self.privacy.mode).check_config(self, method)
        try:
            self.robust.validate()
        except ValueError as e:
            raise ConfigError(f"run-config {e}") from None
        from fedlora.server_opt import SERVER_OPTS, refusal

        m = self.method
        self.check([
            (m.server_opt in SERVER_OPTS, "method.server-opt", f"must be one of {list(SERVER_OPTS)}"),
            (m.server_lr >= 0, "method.server-lr", "must be >= 0 (0 = the optimiser's default)"),
            (0 <= m.server_momentum < 1, "method.server-momentum", "must be in [0, 1)"),
            (0 <= m.server_beta1 < 1, "method.server-beta1", "must be in [0, 1)"),
            (0 <= m.server_beta2 < 1, "method.server-beta2", "must be in [0, 1)"),
            (m.server_tau > 0, "method.server-tau", "must be > 0"),
        ])
        if m.server_opt != "none" and (why := refusal(method)):
            linear = [n for n in available() if not refusal(aggregator_class(n))]
            raise ConfigError(f"run-config method.server-opt={m.server_opt!r} does not apply to method.name="
                              f"{m.name!r}: {why}; use method.server-opt='none' or one of {linear}")
        if self.robust.rule != "mean" and not method.linear:
            raise ConfigError(f"run-config robust.rule={self.robust.rule!r} applies to methods whose aggregate is "
                              f"linear in the uploads; method.name={self.method.name!r} is not (its bound is the "
                              "product norm: robust.norm-bound); use robust.rule='mean' or a linear method")

    def check(self, checks: list[tuple[bool, str, str]]) -> None:
        """Raise :class:`ConfigError` for the first (ok, key, fix) that is not ok, naming the key and its value."""
        for ok, key, fix in checks:
            if not ok:
                raise ConfigError(f"run-config {key}={self._get(key)!r} {fix}")

    def _check_ranks(self, method: type) -> None:
        if not self.adapter.ranks:
            return
        try:
            ranks = [int(r) for r in self.adapter.ranks.split(",")]
        except ValueError:
            raise ConfigError(f"run-config adapter.ranks={self.adapter.ranks!r} must be comma-separated ints, "
                              "e.g. '4,8,16'") from None
        from fedlora.aggregation import aggregator_class, available

        hetero = [n for n in available() if aggregator_class(n).heterogeneous_ranks]
        self.check([
            (min(ranks) >= 1, "adapter.ranks", "must hold ranks >= 1"),
            (method.heterogeneous_ranks, "adapter.ranks",
             f"gives clients different ranks, but method.name={self.method.name!r} needs one rank; use one of "
             f"{hetero} or clear adapter.ranks (adapter.ranks='')"),
        ])
        if not method.fresh_each_round and max(ranks) > self.adapter.rank:
            raise ConfigError(f"run-config adapter.ranks={self.adapter.ranks!r} exceeds adapter.rank="
                              f"{self.adapter.rank}: method {self.method.name!r} keeps a global adapter of rank "
                              f"adapter.rank; set adapter.rank={max(ranks)} or more")

    def _get(self, key: str) -> Any:
        section, _, name = key.rpartition(".")
        return getattr(self.run if not section else getattr(self, section), name.replace("-", "_"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        """The flat Flower form (inverse of :meth:`from_run_config`)."""
        flat: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for k, v in values.items():
                key = k.replace("_", "-")
                flat[key if section == "run" else f"{section}.{key}"] = v
        return flat

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def app_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml, generated from the dataclasses (the one source of
    truth for keys, defaults and help): ``fedlora config --toml``. ``flwr run`` accepts overrides only of keys
    listed there; tests/test_config.py fails when the file and the dataclasses drift apart."""
    lines = ["[tool.flwr.app.config]",
             "# Generated by `fedlora config --toml` from fedlora/config.py (and each method's Options): do not edit."]
    for section, cls in (("", RunConfig), *SECTIONS.items()):
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            line = f"{section + '.' if section else ''}{key} = {_toml_value(value)}"
            help_ = f.metadata.get("help", "")
            lines.append(f"{line}  # {help_}" if help_ else line)
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # a TOML basic string: same escapes as JSON


def _keys(cls: type) -> list[str]:
    return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]


def _coerce(key: str, value: Any, typ: Any, default: Any) -> Any:
    """Accept what TOML/CLI give (ints for floats, 'true' for bools); reject the rest with a clear error."""
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif want is str:
        return str(value)
    raise ConfigError(f"run-config {key}={value!r} must be of type {want.__name__} (default {default!r})")
