"""The Flower strategy: a thin adapter between Flower's Message API and a registered aggregator.

Per round it sends each sampled node its method payload (frozen factors only once per node), decodes and
validates the replies (a bad update is dropped with a logged reason; the round goes on with the rest),
lets the aggregator compute the new global state, checkpoints it atomically, and counts bytes exactly.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora import naming
from fedlora.aggregation import Aggregator, ClientUpdate
from fedlora.aggregation.exactness import exactness_error
from fedlora.checkpoint import save_checkpoint
from fedlora.config import FedLoraConfig
from fedlora.privacy.client_level import ClientLevelDP
from fedlora.wire import (
    BUDGET_EXHAUSTED,
    InvalidUpdate,
    from_record,
    logical_bytes,
    message_wire_bytes,
    to_record,
    validate_update,
)

log = logging.getLogger("fedlora")


@dataclass
class RoundStats:
    """What one round cost and achieved; one line of metrics.jsonl."""

    round: int
    clients_sampled: int = 0
    clients_aggregated: int = 0
    rejected: list[str] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    wire_bytes_down: int = 0
    wire_bytes_up: int = 0
    eval_bytes_down: int = 0
    train_loss: float | None = None
    fed_loss: float | None = None
    fed_accuracy: float | None = None
    global_loss: float | None = None
    global_accuracy: float | None = None
    exhausted: list[str] = field(default_factory=list)
    client_epsilon: dict[str, float] = field(default_factory=dict)  # node -> epsilon spent (DP-SGD)
    epsilon: float | None = None  # max client epsilon (sample-level) or the federation's (client-level)
    update_norm_median: float | None = None  # client-level DP: median pre-clip update norm (to tune clip)
    clip: float | None = None  # client-level DP: the clipping norm used this round (moves when adaptive)
    exactness: float | None = None  # ||new global update - sum_k p_k s B_k A_k|| / ||sum_k p_k s B_k A_k||
    aggregate_seconds: float = 0.0  # server time in the aggregator alone (not decoding, checkpointing, eval)
    seconds: float = 0.0


class AllClientsExhausted(RuntimeError):
    """Every client has spent its privacy budget: the run ends here, cleanly."""


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
        self.client_dp = (ClientLevelDP(cfg, (resume_meta or {}).get("client_dp"))
                          if cfg.privacy.mode == "client" else None)

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
        for nid in nodes:
            payload, rank = self._payload_for(nid, kind)
            config = ConfigRecord({"server-round": self._round(server_round), "method": self.agg.name,
                                   "has-frozen": bool(self.agg.frozen) and nid not in self.delivered,
                                   "payload-rank": rank})
            msg = Message(RecordDict({"arrays": to_record(payload), "config": config}), dst_node_id=nid,
                          message_type=kind)
            if kind == MessageType.TRAIN:
                stats.bytes_down += logical_bytes(payload)
                stats.wire_bytes_down += message_wire_bytes(msg)
            else:
                stats.eval_bytes_down += logical_bytes(payload)
            msgs.append(msg)
        return msgs

    # -- Strategy API --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._t0 = time.perf_counter()
        stats = self.stats.setdefault(server_round, RoundStats(self._round(server_round)))
        nodes = self._sample(grid, self.cfg.run.fraction_train, self._round(server_round))
        stats.clients_sampled = len(nodes)
        return self._messages(nodes, MessageType.TRAIN, server_round, stats)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats[server_round]
        updates: list[ClientUpdate] = []
        losses: list[tuple[float, int]] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() and reply.error.code == BUDGET_EXHAUSTED:
                self.exhausted.add(node)
                stats.exhausted.append(f"node {node}: {reply.error.reason}")
                log.warning("round %d: node %d did not train: %s", self._round(server_round), node, reply.error.reason)
                continue
            try:
                update = self._decode(reply, stats)
            except InvalidUpdate as e:
                # Resend the frozen factors next time: a failed node may have lost its cached copy (restart).
                self.delivered.discard(node)
                stats.rejected.append(f"node {node}: {e}")
                log.warning("round %d: rejected update of node %d: %s", self._round(server_round), node, e)
                continue
            updates.append(update)
            self.node_rank[node] = update.rank
            m = reply.content["metrics"]
            losses.append((float(m["train_loss"]), update.num_examples))
            if "epsilon" in m:
                stats.client_epsilon[str(node)] = float(m["epsilon"])
                log.info("round %d: node %d has spent epsilon %.3f", self._round(server_round), node, m["epsilon"])
            if self.agg.frozen:
                self.delivered.add(node)
        stats.clients_aggregated = len(updates)
        if stats.client_epsilon:
            stats.epsilon = max(stats.client_epsilon.values())
        if not updates:
            if self.num_nodes and len(self.exhausted) >= self.num_nodes:
                raise AllClientsExhausted(f"all {self.num_nodes} clients have spent their privacy budget")
            log.warning("round %d: no valid client update; the global state is unchanged", self._round(server_round))
            return None, None
        updates.sort(key=lambda u: u.client_id)  # replies arrive in any order; aggregate in a fixed one
        if self.client_dp is not None:
            updates = self.client_dp.privatise(self.state, updates, self.num_nodes, stats)
        t_agg = time.perf_counter()
        old, self.state = self.state, self.agg.aggregate(self.state, updates)
        stats.aggregate_seconds = time.perf_counter() - t_agg
        stats.exactness = exactness_error(self.agg, old, self.state, updates)
        n = sum(w for _, w in losses)
        stats.train_loss = sum(v * w for v, w in losses) / n
        if self.output_dir:
            meta = {"method": self.agg.name}
            if self.client_dp is not None:
                meta["client_dp"] = self.client_dp.state_dict()
            save_checkpoint(self.output_dir, self.state, self._round(server_round), meta)
        return to_record(self.state), MetricRecord({"train_loss": stats.train_loss, "clients": len(updates)})

    def _decode(self, reply: Message, stats: RoundStats) -> ClientUpdate:
        if reply.has_error():
            raise InvalidUpdate(f"client error: {reply.error.reason}")
        try:
            tensors = from_record(reply.content["arrays"])
            metrics = reply.content["metrics"]
            n, rank = int(metrics["num-examples"]), int(metrics["rank"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidUpdate(
                f"malformed reply ({e!r}); expected 'arrays' and 'metrics' with num-examples, rank"
            ) from None
        stats.bytes_up += logical_bytes(tensors)
        stats.wire_bytes_up += message_wire_bytes(reply)
        if n <= 0:
            raise InvalidUpdate(f"num-examples={n} must be > 0")
        try:
            self.agg.check_rank(rank)
        except ValueError as e:
            raise InvalidUpdate(str(e)) from None
        validate_update(tensors, self.agg.expected_upload(self.state, rank))
        return ClientUpdate(reply.metadata.src_node_id, tensors, n, rank)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if self.cfg.run.fraction_evaluate <= 0:
            return []
        stats = self.stats.setdefault(server_round, RoundStats(self._round(server_round)))
        nodes = self._sample(grid, self.cfg.run.fraction_evaluate, self._round(server_round) + 100_000)
        return self._messages(nodes, MessageType.EVALUATE, server_round, stats)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        stats = self.stats[server_round]
        rows = []
        for r in replies:
            if r.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", self._round(server_round),
                            r.metadata.src_node_id, r.error.reason)
                continue
            m = r.content["metrics"]
            rows.append((float(m["loss"]), float(m["accuracy"]), int(m["num-examples"])))
        n = sum(w for *_, w in rows)
        if not n:
            return None
        stats.fed_loss = sum(loss * w for loss, _, w in rows) / n
        stats.fed_accuracy = sum(a * w for _, a, w in rows) / n
        return MetricRecord({"loss": stats.fed_loss, "accuracy": stats.fed_accuracy})

    def finish_round(self, server_round: int, global_metrics: dict[str, float] | None) -> None:
        """Called after the server-side evaluation of a round: close its stats and report them."""
        stats = self.stats.setdefault(server_round, RoundStats(self._round(server_round)))
        if global_metrics:
            stats.global_loss = global_metrics.get("loss")
            stats.global_accuracy = global_metrics.get("accuracy")
        stats.seconds = time.perf_counter() - self._t0
        if self.on_round_end:
            self.on_round_end(stats, self.state)

    def summary(self) -> None:
        log.info("LoRAStrategy(method=%s, mode=%s, uploads=%s, frozen=%s, rounds=%d)", self.agg.name,
                 self.agg.mode, self.agg.uploads, self.agg.frozen, self.cfg.run.num_server_rounds)
