"""The Flower ClientApp: decode the payload, train or evaluate with fedlora, send back adapter tensors only.

Per-client state that must outlive a round (the method's frozen factors, which the server sends once; FLoRA's
and FedEx-LoRA's cumulative merged factors, onto which the server sends only each round's new stack; FedSA-LoRA's
own B) lives in ``context.state``: in deployment every message runs in a fresh process, so globals would be lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (flwr's ArrayRecord <-> torch conversion needs torch imported: docs/flower-notes.md note 7)
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import naming
from fedlora.aggregation import Aggregator
from fedlora.client import BudgetExhausted, evaluate_client, fit
from fedlora.components import make_aggregator, node_data
from fedlora.config import FedLoraConfig
from fedlora.downlink import MergedStateLost, apply_merged
from fedlora.privacy import privacy_mode_class
from fedlora.tasks import get_task
from fedlora.train import NonFiniteLoss
from fedlora.wire import BUDGET_EXHAUSTED, MERGED_STATE_LOST, NON_FINITE_LOSS, from_record, roundtrip_error, to_record

FROZEN_KEY = "fedlora.frozen"
PRIVACY_KEY = "fedlora.privacy"
MERGED_KEY = "fedlora.merged"  # ArrayRecord: the cumulative merged factors this node holds (FLoRA, FedEx-LoRA)
MERGED_GENERATION_KEY = "fedlora.merged-generation"  # ConfigRecord: their generation per layer
PERSONAL_KEY = "fedlora.personal"  # ArrayRecord: the tensors this client keeps as its own (FedSA-LoRA's B)


def with_frozen(payload: dict[str, torch.Tensor], agg: Aggregator, context: Context) -> dict[str, torch.Tensor]:
    """Cache frozen factors the first time they arrive; fill them in from the cache afterwards."""
    if not agg.frozen:
        return payload
    frozen = {k: v for k, v in payload.items() if (s := naming.split(k)) and s[1] in agg.frozen}
    if frozen:
        context.state[FROZEN_KEY] = to_record(frozen)
        return payload
    if FROZEN_KEY not in context.state:
        raise RuntimeError(f"method {agg.name!r}: the server did not send the frozen factors {agg.frozen} and "
                           "this node has none cached (was its state lost?)")
    return {**from_record(context.state[FROZEN_KEY]), **payload}


def with_merged(payload: dict[str, torch.Tensor], config: ConfigRecord, context: Context) -> dict[str, torch.Tensor]:
    """The payload with the cumulative merged factors: the server's delta appended to those held in the context
    state (fedlora.downlink), which then hold the result. Raises MergedStateLost where this node lacks what the
    delta extends. A message without the merged-factor keys passes through unchanged."""
    if "merged-from" not in config:
        return payload
    held = from_record(context.state[MERGED_KEY]) if MERGED_KEY in context.state else {}
    generation = {}
    if MERGED_GENERATION_KEY in context.state:
        record = context.state[MERGED_GENERATION_KEY]
        generation = dict(zip(record["layers"], record["generation"], strict=True))
    full, now, now_generation = apply_merged(payload, config, held, generation)
    context.state[MERGED_KEY] = to_record(now)
    context.state[MERGED_GENERATION_KEY] = ConfigRecord({"layers": list(now_generation),
                                                         "generation": list(now_generation.values())})
    return full


def with_personal(payload: dict[str, torch.Tensor], agg: Aggregator, cfg: FedLoraConfig, context: Context,
                  partition_id: int) -> dict[str, torch.Tensor]:
    """The payload plus this client's own tensors (Aggregator.personal, FedSA-LoRA's B): from the context state,
    else from its state file (a restarted SuperNode), else none (the model's initial values, B = 0)."""
    if not agg.personal:
        return payload
    if PERSONAL_KEY in context.state:
        return {**payload, **from_record(context.state[PERSONAL_KEY])}
    path = _personal_file(cfg, partition_id)
    if path is not None and path.exists():
        from safetensors.torch import load_file

        return {**payload, **load_file(str(path))}
    return payload


def save_personal(cfg: FedLoraConfig, context: Context, partition_id: int, tensors: dict[str, torch.Tensor]) -> None:
    context.state[PERSONAL_KEY] = to_record(tensors)
    path = _personal_file(cfg, partition_id)
    if path is not None:  # written to a temporary name, then renamed: a crash leaves the old file or the new one
        import os

        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)


def _personal_file(cfg: FedLoraConfig, partition_id: int) -> Path | None:
    folder = cfg.method.fedsa_state_dir
    return Path(folder).expanduser() / f"personal-partition-{partition_id}.safetensors" if folder else None


def load_privacy_state(cfg: FedLoraConfig, context: Context, partition_id: int) -> dict | None:
    """This client's privacy state (its DP accountant) when its privacy mode keeps one: from the context state
    (simulation, same SuperNode) or, after a SuperNode restart, from its file under privacy.state-dir."""
    if not privacy_mode_class(cfg.privacy.mode).client_state:
        return None
    if PRIVACY_KEY in context.state:
        return json.loads(str(context.state[PRIVACY_KEY]["accountant"]))
    if cfg.privacy.state_dir:
        from fedlora.privacy.accountant import load_state_file

        return load_state_file(_state_file(cfg, partition_id))
    return None


def save_privacy_state(cfg: FedLoraConfig, context: Context, partition_id: int, state: dict) -> None:
    context.state[PRIVACY_KEY] = ConfigRecord({"accountant": json.dumps(state)})
    if cfg.privacy.state_dir:
        from fedlora.privacy.accountant import save_state_file

        save_state_file(_state_file(cfg, partition_id), state)


def _state_file(cfg: FedLoraConfig, partition_id: int) -> Path:
    return Path(cfg.privacy.state_dir).expanduser() / f"accountant-partition-{partition_id}.json"


def _evaluation_split(cfg: FedLoraConfig, context: Context) -> None:
    """A SuperNode's own folder may lack a test split: say which node config and which run-config key fix it."""
    if "data-path" not in context.node_config:
        return
    try:
        get_task(cfg).dataset("test")
    except ValueError as e:
        raise ValueError(f"node config data-path={cfg.data.source!r} has no test split for federated evaluation "
                         f"({e}); add test.jsonl there, or run with fraction-evaluate=0") from None


def make_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    app = ClientApp()

    def setup(context: Context) -> tuple[FedLoraConfig, Aggregator, int, int]:
        """Run config + this node's data (its own data-path, or a partition of data.source) + the method."""
        cfg = FedLoraConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
        cfg, pid, n = node_data(cfg, context.node_config, context.node_id)
        return cfg, make_aggregator(cfg), pid, n

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, agg, pid, n = setup(context)
        payload = with_frozen(from_record(msg.content["arrays"]), agg, context)
        try:
            payload = with_merged(payload, msg.content["config"], context)
        except MergedStateLost as e:  # never train on a wrong base: the server resends the cumulative factors
            return Message(Error(code=MERGED_STATE_LOST, reason=str(e)), reply_to=msg)
        payload = with_personal(payload, agg, cfg, context, pid)
        rank = cfg.adapter.rank_for(pid)
        if agg.heterogeneous_ranks and int(msg.content["config"].get("payload-rank", 0)) != rank:
            payload = agg.client_payload(payload, rank)  # the server sent the global state: cut it to our rank
        try:
            res = fit(cfg, payload, pid, n, int(msg.content["config"]["server-round"]), agg,
                      load_privacy_state(cfg, context, pid))
        except BudgetExhausted as e:
            return Message(Error(code=BUDGET_EXHAUSTED, reason=str(e)), reply_to=msg)
        except NonFiniteLoss as e:
            return Message(Error(code=NON_FINITE_LOSS, reason=str(e)), reply_to=msg)
        if res.privacy_state is not None:
            save_privacy_state(cfg, context, pid, res.privacy_state)
        if res.personal is not None:
            save_personal(cfg, context, pid, res.personal)
        record = to_record(res.tensors, cfg.wire.upload)
        metrics = MetricRecord({**res.metrics, "num-examples": res.num_examples})
        if cfg.wire.upload != "float32":
            metrics["wire-error"] = roundtrip_error(res.tensors, record)  # what the codec's rounding added
        return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, agg, pid, n = setup(context)
        _evaluation_split(cfg, context)
        payload = with_frozen(from_record(msg.content["arrays"]), agg, context)
        try:
            payload = with_merged(payload, msg.content["config"], context)
        except MergedStateLost as e:
            return Message(Error(code=MERGED_STATE_LOST, reason=str(e)), reply_to=msg)
        res = evaluate_client(cfg, with_personal(payload, agg, cfg, context, pid), pid, n, agg)
        metrics = MetricRecord({**res.metrics, "num-examples": res.num_examples})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
