"""What actually travels in a round, per method: the real ServerApp and ClientApp exchange messages through
the in-process grid (each one round-tripped through Flower's wire encoding), and every message is inspected.

The expectations are written out per method here, not read from the aggregator registry, so a wrong registry
entry (say, FedSVD uploading A) fails; the registry is only cross-checked against them.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from flwr.app import Message, MessageType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlora import naming
from fedlora.aggregation import get_aggregator
from fedlora.wire import MANIFEST, record_shapes
from tests.conftest import HETEROGENEOUS, RANKS, run_local

NODES = 3
RANK = 4  # FAST's adapter.rank (the global rank)
HIDDEN = 64  # the tiny model: 2 layers, hidden 64; adapters on query and value
LAYERS = {f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")}
HEAD = {"classifier.weight": (6, HIDDEN), "classifier.bias": (6,)}  # 6 Austen novels

# method: (adapter roles sent down in round 1, sent down in round 2, sent up every round). The head goes both
# ways every round. Frozen factors (FFA's A; Fed-SB's A and B) go down once per node, in its first round.
EXPECTED: dict[str, tuple[set[str], set[str], set[str]]] = {
    "fedit": ({"A", "B"}, {"A", "B"}, {"A", "B"}),
    "ffa": ({"A", "B"}, {"B"}, {"B"}),
    "fedsvd": ({"A", "B"}, {"A", "B"}, {"B"}),  # A changes every round (re-factorised), only B is trained
    "fed_sb": ({"A", "B", "R"}, {"R"}, {"R"}),
    "flora": ({"MA", "MB"}, {"MA", "MB"}, {"A", "B"}),  # fresh A, B each round; the merged update's new columns go down
    "lora_fair": ({"A", "B"}, {"A", "B"}, {"A", "B"}),
    "flexlora": ({"A", "B"}, {"A", "B"}, {"A", "B"}),
    "hetlora": ({"A", "B"}, {"A", "B"}, {"A", "B"}),
    # FedIT's A, B plus the folded residual's new columns: (nodes - 1) x rank of them per round
    "fedex_lora": ({"A", "B", "MA", "MB"}, {"A", "B", "MA", "MB"}, {"A", "B"}),
}
STACKED = ("flora", "fedex_lora")


def wire_size(msg: Message) -> int:
    """Bytes Flower pushes for ``msg``: its deflated objects (counted here independently of fedlora.wire)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def payload_bytes(msg: Message) -> int:
    """Float32 tensor bytes of the message's arrays, numel * 4 (and every array must be float32)."""
    if "arrays" not in msg.content:
        return 0
    record = msg.content["arrays"]
    for name, arr in record.items():
        if name != MANIFEST:
            assert arr.dtype == "float32", f"{name} travels as {arr.dtype}"
    total = 0
    for shape in record_shapes(record).values():
        numel = 1
        for d in shape:
            numel *= d
        total += 4 * numel
    return total


def shapes(msg: Message) -> dict[str, tuple[int, ...]]:
    return dict(record_shapes(msg.content["arrays"]))


def check_tensors(got: dict[str, tuple[int, ...]], roles: set[str], rank: int, merged: int, where: str) -> None:
    """``got`` holds the head and, for every adapted layer, exactly ``roles`` with the shapes of ``rank``."""
    extras = {k: s for k, s in got.items() if naming.split(k) is None}
    assert extras == HEAD, f"{where}: non-adapter tensors {extras}"
    by_layer: dict[str, set[str]] = defaultdict(set)
    for k in got:
        if (s := naming.split(k)) is not None:
            by_layer[s[0]].add(s[1])
    assert set(by_layer) == LAYERS, f"{where}: adapted layers {sorted(by_layer)}"
    expected_shape = {"A": (rank, HIDDEN), "B": (HIDDEN, rank), "R": (rank, rank), "MA": (merged, HIDDEN),
                      "MB": (HIDDEN, merged)}
    for layer, present in by_layer.items():
        assert present == roles, f"{where}: {layer} carries {sorted(present)}, expected {sorted(roles)}"
        for role in present:
            assert got[naming.key(layer, role)] == expected_shape[role], f"{where}: {layer}.{role}"


@pytest.mark.parametrize("method", list(EXPECTED))
def test_round_messages_carry_only_what_the_method_needs(method, tmp_path):
    down1, down2, up = EXPECTED[method]
    agg = get_aggregator(method)  # cross-check only: the registry must agree with the table above
    assert set(agg.uploads) == up and set(agg.frozen) == down1 - down2 - {"MA", "MB"}

    hetero = method in HETEROGENEOUS
    overrides = {"method.name": method, "model.name": "tiny", "train.local-steps": 1, "fraction-evaluate": 1.0,
                 **({"adapter.ranks": RANKS} if hetero else {})}
    grid, rows, _ = run_local(tmp_path, num_nodes=NODES, **overrides)
    assert len(grid.sent) == len(grid.replies) == 2 * 2 * NODES  # 2 rounds x (train + evaluate) x nodes
    node_rank = {nid: (int(RANKS.split(",")[ctx.node_config["partition-id"]]) if hetero else RANK)
                 for nid, ctx in grid.contexts.items()}

    per_round: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for msg, reply in zip(grid.sent, grid.replies, strict=True):
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id and not reply.has_error()
        rnd, nid, kind = int(msg.content["config"]["server-round"]), msg.metadata.dst_node_id, msg.metadata.message_type
        where = f"{method} round {rnd} {kind} node {nid}"
        # FLoRA's merged factors grow by every client's rank per round, FedEx-LoRA's by all but one's
        stacked = sum(node_rank.values()) if method == "flora" else (NODES - 1) * RANK
        counts = per_round[rnd]
        if kind == MessageType.TRAIN:
            # The global rank; with per-client ranks, the node's own once the server has seen its first reply.
            payload_rank = int(msg.content["config"]["payload-rank"])
            assert payload_rank == (node_rank[nid] if hetero and rnd > 1 else 0), where
            sent_rank = payload_rank or RANK
            # FLoRA, FedEx-LoRA send only the merged columns a node lacks: every node evaluated the last factors,
            # so its train message carries none (FLoRA: the head only); round 1's are empty anyway.
            check_tensors(shapes(msg), down1 if rnd == 1 else down2, sent_rank, 0, where + " down")
            if method in STACKED:
                assert list(msg.content["config"]["merged-from"]) == [(rnd - 1) * stacked] * len(LAYERS), where
            check_tensors(shapes(reply), up, node_rank[nid], 0, where + " up")
            assert set(reply.content.keys()) == {"arrays", "metrics"}, where
            counts["bytes_down"] += payload_bytes(msg)
            counts["bytes_up"] += payload_bytes(reply)
            counts["wire_bytes_down"] += wire_size(msg)
            counts["wire_bytes_up"] += wire_size(reply)
        else:
            assert kind == MessageType.EVALUATE, where
            # Evaluation: the global adapter down (no frozen factor a node already holds), metrics only up.
            # FLoRA: the columns stacked in this round only, appended to those the node held since its train message.
            eval_roles = {"MA", "MB"} if method == "flora" else down2
            check_tensors(shapes(msg), eval_roles, RANK, stacked, where + " down")
            if method in STACKED:
                assert list(msg.content["config"]["merged-from"]) == [(rnd - 1) * stacked] * len(LAYERS), where
            assert set(reply.content.keys()) == {"metrics"}, f"{where}: evaluation sent back {list(reply.content)}"
            counts["eval_bytes_down"] += payload_bytes(msg)

    logged = {r["round"]: r for r in rows}
    for rnd in (1, 2):
        for key, value in per_round[rnd].items():
            assert logged[rnd][key] == value, f"{method} round {rnd}: metrics.jsonl {key}={logged[rnd][key]}, " \
                                              f"messages {value}"
        assert set(per_round[rnd]) == {"bytes_down", "bytes_up", "wire_bytes_down", "wire_bytes_up",
                                       "eval_bytes_down"}
    # Fed-SB's point: after round 1 only r x r matrices (and the head) move.
    if method == "fed_sb":
        head = 4 * (6 * HIDDEN + 6)
        assert logged[2]["bytes_up"] == logged[2]["bytes_down"] == NODES * (head + 4 * len(LAYERS) * RANK * RANK)
