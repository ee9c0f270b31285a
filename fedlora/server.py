"""The server side of a run, independent of how Flower was started: initial state (or resume), the
strategy, global evaluation each round, reports and the final adapter."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedlora import naming
from fedlora.adapters import adapter_layers, adapter_state, load_adapter_state
from fedlora.aggregation import Aggregator
from fedlora.aggregation.fed_sb import sb_factors_from_gradient
from fedlora.checkpoint import has_checkpoint, load_checkpoint
from fedlora.config import FedLoraConfig
from fedlora.report import Reporter
from fedlora.strategy import LoRAStrategy, RoundStats, StopRun
from fedlora.task import build_model, cached_dataset, encode_dataset, make_aggregator, server_dataset
from fedlora.train import evaluate, take_batch
from fedlora.wire import to_record

log = logging.getLogger("fedlora")


def output_dir(cfg: FedLoraConfig) -> Path:
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir).expanduser().resolve()
    return Path("runs", f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def initial_state(cfg: FedLoraConfig, agg: Aggregator) -> OrderedDict[str, torch.Tensor]:
    """The round-0 global state: a freshly injected model's adapters (seeded), shaped by the method."""
    model = build_model(cfg, agg.mode, cfg.adapter.rank)
    state = agg.init_state(adapter_state(model))
    if agg.name == "fed_sb" and cfg.method.sb_init == "gradient":
        state.update(lora_sb_gradient_init(cfg, model))
    return state


def lora_sb_gradient_init(cfg: FedLoraConfig, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA-SB's init: B, R, A from a rank-r SVD of one approximate full fine-tuning step, -lr * sign(G).

    G is the gradient of the base weights on ``method.sb-init-examples`` training examples. In a real
    deployment this is data the server may hold (a public or proxy sample); the paper's code uses the
    pooled training set. The factors are then shipped once to every client like any frozen tensor.
    """
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.base.weight.requires_grad_(True)
    ds = cached_dataset(cfg.data.source, "train")
    n = min(cfg.method.sb_init_examples, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.run.seed + 17))[:n]
    enc, labels = encode_dataset(cfg, ds.subset(sorted(idx.tolist())))
    model.train()
    for start in range(0, n, cfg.train.batch_size):
        b = torch.arange(start, min(start + cfg.train.batch_size, n))
        loss = torch.nn.functional.cross_entropy(model(**take_batch(enc, b)).logits, labels[b], reduction="sum") / n
        loss.backward()
    out: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        b_, r_, a_ = sb_factors_from_gradient(layer.base.weight.grad, cfg.adapter.rank, cfg.train.lr, layer.scaling)
        out[naming.key(path, "B")], out[naming.key(path, "R")], out[naming.key(path, "A")] = b_, r_, a_
        layer.base.weight.requires_grad_(False)
        layer.base.weight.grad = None
    return out


def global_evaluator(cfg: FedLoraConfig, agg: Aggregator):
    """Server-side evaluation of the global adapter on the held-out split (encoded once)."""
    if cfg.model.task == "causal_lm":  # token-level NLL, perplexity, next-token accuracy on every group's held-out
        from fedlora.causal_lm import task as lm_task
        from fedlora.causal_lm.train import evaluate_lm

        lm_enc = lm_task.encode(cfg, lm_task.server_dataset(cfg))

        def score(model: torch.nn.Module) -> dict[str, float]:
            return evaluate_lm(model, lm_enc, cfg.train.eval_batch_size)
    else:
        enc, labels = encode_dataset(cfg, server_dataset(cfg))

        def score(model: torch.nn.Module) -> dict[str, float]:
            return evaluate(model, enc, labels, cfg.train.eval_batch_size)

    def evaluate_state(state: dict[str, torch.Tensor]) -> dict[str, float]:
        model = build_model(cfg, agg.mode, cfg.adapter.rank)
        load_adapter_state(model, agg.client_payload(state, cfg.adapter.rank))
        return score(model)

    return evaluate_state


def run_server(grid: Grid, cfg: FedLoraConfig, printer=print) -> dict:
    """Run the whole federation on ``grid``; returns the run summary."""
    torch.manual_seed(cfg.run.seed)
    agg = make_aggregator(cfg)
    out = output_dir(cfg)
    offset, meta = 0, {}
    resuming = cfg.run.resume and has_checkpoint(out)
    if resuming:
        state, offset, meta = load_checkpoint(out)  # the newest intact one (a torn file is skipped)
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
    strategy = LoRAStrategy(cfg, agg, state, round_offset=offset, output_dir=str(out), resume_meta=meta,
                            on_round_end=lambda stats, _state: reporter.round(with_perplexity(cfg, stats)))

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
    if cfg.model.task == "causal_lm":
        from fedlora.causal_lm.report import write_generations

        printer(f"generations: {write_generations(cfg, agg, strategy.state, out)}")
    return summary


def with_perplexity(cfg: FedLoraConfig, stats: RoundStats) -> RoundStats:
    """Causal LM: perplexity = exp(mean token NLL) of the server's and the clients' held-out text."""
    if cfg.model.task == "causal_lm":
        from fedlora.causal_lm.report import perplexity

        stats.global_perplexity, stats.fed_perplexity = perplexity(stats.global_loss), perplexity(stats.fed_loss)
    return stats
