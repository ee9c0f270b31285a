"""What one client does in a round, independent of Flower: build the adapted model from the received
payload, train on its own partition, and return only the tensors its method uploads."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import torch

from fedlora.adapters import adapter_state, load_adapter_state, reset_adapters
from fedlora.aggregation import Aggregator
from fedlora.config import FedLoraConfig
from fedlora.task import build_model, encoded_client_data, make_aggregator
from fedlora.train import evaluate, train_local


@dataclass
class ClientResult:
    tensors: OrderedDict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    privacy_state: dict | None = None  # the client's DP accountant after this round (sample-level DP)


class BudgetExhausted(RuntimeError):
    """The next round would take this client past its privacy budget: it declines to train."""


@lru_cache(maxsize=64)
def sample_noise_multiplier(cfg_key: tuple, num_examples: int) -> float:
    """sigma for DP-SGD: given, or derived once for the whole planned training (rounds x local steps at this
    client's Poisson rate q = batch / n) so that it spends exactly privacy.target-epsilon."""
    target, delta, sigma, accountant, batch_size, rounds, local_steps = cfg_key
    if sigma > 0:
        return sigma
    from fedlora.privacy.accountant import noise_for_budget

    return noise_for_budget(target, delta, min(1.0, batch_size / num_examples), rounds * local_steps, accountant)


def _dp_key(cfg: FedLoraConfig) -> tuple:
    p = cfg.privacy
    return (p.target_epsilon, p.delta, p.noise_multiplier, p.accountant, cfg.train.batch_size,
            cfg.run.num_server_rounds, cfg.train.local_steps)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible seed per (run seed, round, client) for batch order and fresh adapters."""
    return (seed * 1_000_003 + server_round * 9_973 + partition_id) % (2**31 - 1)


def fit(
    cfg: FedLoraConfig,
    payload: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
    aggregator: Aggregator | None = None,
    privacy_state: dict | None = None,
) -> ClientResult:
    """One round of local training. ``payload`` = everything the method sends this client (frozen factors
    included, from the client's cache if the server did not resend them)."""
    agg = aggregator or make_aggregator(cfg)
    rank = cfg.adapter.rank_for(partition_id)
    t0 = time.perf_counter()
    t = cfg.train
    n, enc, labels = encoded_client_data(cfg, "train", partition_id, num_partitions)
    dp = cfg.privacy.mode == "sample"
    if dp:
        from fedlora.privacy.accountant import ClientAccountant

        p = cfg.privacy
        q, sigma = min(1.0, t.batch_size / n), sample_noise_multiplier(_dp_key(cfg), n)
        accountant = ClientAccountant.from_state(privacy_state, p.accountant)
        spent = accountant.epsilon(p.delta)
        after = accountant.epsilon_after(p.delta, sigma, q, t.local_steps)
        if p.target_epsilon > 0 and after > p.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(f"privacy budget: epsilon spent {spent:.3f}, one more round would reach {after:.3f} "
                                  f"> privacy.target-epsilon={p.target_epsilon:g} (delta={p.delta:g})")
    model = build_model(cfg, agg.mode, rank)
    seed = round_seed(cfg.run.seed, server_round, partition_id)
    if agg.fresh_each_round:
        reset_adapters(model, torch.Generator().manual_seed(seed))
    load_adapter_state(model, payload)
    if dp:
        from fedlora.privacy.dpsgd import train_local_dp

        extra = {}
        if cfg.model.task == "causal_lm":
            from fedlora.causal_lm.train import batch_loss

            extra["loss_fn"] = batch_loss  # per-sequence mean over target tokens, then the batch mean
        metrics = train_local_dp(model, enc, labels, t.local_steps, t.batch_size, t.lr, t.weight_decay,
                                 p.clip, sigma, accountant, seed=seed, **extra)
        metrics.update(epsilon=accountant.epsilon(p.delta), noise_multiplier=sigma, sample_rate=q)
    elif cfg.model.task == "causal_lm":
        from fedlora.causal_lm.train import train_local_lm

        metrics = train_local_lm(model, enc, t.local_steps, t.batch_size, t.lr, t.weight_decay, t.max_grad_norm,
                                 seed=seed)
    else:
        metrics = train_local(model, enc, labels, t.local_steps, t.batch_size, t.lr, t.weight_decay,
                              t.max_grad_norm, seed=seed)
    upload = adapter_state(model, roles=agg.uploads, extras=True)
    metrics.update(rank=float(rank), fit_seconds=time.perf_counter() - t0)
    return ClientResult(upload, n, metrics, accountant.state_dict() if dp else None)


def evaluate_client(
    cfg: FedLoraConfig, payload: dict[str, torch.Tensor], partition_id: int, num_partitions: int,
    aggregator: Aggregator | None = None,
) -> ClientResult:
    """Federated evaluation: the global adapter on this client's share of the test split."""
    agg = aggregator or make_aggregator(cfg)
    # The global adapter has the global rank (FLoRA's payload holds only merged factors: any rank works).
    model = build_model(cfg, agg.mode, cfg.adapter.rank)
    load_adapter_state(model, payload)
    n, enc, labels = encoded_client_data(cfg, "test", partition_id, num_partitions)
    if cfg.model.task == "causal_lm":  # loss = token-level NLL, plus perplexity and next-token accuracy
        from fedlora.causal_lm.train import evaluate_lm

        return ClientResult(OrderedDict(), n, evaluate_lm(model, enc, cfg.train.eval_batch_size))
    return ClientResult(OrderedDict(), n, evaluate(model, enc, labels, cfg.train.eval_batch_size))
