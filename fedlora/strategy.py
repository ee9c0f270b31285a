"""The Flower strategy: a thin adapter between Flower's Message API and a registered aggregator.

Per round it sends each sampled node its method payload (frozen factors only once per node; of stacked merged
factors only what the node does not hold yet, fedlora.downlink), decodes and validates the replies (a bad update is
dropped with a logged reason; the round goes on with the rest), lets the aggregator compute the new global state,
checkpoints it atomically, and counts bytes exactly.

Faults: a node that raises, does not reply within ``round-timeout`` or vanishes is logged by name in the
round's ``failed`` list. A round with fewer valid updates than max(min-fit-clients, ceil(min-fit-fraction *
sampled)) leaves the global state unchanged; ``max-failed-rounds`` such rounds in a row end the run cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedlora import naming
from fedlora.aggregation import Aggregator, ClientUpdate
from fedlora.aggregation.exactness import exactness_error
from fedlora.checkpoint import save_checkpoint
from fedlora.client import round_seed
from fedlora.config import FedLoraConfig
from fedlora.downlink import MergedDownlink, Version
from fedlora.influence import bound_norms, bound_weights
from fedlora.privacy import get_privacy_mode
from fedlora.robust import robust_combine
from fedlora.server_opt import ServerOptimizer
from fedlora.wire import (
    BUDGET_EXHAUSTED,
    MERGED_STATE_LOST,
    InvalidUpdate,
    UpdateLimits,
    check_num_examples,
    check_rank,
    decode_update,
    logical_bytes,
    message_wire_bytes,
    record_logical_bytes,
    roundtrip_error,
    to_record,
)

log = logging.getLogger("fedlora")


@dataclass
class RoundStats:
    """What one round cost and achieved; one line of metrics.jsonl."""

    round: int
    clients_sampled: int = 0
    clients_aggregated: int = 0
    clients_required: int = 0  # max(min-fit-clients, ceil(min-fit-fraction * sampled)): fewer = failed round
    rejected: list[str] = field(default_factory=list)  # "node <id>: <why its update was invalid>"
    failed: list[str] = field(default_factory=list)  # "node <id>: <client error | no reply within ...>"
    bytes_down: int = 0
    bytes_up: int = 0
    wire_bytes_down: int = 0
    wire_bytes_up: int = 0
    eval_bytes_down: int = 0
    train_loss: float | None = None
    fed_loss: float | None = None
    fed_accuracy: float | None = None
    client_accuracy: dict[str, float] = field(default_factory=dict)  # node -> its federated-evaluation accuracy
    client_accuracy_mean: float | None = None  # their unweighted mean (FedSA-LoRA: the personalised accuracy)
    global_loss: float | None = None
    global_accuracy: float | None = None
    exhausted: list[str] = field(default_factory=list)
    client_epsilon: dict[str, float] = field(default_factory=dict)  # node -> epsilon spent (DP-SGD)
    epsilon: float | None = None  # max client epsilon (sample-level) or the federation's (client-level)
    update_norm_median: float | None = None  # client-level DP: median pre-clip update norm (to tune clip)
    clip: float | None = None  # client-level DP: the clipping norm used this round (moves when adaptive)
    exactness: float | None = None  # ||new global update - sum_k p_k s B_k A_k|| / ||sum_k p_k s B_k A_k||
    # Wire compression (wire.upload / wire.download): relative L2 rounding of what travelled, the largest of the
    # round's train payloads (measured by the server) and of the clients' uploads (as they reported it); None when
    # the direction is float32 (exact). The exactness above is of the aggregation of the decoded uploads.
    wire_error_down: float | None = None
    wire_error_up: float | None = None
    aggregate_seconds: float = 0.0  # server time in the aggregator alone (not decoding, checkpointing, eval)
    seconds: float = 0.0
    weight_capped: list[str] = field(default_factory=list)  # "node <id>: num-examples N counted as M (why)"
    clipped: list[str] = field(default_factory=list)  # "node <id>: delta norm ... > bound ...; clipped"
    delta_norm_median: float | None = None  # the round's median update size (what robust.norm-bound multiplies)
    robust: dict = field(default_factory=dict)  # robust.rule's facts (e.g. multi-Krum's selection)
    rolled_back: str | None = None  # the divergence guard undid this round: why, and the round's clients
    # Per client (node -> {examples_per_second, tokens_per_second, peak_memory_mb}) as each client reported it
    # (informational: never used to aggregate); the round's largest peak and median throughput summarise it.
    client_usage: dict[str, dict[str, float]] = field(default_factory=dict)
    peak_memory_mb: float | None = None  # CUDA: peak allocated in training; CPU: the client process's peak RSS
    tokens_per_second: float | None = None  # median over clients of non-padding input tokens per second of training
    global_perplexity: float | None = None  # causal-LM task: exp(global_loss), token-level
    fed_perplexity: float | None = None  # causal_lm: exp(fed_loss), fed_loss weighted by client sequences


def summarise_usage(stats: RoundStats) -> None:
    peaks = [u["peak_memory_mb"] for u in stats.client_usage.values() if "peak_memory_mb" in u]
    rates = sorted(u["tokens_per_second"] for u in stats.client_usage.values() if "tokens_per_second" in u)
    stats.peak_memory_mb = max(peaks) if peaks else None
    stats.tokens_per_second = rates[len(rates) // 2] if rates else None


class StopRun(RuntimeError):
    """The run cannot usefully go on: it ends cleanly, keeping (and exporting) the last good global state."""


class AllClientsExhausted(StopRun):
    """Every client has spent its privacy budget: the run ends here, cleanly."""


class TooManyFailedRounds(StopRun):
    """max-failed-rounds consecutive rounds got fewer valid updates than the minimum."""


@dataclass
class _Reply:
    update: ClientUpdate
    loss: float
    epsilon: float | None
    usage: dict[str, float] = field(default_factory=dict)
    wire_error: float | None = None  # the rounding its upload's codec added (client-reported, informational)


USAGE_KEYS = ("examples_per_second", "tokens_per_second", "peak_memory_mb")


def reported_usage(metrics: Any) -> dict[str, float]:
    """The usage figures a client reported (fedlora.accel.Usage), finite and >= 0 ones only."""
    out = {}
    for key in USAGE_KEYS:
        try:
            value = float(metrics[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value) and value >= 0:
            out[key] = value
    return out


def _reported_wire_error(metrics: Any) -> float | None:
    try:
        value = float(metrics["wire-error"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


class LoRAStrategy(Strategy):
    def __init__(
        self,
        cfg: FedLoraConfig,
        aggregator: Aggregator,
        state: OrderedDict[str, torch.Tensor],
        round_offset: int = 0,
        on_round_end: Callable[[RoundStats, OrderedDict[str, torch.Tensor]], None] | None = None,
        output_dir: str | None = None,
        resume_meta: dict | None = None,
        server_opt_tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.agg = aggregator
        self.state = state
        self.round_offset = round_offset
        self.on_round_end = on_round_end
        self.output_dir = output_dir
        self.delivered: set[int] = set()  # nodes that hold the method's frozen factors
        self.stats: dict[int, RoundStats] = {}
        self._t0 = time.perf_counter()
        self.exhausted: set[int] = set()  # nodes whose DP budget is spent: never sampled again
        self.node_rank: dict[int, int] = {}  # adapter rank each node reported (per-client-rank methods)
        self.num_nodes = 0
        self.limits = UpdateLimits(max_norm=cfg.run.max_update_norm, max_num_examples=cfg.run.max_num_examples)
        self.failed_rounds = 0  # consecutive rounds below the minimum of valid updates
        self.history: list[dict] = []  # metrics.jsonl rows so far (checkpointed, restored on resume)
        self._sent: dict[int, list[tuple[Message, int]]] = {}  # train messages of a round and their node
        self._sent_eval: dict[int, list[tuple[Message, int]]] = {}  # evaluate messages of a round and their node
        # Stacked merged factors (FLoRA, FedEx-LoRA): what each node holds, so it is sent only what it lacks; the
        # version each message of a round carried ((kind, round) -> node -> version) becomes the node's on a
        # successful reply.
        self.downlink = MergedDownlink() if aggregator.stacked else None
        self._offered: dict[tuple[str, int], dict[int, Version]] = {}
        self.privacy = get_privacy_mode(cfg)  # its server-side hook privatises each round's updates
        self.first_claim: dict[int, int] = {}  # num-examples each node reported first (robust.pin-examples)
        self._before: OrderedDict[str, torch.Tensor] | None = None  # the state before this round's aggregation
        self._round_nodes: list[int] = []
        m = cfg.method
        # method.server-opt: FedAvgM / FedAdam / FedYogi on the pseudo-gradient (fedlora.server_opt); its moments are
        # checkpointed with the state. _opt_before undoes a step the divergence guard rolls back.
        self.server_opt = None if m.server_opt == "none" else ServerOptimizer(
            aggregator, m.server_opt, m.server_lr, m.server_momentum, m.server_beta1, m.server_beta2, m.server_tau)
        self._opt_before: dict | None = None
        self._restore(resume_meta or {})
        if self.server_opt is not None:
            self.server_opt.load(server_opt_tensors or {}, (resume_meta or {}).get("server_opt", {}), self.state)
        # The last accepted server evaluation: the divergence guard compares the next one with it.
        last = next((r for r in reversed(self.history) if r.get("global_loss") is not None), None)
        self._good_metrics = {"loss": last["global_loss"], "accuracy": last["global_accuracy"]} if last else None

    # -- checkpointed state ----------------------------------------------------------------------------
    def _restore(self, meta: dict) -> None:
        """Per-node knowledge, counters, history and DP noise state from a checkpoint's metadata. The
        delivered set and what each node holds of the merged factors are not restored: a resumed run is a new Flower
        run whose nodes start with an empty context state, so frozen factors and the cumulative merged factors are
        sent to each node once again (clients re-cache them)."""
        self.exhausted = {int(n) for n in meta.get("exhausted", [])}
        self.node_rank = {int(n): int(r) for n, r in meta.get("node_rank", {}).items()}
        self.failed_rounds = int(meta.get("failed_rounds", 0))
        self.history = list(meta.get("history", []))
        self.privacy.load_state_dict(meta.get("privacy", {}))
        self.first_claim = {int(n): int(c) for n, c in meta.get("first_claim", {}).items()}

    def checkpoint_meta(self, server_round: int) -> dict:
        """Everything besides the tensors that the next round depends on, plus the history so far."""
        seed = self.cfg.run.seed
        meta = {
            "method": self.agg.name,
            "rng": {"seed": seed, "rule": "train sample: random.Random(seed*7919 + round); evaluate sample: "
                    "round + 100000; client: fedlora.client.round_seed(seed, round, partition)",
                    "next_train_sample_seed": seed * 7919 + server_round + 1,
                    "next_client_seed_partition_0": round_seed(seed, server_round + 1, 0)},
            "history": self.history,
            "node_rank": {str(n): r for n, r in sorted(self.node_rank.items())},
            "exhausted": sorted(self.exhausted),
            "failed_rounds": self.failed_rounds,
            "privacy": self.privacy.state_dict(),
            "first_claim": {str(n): c for n, c in sorted(self.first_claim.items())},
        }
        if self.server_opt is not None:
            meta["server_opt"] = self.server_opt.meta()
        return meta

    # -- helpers -------------------------------------------------------------------------------------
    def _round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _sample(self, grid: Grid, fraction: float, server_round: int) -> list[int]:
        """Seeded sampling (Flower's sample_nodes uses the global RNG): same seed, same clients."""
        min_nodes = self.cfg.run.min_nodes
        waited = 0.0
        while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
            if waited >= self.cfg.run.timeout:
                raise TimeoutError(f"only {len(nodes)} nodes connected after {waited:.0f} s; min-nodes={min_nodes}")
            if waited % 10 == 0:
                log.info("waiting for nodes: %d connected, min-nodes=%d", len(nodes), min_nodes)
            time.sleep(1.0)
            waited += 1.0
        self.num_nodes = len(nodes)
        k = max(1, round(fraction * len(nodes)))
        eligible = [n for n in nodes if n not in self.exhausted]
        if not eligible:
            raise AllClientsExhausted(f"all {len(nodes)} clients have spent their privacy budget")
        return sorted(random.Random(self.cfg.run.seed * 7919 + server_round).sample(eligible, min(k, len(eligible))))

    def _payload_for(self, node_id: int, kind: str) -> tuple[OrderedDict[str, torch.Tensor], int]:
        """What ``node_id`` receives and the rank it was cut for (0 = the full global state).

        Methods with per-client ranks cut the payload to the node's rank once the server has seen it (from
        the node's first reply); before that the node gets the global state and cuts it itself with the same
        pure ``client_payload``. Evaluation always uses the global adapter."""
        rank = self.node_rank.get(node_id, 0) if kind == MessageType.TRAIN and self.agg.heterogeneous_ranks else 0
        payload = self.agg.client_payload(self.state, rank or self.agg.config.rank)
        if node_id in self.delivered and self.agg.frozen:
            payload = OrderedDict((k, v) for k, v in payload.items()
                                  if not ((s := naming.split(k)) and s[1] in self.agg.frozen))
        return payload, rank

    def _messages(self, nodes: Iterable[int], kind: str, server_round: int, stats: RoundStats) -> list[Message]:
        msgs = []
        version = self.downlink.sync(self.state) if self.downlink else None
        offered = self._offered[(kind, server_round)] = {}
        for nid in nodes:
            payload, rank = self._payload_for(nid, kind)
            config = ConfigRecord({"server-round": self._round(server_round), "method": self.agg.name,
                                   "has-frozen": bool(self.agg.frozen) and nid not in self.delivered,
                                   "payload-rank": rank})
            if version is not None:
                payload, merged = self.downlink.cut(nid, payload, version)
                config.update(merged)
                offered[nid] = version
            codec = self.cfg.wire.download
            record = to_record(payload, codec)
            msg = Message(RecordDict({"arrays": record, "config": config}), dst_node_id=nid, message_type=kind)
            if kind == MessageType.TRAIN:
                stats.bytes_down += logical_bytes(payload, codec)
                stats.wire_bytes_down += message_wire_bytes(msg)
                if codec != "float32":
                    stats.wire_error_down = max(stats.wire_error_down or 0.0, roundtrip_error(payload, record))
            else:
                stats.eval_bytes_down += logical_bytes(payload, codec)
            msgs.append(msg)
        return msgs

    # -- Strategy API --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._t0 = time.perf_counter()
        stats = self.stats.setdefault(server_round, RoundStats(self._round(server_round)))
        nodes = self._sample(grid, self.cfg.run.fraction_train, self._round(server_round))
        stats.clients_sampled = len(nodes)
        run = self.cfg.run
        stats.clients_required = max(run.min_fit_clients, math.ceil(run.min_fit_fraction * len(nodes)))
        if stats.clients_required > len(nodes):
            raise StopRun(f"round {self._round(server_round)} needs {stats.clients_required} valid updates "
                          f"(min-fit-clients={run.min_fit_clients}, min-fit-fraction={run.min_fit_fraction:g}) but "
                          f"only {len(nodes)} clients can be sampled ({self.num_nodes} connected, "
                          f"{len(self.exhausted)} out of budget, fraction-train={run.fraction_train:g}); lower "
                          "min-fit-clients or connect more nodes (min-nodes)")
        msgs = self._messages(nodes, MessageType.TRAIN, server_round, stats)
        self._sent[server_round] = list(zip(msgs, nodes, strict=True))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats[server_round]
        rnd = self._round(server_round)
        sent = self._sent.pop(server_round, [])
        offered = self._offered.pop((MessageType.TRAIN, server_round), {})
        # Replies are matched to the message they answer: an error the SuperLink makes for a vanished node
        # comes from the SuperLink, not from that node.
        node_of = {m.metadata.message_id: nid for m, nid in sent}
        replied: set[int] = set()
        good: list[_Reply] = []
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            replied.add(node)
            if reply.has_error() and reply.error.code == BUDGET_EXHAUSTED:
                self.exhausted.add(node)
                stats.exhausted.append(f"node {node}: {reply.error.reason}")
                log.warning("round %d: node %d did not train: %s", rnd, node, reply.error.reason)
                continue
            if reply.has_error():
                if reply.error.code == MERGED_STATE_LOST and self.downlink is not None:
                    self.downlink.forget(node)  # it holds none of what the delta extended: cumulative next time
                self._fail(stats, node, f"client error (code {reply.error.code}): {reply.error.reason}")
                continue
            try:
                r = self._decode(reply, node, stats)
            except InvalidUpdate as e:
                # Resend the frozen factors next time: a failed node may have lost its cached copy (restart).
                self.delivered.discard(node)
                stats.rejected.append(f"node {node}: {e}")
                log.warning("round %d: rejected update of node %d: %s", rnd, node, e)
                continue
            good.append(r)
            self.node_rank[node] = r.update.rank
            if r.usage:
                stats.client_usage[str(node)] = r.usage
            if r.wire_error is not None:
                stats.wire_error_up = max(stats.wire_error_up or 0.0, r.wire_error)
            if r.epsilon is not None:
                stats.client_epsilon[str(node)] = r.epsilon
                log.info("round %d: node %d has spent epsilon %.3f", rnd, node, r.epsilon)
            if self.agg.frozen:
                self.delivered.add(node)
            if self.downlink is not None and node in offered:
                self.downlink.record(node, offered[node])
        for node in sorted({nid for _, nid in sent} - replied):
            self._fail(stats, node, f"no reply within round-timeout={self.cfg.run.round_timeout:g} s "
                                    "(node vanished, crashed or too slow)")
        updates = sorted((r.update for r in good), key=lambda u: u.client_id)  # a fixed order, whatever the replies'
        if stats.client_epsilon:
            stats.epsilon = max(stats.client_epsilon.values())
        summarise_usage(stats)
        updates = self._bound(updates, stats)
        stats.clients_aggregated = len(updates)
        if len(updates) < max(1, stats.clients_required):
            if not updates and self.num_nodes and len(self.exhausted) >= self.num_nodes:
                raise AllClientsExhausted(f"all {self.num_nodes} clients have spent their privacy budget")
            self.failed_rounds += 1
            log.warning("round %d failed: %d valid client update(s), the minimum is %d (min-fit-clients=%d, "
                        "min-fit-fraction=%g, %d sampled); the global state is unchanged (%d/%d consecutive "
                        "failed rounds, max-failed-rounds)", rnd, len(updates), max(1, stats.clients_required),
                        self.cfg.run.min_fit_clients, self.cfg.run.min_fit_fraction, stats.clients_sampled,
                        self.failed_rounds, self.cfg.run.max_failed_rounds)
            return None, None
        self.failed_rounds = 0
        loss = {r.update.client_id: r.loss for r in good}
        n = sum(u.num_examples for u in updates)  # the bounded weights: a liar's claim does not weigh its loss
        stats.train_loss = sum(loss[u.client_id] * u.num_examples for u in updates) / n
        updates, privacy_stats = self.privacy.privatise(self.state, updates, self.num_nodes, stats.clients_sampled)
        for key, value in privacy_stats.items():
            setattr(stats, key, value)
        self._before, self._round_nodes = self.state, [u.client_id for u in updates]  # before a rule merges them
        if self.cfg.robust.rule != "mean":
            result = robust_combine({k: self.state[k] for k in updates[0].tensors}, updates,
                                    self.agg.weights(updates), self.cfg.robust)
            updates, stats.robust = result.updates, result.info
        t_agg = time.perf_counter()
        stepped = updates
        if self.server_opt is not None:  # the optimised mean becomes the round's one update
            self._opt_before = self.server_opt.snapshot()
            stepped = self.server_opt.step(self.state, updates)
        old, self.state = self.state, self.agg.aggregate(self.state, stepped)
        stats.aggregate_seconds = time.perf_counter() - t_agg
        # The meter measures the method's aggregation of what arrived; a server optimiser moves away from it on
        # purpose, so its exactness is that of the plain aggregate.
        plain = self.state if stepped is updates else self.agg.aggregate(old, updates)
        # A personalised method has no one global model to compare with the clients' (each keeps its own B).
        stats.exactness = None if self.agg.personal else exactness_error(self.agg, old, plain, updates)
        return to_record(self.state), MetricRecord({"train_loss": stats.train_loss, "clients": len(updates)})

    def _bound(self, updates: list[ClientUpdate], stats: RoundStats) -> list[ClientUpdate]:
        """The default bounds on one client's influence (fedlora.influence): capped weights, and deltas above
        robust.norm-bound x the round's median clipped or rejected; every decision is logged per client. A
        privacy mode that clips each update itself (DP-FedAvg) keeps its own fixed clip: a median-relative bound
        would make one client's update depend on the others' and void the DP analysis."""
        rc = self.cfg.robust
        updates, stats.weight_capped = bound_weights(updates, self.first_claim, rc)
        if self.privacy.clips_updates:
            return updates
        by_rank = {r: self.agg.client_payload(self.state, r) for r in {u.rank for u in updates}}  # one per rank
        payloads = {u.client_id: by_rank[u.rank] for u in updates}
        updates, stats.clipped, rejected, stats.delta_norm_median = bound_norms(self.agg, payloads, updates, rc)
        for note in stats.weight_capped + stats.clipped + rejected:
            log.warning("round %d: %s", stats.round, note)
        stats.rejected += rejected
        return updates

    def _fail(self, stats: RoundStats, node: int, why: str) -> None:
        self.delivered.discard(node)  # it may have lost (or never got) the frozen factors: resend them
        stats.failed.append(f"node {node}: {why}")
        log.warning("round %d: node %d failed: %s", stats.round, node, why)

    def _decode(self, reply: Message, node: int, stats: RoundStats) -> _Reply:
        """The validated update of one reply; :class:`InvalidUpdate` says why it cannot be aggregated."""
        try:
            record = reply.content["arrays"]
            metrics = reply.content["metrics"]
            raw_n, raw_rank, loss = metrics["num-examples"], metrics["rank"], float(metrics["train_loss"])
            epsilon = float(metrics["epsilon"]) if "epsilon" in metrics else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidUpdate(
                f"malformed reply ({e!r}); expected 'arrays' and 'metrics' with num-examples, rank, train_loss"
            ) from None
        if isinstance(record, ArrayRecord):
            stats.bytes_up += record_logical_bytes(record)
            stats.wire_bytes_up += message_wire_bytes(reply)
        if not math.isfinite(loss):
            raise InvalidUpdate(f"train_loss={loss} is not finite")
        n = check_num_examples(raw_n, self.limits)
        rank = check_rank(raw_rank, self.cfg.adapter.allowed_ranks())
        try:
            self.agg.check_rank(rank)
        except ValueError as e:
            raise InvalidUpdate(str(e)) from None
        tensors = decode_update(record, self.agg.expected_upload(self.state, rank, stats.round), self.limits)
        return _Reply(ClientUpdate(node, tensors, n, rank), loss, epsilon, reported_usage(metrics),
                      _reported_wire_error(metrics))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if self.cfg.run.fraction_evaluate <= 0:
            return []
        stats = self.stats.setdefault(server_round, RoundStats(self._round(server_round)))
        nodes = self._sample(grid, self.cfg.run.fraction_evaluate, self._round(server_round) + 100_000)
        msgs = self._messages(nodes, MessageType.EVALUATE, server_round, stats)
        self._sent_eval[server_round] = list(zip(msgs, nodes, strict=True))
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        stats = self.stats[server_round]
        node_of = {m.metadata.message_id: nid for m, nid in self._sent_eval.pop(server_round, [])}
        offered = self._offered.pop((MessageType.EVALUATE, server_round), {})
        rows = []
        for r in replies:
            node = node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            if r.has_error():
                if r.error.code == MERGED_STATE_LOST and self.downlink is not None:
                    self.downlink.forget(node)
                log.warning("round %d: evaluation failed on node %d: %s", self._round(server_round), node,
                            r.error.reason)
                continue
            try:
                m = r.content["metrics"]
                row = (float(m["loss"]), float(m["accuracy"]), check_num_examples(m["num-examples"], self.limits))
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # InvalidUpdate is a ValueError
                log.warning("round %d: malformed evaluation reply of node %d ignored: %r", self._round(server_round),
                            node, e)
                continue
            rows.append(row)
            stats.client_accuracy[str(node)] = row[1]
            if self.downlink is not None and node in offered:
                self.downlink.record(node, offered[node])  # it evaluated on them: it holds them now
        n = sum(w for *_, w in rows)
        if not n:
            return None
        stats.fed_loss = sum(loss * w for loss, _, w in rows) / n
        stats.fed_accuracy = sum(a * w for _, a, w in rows) / n
        stats.client_accuracy_mean = sum(a for _, a, _ in rows) / len(rows)
        return MetricRecord({"loss": stats.fed_loss, "accuracy": stats.fed_accuracy})

    def finish_round(self, server_round: int, global_metrics: dict[str, float] | None) -> None:
        """Close a round after its server-side evaluation: report its stats, checkpoint the full server state
        (a failed round too: its row and the failure count must survive a restart), and end the run after
        max-failed-rounds consecutive failed rounds."""
        stats = self.stats.setdefault(server_round, RoundStats(self._round(server_round)))
        if global_metrics:
            stats.global_loss = global_metrics.get("loss")
            stats.global_accuracy = global_metrics.get("accuracy")
        stats.seconds = time.perf_counter() - self._t0
        self.history.append(dataclasses.asdict(stats))
        if self.on_round_end:
            self.on_round_end(stats, self.state)
        rnd = self._round(server_round)
        if self.output_dir and server_round > 0:
            tensors = self.state if self.server_opt is None else {**self.state, **self.server_opt.tensors()}
            save_checkpoint(self.output_dir, tensors, rnd, self.checkpoint_meta(rnd),
                            keep=self.cfg.run.keep_checkpoints)
        if self.failed_rounds >= self.cfg.run.max_failed_rounds:
            raise TooManyFailedRounds(
                f"{self.failed_rounds} consecutive rounds (up to round {rnd}) got fewer valid client updates than "
                f"the minimum (max-failed-rounds={self.cfg.run.max_failed_rounds}; see 'failed' and 'rejected' in "
                "metrics.jsonl)"
            )

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float | None = None,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's round loop with ``timeout`` = round-timeout (each phase's wait for replies) by default, and
        every round closed by :meth:`finish_round` after ``evaluate_fn`` (the server-side evaluation). A
        resumed run does not repeat round 0: its row is in the restored history."""

        def close_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and self.round_offset > 0:
                return None
            metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if metrics is not None:
                metrics = MetricRecord(self._guard(server_round, dict(metrics)))
            self.finish_round(server_round, dict(metrics) if metrics is not None else None)
            return metrics

        return super().start(grid, initial_arrays, num_rounds=num_rounds,
                             timeout=self.cfg.run.round_timeout if timeout is None else timeout,
                             train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=close_round)

    def _guard(self, server_round: int, metrics: dict) -> dict:
        """The divergence guard: a round whose aggregate sends the server loss to a non-finite value, or above
        robust.divergence-factor x the last accepted one, is rolled back to the state before it (the run goes on
        from there, its clients named). Returns the metrics of the state that stands."""
        factor, loss = self.cfg.robust.divergence_factor, float(metrics.get("loss", math.nan))
        good = self._good_metrics
        why = None
        if factor > 0 and self._before is not None and server_round > 0:
            if not math.isfinite(loss):
                why = f"server loss {loss} is not finite"
            elif good is not None and loss > factor * float(good["loss"]):
                why = (f"server loss {loss:.4g} > robust.divergence-factor={factor:g} x the last accepted "
                       f"{float(good['loss']):.4g}")
        if why is None:
            self._good_metrics, self._before = dict(metrics), None
            return metrics
        stats = self.stats.setdefault(server_round, RoundStats(self._round(server_round)))
        stats.rolled_back = (f"{why}; rolled back to the state before round {stats.round} (its clients: "
                             f"{self._round_nodes})")
        log.warning("round %d: %s", stats.round, stats.rolled_back)
        self.state, self._before = self._before, None
        if self.server_opt is not None and self._opt_before is not None:
            self.server_opt.restore(self._opt_before)
        return dict(good) if good else metrics

    def summary(self) -> None:
        log.info("LoRAStrategy(method=%s, mode=%s, uploads=%s, frozen=%s, rounds=%d)", self.agg.name,
                 self.agg.mode, self.agg.uploads, self.agg.frozen, self.cfg.run.num_server_rounds)
