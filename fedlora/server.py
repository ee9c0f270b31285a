"""The server side of a run, independent of how Flower was started: initial state (or resume), the
strategy, global evaluation each round, reports and the final adapter."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedlora.accel import autocast, to_device
from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.aggregation import Aggregator, ServerContext
from fedlora.checkpoint import has_checkpoint, load_checkpoint
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.report import Reporter
from fedlora.server_opt import split_state
from fedlora.strategy import LoRAStrategy, RoundStats, StopRun
from fedlora.tasks import get_task
from fedlora.wire import to_record

log = logging.getLogger("fedlora")


def output_dir(cfg: FedLoraConfig) -> Path:
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir).expanduser().resolve()
    return Path("runs", f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def initial_state(cfg: FedLoraConfig, agg: Aggregator) -> OrderedDict[str, torch.Tensor]:
    """The round-0 global state: a freshly injected model's adapters (seeded), shaped by the method, then the
    method's own server-side initialisation (e.g. Fed-SB's gradient init) with the task's data at hand."""
    task = get_task(cfg)
    model = task.build_model(agg.mode, cfg.adapter.rank)
    state = agg.init_state(adapter_state(model))

    def base_gradients(n: int) -> dict[str, torch.Tensor]:
        # A quantised base has no weight to differentiate: the same seeded model in full precision stands in.
        full = model if cfg.model.quantization == "none" else task.build_model(agg.mode, cfg.adapter.rank, "none")
        return task.base_gradients(full, n)

    return agg.server_init(state, ServerContext(base_gradients=base_gradients, lr=cfg.train.lr))


def global_evaluator(cfg: FedLoraConfig, agg: Aggregator):
    """Server-side evaluation of the global adapter on the held-out split (encoded once)."""
    task = get_task(cfg)
    enc, targets = task.encode(task.server_dataset())
    _, enc, targets = to_device((len(targets), enc, targets), task.device)

    def evaluate_state(state: dict[str, torch.Tensor]) -> dict[str, float]:
        model = task.build_model(agg.mode, cfg.adapter.rank)
        load_adapter_state(model, agg.client_payload(state, cfg.adapter.rank))
        with autocast(task.device, cfg.train.precision):
            return task.evaluate(model, enc, targets)

    return evaluate_state


def run_server(grid: Grid, cfg: FedLoraConfig, printer=print) -> dict:
    """Run the whole federation on ``grid``; returns the run summary."""
    torch.manual_seed(cfg.run.seed)
    agg = make_aggregator(cfg)
    out = output_dir(cfg)
    offset, meta, opt_tensors = 0, {}, {}
    resuming = cfg.run.resume and has_checkpoint(out)
    if resuming:
        state, offset, meta = load_checkpoint(out)  # the newest intact one (a torn file is skipped)
        state, opt_tensors = split_state(state)  # the server optimiser's moments travel in the same file
        if meta.get("method") != agg.name:
            raise ValueError(f"resume=true: the checkpoint in {out} is from method {meta.get('method')!r}, not "
                             f"{agg.name!r}; use another output-dir or the same method.name")
        printer(f"resuming from round {offset} ({out})")
    else:
        state = initial_state(cfg, agg)
    remaining = cfg.run.num_server_rounds - offset
    reporter = Reporter(cfg, out, printer)
    reporter.start({"resumed_from_round": offset}, keep_history=resuming, history=meta.get("history"))
    evaluate_state = global_evaluator(cfg, agg)
    task = get_task(cfg)
    strategy = LoRAStrategy(cfg, agg, state, round_offset=offset, output_dir=str(out), resume_meta=meta,
                            server_opt_tensors=opt_tensors,
                            on_round_end=lambda stats, _state: reporter.round(with_task_metrics(task, stats)))

    def evaluate_fn(_server_round: int, _arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluate_state(strategy.state))  # the strategy closes (reports, checkpoints) the round

    if remaining > 0:
        try:
            strategy.start(grid, to_record(state), num_rounds=remaining, timeout=cfg.run.round_timeout,
                           evaluate_fn=evaluate_fn)
        except StopRun as e:
            printer(f"stopping early: {e}; the last global state is kept")
    summary = reporter.finish()
    from fedlora.adapters.peft_io import save_peft_adapter

    save_peft_adapter(strategy.state, cfg, out / "adapter")
    if cfg.run.export_merged:
        from fedlora.export import save_merged_model

        save_merged_model(cfg, agg, strategy.state, out / "merged")
    line = task.finish(agg, strategy.state, out)
    if line:
        printer(line)
    if not any(row.get("clients_aggregated") and not row.get("rolled_back") for row in strategy.history):
        raise RunFailed(f"no round aggregated a single client update that was kept (see 'failed', 'rejected' and "
                        f"'rolled_back' in {out / 'metrics.jsonl'}); the global adapter in {out} is the initial one")
    final = next((r["global_loss"] for r in reversed(strategy.history) if r.get("global_loss") is not None), 0.0)
    if not math.isfinite(final):
        raise RunFailed(f"the final global model is destroyed: server loss {final} (robust.divergence-factor=0 "
                        "turned the divergence guard off?)")
    return summary


class RunFailed(RuntimeError):
    """The run ended without learning anything: it must not look like a success (non-zero exit)."""


def with_task_metrics(task, stats: RoundStats) -> RoundStats:
    """The task's per-round extras derived from the losses (causal LM: perplexity of server and clients)."""
    for key, value in task.round_metrics(stats.global_loss, stats.fed_loss).items():
        setattr(stats, key, value)
    return stats
