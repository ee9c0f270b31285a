"""FLoRA's delta downlink (fedlora/downlink.py): a node that holds the merged factors of an earlier round is sent only
what was stacked since, a node that is new or lost its state the cumulative factors, and every client's base stays
exactly W0 + the sum of all rounds' ideal updates sum_k p_k s_k B_k A_k on both paths.

Unit tests drive the protocol (server bookkeeping, client append) with the real FLoRA aggregator on random updates;
federation tests run the real ServerApp and ClientApp on the in-process grid (tests/e2e/test_resume.py: resume)."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict, defaultdict

import pytest
import torch
from flwr.app import Message, MessageType

import fedlora.client
from client.app import MERGED_KEY, make_client_app
from fedlora import naming
from fedlora.adapters import adapter_layers
from fedlora.aggregation import AggregatorConfig, get_aggregator
from fedlora.checkpoint import checkpoint_path, read_checkpoint
from fedlora.config import FedLoraConfig
from fedlora.downlink import MergedDownlink, MergedStateLost, apply_merged
from fedlora.wire import MERGED_STATE_LOST, from_record, logical_bytes, record_shapes
from tests.conftest import FAST, run_local
from tests.lowrank_cases import ALPHA, F64, HEAD, SHAPES, ideal_update, random_updates

MA, MB = "MA", "MB"


def _agg():
    return get_aggregator("flora", AggregatorConfig(rank=8, alpha=ALPHA))


def _init_state():
    init = {HEAD: torch.zeros(3, 16)}
    for layer, (d_out, d_in) in SHAPES.items():
        init[naming.key(layer, "A")] = torch.randn(8, d_in)
        init[naming.key(layer, "B")] = torch.zeros(d_out, 8)
    return _agg().init_state(init)


def _width(t: dict, layer: str) -> int:
    return t[naming.key(layer, MA)].shape[0]


def _product(t: dict, layer: str) -> torch.Tensor:
    return t[naming.key(layer, MB)].to(F64) @ t[naming.key(layer, MA)].to(F64)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max |error| {err:.3g} > {tol:g} x {scale:.3g}"


def _merged_equal(held: dict, state: dict) -> bool:
    keys = [k for k in state if (s := naming.split(k)) and s[1] in (MA, MB)]
    return set(held) == set(keys) and all(torch.equal(held[k], state[k]) for k in keys)


# -- the protocol on random tensors ----------------------------------------------------------------------------
def test_generation_moves_only_when_a_layer_stops_extending():
    agg, dl = _agg(), MergedDownlink()
    gen = torch.Generator().manual_seed(0)
    s0 = _init_state()
    assert dl.sync(s0) == {layer: (0, 0) for layer in SHAPES}
    s1 = agg.aggregate(s0, random_updates(gen))  # +14 columns: an extension
    assert dl.sync(s1) == {layer: (0, 14) for layer in SHAPES}
    assert dl.sync(s1) == {layer: (0, 14) for layer in SHAPES}  # unchanged state, unchanged version
    s2 = agg.aggregate(s1, random_updates(gen, ranks=(8, 8, 8)))  # 38 > min(32, 80): enc.1.v recompressed
    v2 = dl.sync(s2)
    assert v2 == {"enc.0.q": (0, 38), "enc.1.v": (1, 32)}
    assert dl.sync(s1) == {"enc.0.q": (1, 14), "enc.1.v": (2, 14)}  # a rollback shortens both: new generations
    # Same shapes, other values (what a recompression at saturation gives): a new generation too.
    forged = OrderedDict(s1)
    forged[naming.key("enc.0.q", MA)] = s1[naming.key("enc.0.q", MA)] + 1.0
    assert dl.sync(forged)["enc.0.q"] == (2, 14)


def test_a_node_holding_round_t_minus_1_gets_only_round_ts_stack_and_a_new_node_the_cumulative_one():
    agg, dl = _agg(), MergedDownlink()
    gen = torch.Generator().manual_seed(1)
    s1 = agg.aggregate(_init_state(), random_updates(gen))  # round 1: ranks 2, 4, 8 -> width 14
    v1 = dl.sync(s1)
    dl.record(7, v1)  # node 7 answered a message that carried s1
    s2 = agg.aggregate(s1, random_updates(gen, ranks=(4, 2, 2)))  # round 2's stack: 8 more columns
    v2 = dl.sync(s2)
    payload = agg.client_payload(s2, 4)
    old, cfg_old = dl.cut(7, payload, v2)
    new, cfg_new = dl.cut(8, payload, v2)
    for layer, (d_out, d_in) in SHAPES.items():
        assert old[naming.key(layer, MA)].shape == (8, d_in) and old[naming.key(layer, MB)].shape == (d_out, 8)
        assert torch.equal(old[naming.key(layer, MA)], s2[naming.key(layer, MA)][14:])
        assert torch.equal(old[naming.key(layer, MB)], s2[naming.key(layer, MB)][:, 14:])
        assert new[naming.key(layer, MA)].shape == (22, d_in) and new[naming.key(layer, MB)].shape == (d_out, 22)
    head = 4 * s2[HEAD].numel()
    assert logical_bytes(old) == head + 4 * 8 * sum(d_out + d_in for d_out, d_in in SHAPES.values())
    assert logical_bytes(new) == head + 4 * 22 * sum(d_out + d_in for d_out, d_in in SHAPES.values())
    assert torch.equal(old[HEAD], s2[HEAD]) and torch.equal(new[HEAD], s2[HEAD])
    assert cfg_old == {"merged-layers": sorted(SHAPES), "merged-from": [14, 14], "merged-generation": [0, 0]}
    assert cfg_new == {"merged-layers": sorted(SHAPES), "merged-from": [0, 0], "merged-generation": [0, 0]}

    # Node 7 appends the delta to what it holds: bit for bit the server's factors.
    held = {k: v for k, v in s1.items() if naming.split(k)}
    full, now, now_gen = apply_merged(old, cfg_old, held, {layer: 0 for layer in SHAPES})
    assert _merged_equal(now, s2) and _merged_equal({k: v for k, v in full.items() if naming.split(k)}, s2)
    assert torch.equal(full[HEAD], s2[HEAD]) and now_gen == {layer: 0 for layer in SHAPES}
    # The new node takes the cumulative factors as they are, whatever it held before.
    full, now, _ = apply_merged(new, cfg_new, {}, {})
    assert _merged_equal(now, s2)


def test_a_delta_onto_factors_the_node_does_not_hold_raises():
    agg, dl = _agg(), MergedDownlink()
    gen = torch.Generator().manual_seed(2)
    s1 = agg.aggregate(_init_state(), random_updates(gen))
    dl.record(7, dl.sync(s1))
    s2 = agg.aggregate(s1, random_updates(gen, ranks=(1, 1, 2)))
    delta, cfg = dl.cut(7, agg.client_payload(s2, 4), dl.sync(s2))
    held = {k: v for k, v in s1.items() if naming.split(k)}
    with pytest.raises(MergedStateLost, match="holds no merged factors"):  # lost state
        apply_merged(delta, cfg, {}, {})
    with pytest.raises(MergedStateLost, match="generation 5"):  # factors of another generation
        apply_merged(delta, cfg, held, {layer: 5 for layer in SHAPES})
    short = {k: (v[:3] if naming.split(k)[1] == MA else v[:, :3]) for k, v in held.items()}
    with pytest.raises(MergedStateLost, match="width 3"):  # fewer columns than the delta extends
        apply_merged(delta, cfg, short, {layer: 0 for layer in SHAPES})
    # A longer copy of the same generation (a newer delta whose reply the server never saw) is cut back: exact.
    longer = {k: v for k, v in s2.items() if naming.split(k)}
    _, now, _ = apply_merged(delta, cfg, longer, {layer: 0 for layer in SHAPES})
    assert _merged_equal(now, s2)


def test_protocol_over_many_rounds_keeps_every_client_exact():
    """12 rounds, 5 clients, 3 sampled per round, federated evaluation on 2, one reply lost (the client applied the
    delta, the server never heard), one client losing its state, one rolled-back round, and recompressions of the
    two layers at different rounds (min(d) = 48 and 32): every payload a client builds is W0 + the sum of the ideal
    updates so far (1e-5), its held factors are the server's bit for bit, and deltas really were sent."""
    agg, dl = _agg(), MergedDownlink()
    gen, rng = torch.Generator().manual_seed(3), random.Random(3)
    state = _init_state()
    ideal = {layer: torch.zeros(d_out, d_in, dtype=F64) for layer, (d_out, d_in) in SHAPES.items()}
    held: dict[int, tuple[dict, dict]] = {c: ({}, {}) for c in range(5)}
    counts = defaultdict(int)

    def send(node: int, reply_lost: bool = False) -> bool:
        version = dl.sync(state)
        payload, cfg = dl.cut(node, agg.client_payload(state, 8), version)
        counts["bytes"] += logical_bytes(payload)
        counts["cumulative_bytes"] += logical_bytes(agg.client_payload(state, 8))
        counts["delta" if any(cfg["merged-from"]) else "cumulative"] += 1
        widths = {la: held[node][0][naming.key(la, MA)].shape[0] for la in SHAPES if held[node][0]}
        if any(0 < v < widths.get(la, 0) for la, v in zip(cfg["merged-layers"], cfg["merged-from"], strict=True)):
            counts["truncated"] += 1  # it holds a newer delta than the server knows (the lost reply)
        try:
            full, now, now_gen = apply_merged(payload, cfg, *held[node])
        except MergedStateLost:
            dl.forget(node)
            counts["lost"] += 1
            return False
        held[node] = (now, now_gen)
        for layer in SHAPES:
            _close(_product(full, layer), ideal[layer], what=f"node {node} {layer}")
        assert _merged_equal(now, state)
        if not reply_lost:
            dl.record(node, version)
        return True

    for rnd in range(1, 13):
        if rnd == 6:
            held[2] = ({}, {})  # client 2's SuperNode restarts: its context state is gone
        nodes = sorted(rng.sample(range(5), 3))
        ok = [c for c in nodes if send(c, reply_lost=(rnd == 4 and c == nodes[0]))]
        ranks = [rng.choice((1, 2)) for _ in ok]
        updates = random_updates(gen, ranks=tuple(ranks), num_examples=tuple(rng.randint(1, 20) for _ in ok))
        before, before_ideal = state, {k: v.clone() for k, v in ideal.items()}
        state = agg.aggregate(state, updates)
        for layer in SHAPES:
            ideal[layer] += ideal_update(updates, layer)
            assert _width(state, layer) <= min(SHAPES[layer])
        for c in sorted(rng.sample(range(5), 2)):  # federated evaluation of the new state
            send(c)
        if rnd == 8:  # the divergence guard rolls the round back (its evaluation messages carried it)
            state, ideal = before, before_ideal
    assert counts["lost"] == 1 and counts["delta"] >= 30 and counts["cumulative"] >= 10 and counts["truncated"] >= 1
    assert max(dl.generation.values()) >= 2 and dl.generation["enc.0.q"] != dl.generation["enc.1.v"]
    assert counts["bytes"] < 0.8 * counts["cumulative_bytes"]


# -- through the real ServerApp and ClientApp ----------------------------------------------------------------
class Recorder:
    """The real ClientApp; records for every message the merged factors the node holds afterwards, and lets one
    node lose its context state (a SuperNode restart) right before one round's train message."""

    def __init__(self, app, lose: tuple[int, int] | None = None) -> None:
        self.app, self.lose = app, lose
        self.current: tuple[int, int, str] | None = None  # (node, round, kind) of the message being handled
        self.held: list[tuple[int, int, str, dict]] = []

    def __call__(self, msg: Message, context) -> Message:
        rnd, kind = int(msg.content["config"]["server-round"]), msg.metadata.message_type
        if self.lose == (context.node_id, rnd) and kind == MessageType.TRAIN:
            for key in list(context.state.keys()):
                del context.state[key]
        self.current = (context.node_id, rnd, kind)
        reply = self.app(msg, context)
        self.current = None
        if not reply.has_error():
            self.held.append((context.node_id, rnd, kind, from_record(context.state[MERGED_KEY])))
        return reply


def _spy_base(monkeypatch, recorder: Recorder) -> list[tuple[int, int, str, dict[str, torch.Tensor]]]:
    """Every client model's effective base update W - W0 per layer, as load_adapter_state leaves it (training and
    evaluation both build their model through it)."""
    seen = []
    original = fedlora.client.load_adapter_state

    def spy(model, tensors):
        layers = adapter_layers(model)
        w0 = {p: layer.base.weight.detach().to(F64).clone() for p, layer in layers.items()}
        original(model, tensors)
        seen.append((*recorder.current, {p: layer.base.weight.detach().to(F64) - w0[p] for p, layer in layers.items()}))

    monkeypatch.setattr(fedlora.client, "load_adapter_state", spy)
    return seen


def _train_msgs(grid, rnd: int) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
            and int(m.content["config"]["server-round"]) == rnd]


def _reply(grid, msg: Message) -> Message:
    return next(r for r in grid.replies if r.metadata.reply_to_message_id == msg.metadata.message_id)


def _round_ideal(grid, rnd: int, alpha: float) -> dict[str, torch.Tensor]:
    """sum_k p_k s_k B_k A_k of round ``rnd``'s successful train replies (p_k = n_k / n, s_k = alpha / r_k)."""
    good = [r for r in map(lambda m: _reply(grid, m), _train_msgs(grid, rnd)) if not r.has_error()]
    total = sum(int(r.content["metrics"]["num-examples"]) for r in good)
    out: dict[str, torch.Tensor] = {}
    for r in good:
        t, m = from_record(r.content["arrays"]), r.content["metrics"]
        p, s = int(m["num-examples"]) / total, alpha / int(m["rank"])
        for layer in naming.layers_of(t):
            d = p * s * t[naming.key(layer, "B")].to(F64) @ t[naming.key(layer, "A")].to(F64)
            out[layer] = out[layer] + d if layer in out else d
    return out


def _merged_widths(msg: Message) -> dict[str, int]:
    return {naming.split(k)[0]: a[0] for k, a in record_shapes(msg.content["arrays"]).items()
            if naming.split(k) and naming.split(k)[1] == MA}


RUN_A = {"method.name": "flora", "adapter.rank": 8, "adapter.ranks": "4,6,8,8", "num-server-rounds": 5,
         "train.local-steps": 1, "fraction-train": 0.75, "fraction-evaluate": 0.5, "seed": 0, "keep-checkpoints": 10}
LOSES_A = (1000, 4)  # node 1000 trained in round 3 (it holds round 2's factors) and loses its state before round 4


def test_every_client_trains_and_evaluates_on_the_exact_base_on_both_paths(tmp_path, monkeypatch):
    """4 nodes, 3 sampled per round (seed 0: rounds 1-5 leave out 1003, 1001, 1003, 1002, 1000), 2 evaluating,
    ranks 4, 6, 8, 8: the width passes min(d) = 64 in round 4, so rounds 4 and 5 recompress. Every model a client
    builds (train and evaluate) has W = W0 + the sum of the ideal updates of the rounds before (1e-5), and the
    merged factors a client holds afterwards are the server's checkpointed state bit for bit."""
    app = Recorder(make_client_app({**FAST, "output-dir": str(tmp_path), **RUN_A}), lose=LOSES_A)
    bases = _spy_base(monkeypatch, app)
    grid, rows, _ = run_local(tmp_path, num_nodes=4, client_app=app, **RUN_A)
    alpha = FedLoraConfig.from_run_config({**FAST, **RUN_A}).adapter.alpha

    assert {r["round"]: sorted(m.metadata.dst_node_id for m in _train_msgs(grid, r["round"])) for r in rows[1:]} \
        == {1: [1000, 1001, 1002], 2: [1000, 1002, 1003], 3: [1000, 1001, 1002], 4: [1000, 1001, 1003],
            5: [1001, 1002, 1003]}
    for r in rows[1:]:  # the oracle below is the plain stacked sum: no bound may have touched an update
        assert not (r["rejected"] or r["clipped"] or r["weight_capped"] or r["rolled_back"]), r
    assert rows[4]["failed"] and f"node {LOSES_A[0]}: client error (code {MERGED_STATE_LOST})" in rows[4]["failed"][0]
    assert [len(r["failed"]) for r in rows[1:]] == [0, 0, 0, 1, 0]

    per_round = [_round_ideal(grid, rnd, alpha) for rnd in range(1, 6)]
    layers = sorted(per_round[0])
    cumulative = [{la: torch.zeros_like(per_round[0][la]) for la in layers}]  # after round 0, 1, ..., 5
    for d in per_round:
        cumulative.append({la: cumulative[-1][la] + d[la] for la in layers})
    states = {rnd: read_checkpoint(checkpoint_path(tmp_path, rnd))[0] for rnd in range(1, 6)}

    # Each train message of round t builds on the state after round t - 1; each evaluation on the state after t.
    def after(rnd: int, kind: str) -> int:
        return rnd - 1 if kind == MessageType.TRAIN else rnd

    assert len(bases) == len(app.held) == 14 + 10  # 3 x 5 train (one refused: lost state) + 2 x 5 evaluate
    for node, rnd, kind, delta in bases:
        for layer in layers:
            _close(delta[layer], cumulative[after(rnd, kind)][layer], what=f"node {node} round {rnd} {kind} {layer}")
    for node, rnd, kind, held in app.held:
        k = after(rnd, kind)
        if k == 0:
            assert all(t.numel() == 0 for t in held.values())
        else:
            assert _merged_equal(held, states[k]), (node, rnd, kind)

    # Both paths were taken: deltas (merged-from > 0), cumulative factors after round 1, and new generations.
    sent = [m for m in grid.sent if int(m.content["config"]["server-round"]) > 1]
    starts = [(m, list(m.content["config"]["merged-from"])) for m in sent]
    assert any(all(v > 0 for v in s) and min(_merged_widths(m).values()) > 0 for m, s in starts)
    assert any(not any(s) and min(_merged_widths(m).values()) > 0 for m, s in starts)
    assert max(max(m.content["config"]["merged-generation"]) for m in sent) >= 2
    assert all(_width(states[rnd], la) <= 64 for rnd in states for la in layers)
    assert _width(states[3], layers[0]) == 56 and _width(states[4], layers[0]) == 64  # 18 + 20 + 18, then > 64


RUN_B = {"method.name": "flora", "adapter.ranks": "2,3,4,4", "num-server-rounds": 4, "train.local-steps": 1,
         "fraction-train": 0.5, "seed": 10}
SAMPLED_B = {1: [1001, 1003], 2: [1000, 1001], 3: [1000, 1001], 4: [1001, 1002]}
RANK_B = {1000: 2, 1001: 3, 1002: 4, 1003: 4}
LOSES_B = (1001, 3)
HIDDEN, HEAD_BYTES = 64, 4 * (6 * 64 + 6)  # the tiny model; its 6-class head


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    out = tmp_path_factory.mktemp("flora-downlink")
    app = Recorder(make_client_app({**FAST, "output-dir": str(out), **RUN_B}), lose=LOSES_B)
    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Capture(logging.WARNING)
    logging.getLogger("fedlora").addHandler(handler)
    try:
        grid, rows, _ = run_local(out, num_nodes=4, client_app=app, **RUN_B)
    finally:
        logging.getLogger("fedlora").removeHandler(handler)
    return grid, rows, records


def test_each_node_is_sent_exactly_the_columns_it_lacks(run_b):
    """Widths from an independent oracle: a node whose last successful reply answered round s holds the width after
    round s - 1, so its round-t message carries the columns from there to the width after round t - 1; a node that
    never replied, or lost its state, gets everything. Bytes per round are what the messages carry."""
    grid, rows, _ = run_b
    assert {rnd: sorted(m.metadata.dst_node_id for m in _train_msgs(grid, rnd)) for rnd in SAMPLED_B} == SAMPLED_B
    layers = naming.layers_of(from_record(_train_msgs(grid, 1)[0].content["arrays"]))
    width = {0: 0}  # after each round: the ranks of the nodes whose update was aggregated
    holds: dict[int, int] = {}  # node -> width it holds (as far as the server knows)
    cumulative_bytes = 0
    for rnd in sorted(SAMPLED_B):
        for msg in _train_msgs(grid, rnd):
            node, cfg = msg.metadata.dst_node_id, msg.content["config"]
            start = holds.get(node, 0)
            assert list(cfg["merged-from"]) == [start] * len(layers), (rnd, node)
            assert list(cfg["merged-layers"]) == layers and list(cfg["merged-generation"]) == [0] * len(layers)
            for k, a in record_shapes(msg.content["arrays"]).items():
                if (s := naming.split(k)) is not None:
                    assert a == {"MA": (width[rnd - 1] - start, HIDDEN),
                                              "MB": (HIDDEN, width[rnd - 1] - start)}[s[1]], (rnd, node, k)
            assert logical_bytes(from_record(msg.content["arrays"])) == \
                HEAD_BYTES + 4 * 2 * HIDDEN * len(layers) * (width[rnd - 1] - start)
            cumulative_bytes += HEAD_BYTES + 4 * 2 * HIDDEN * len(layers) * width[rnd - 1]
        ok = [m.metadata.dst_node_id for m in _train_msgs(grid, rnd) if not _reply(grid, m).has_error()]
        for node in SAMPLED_B[rnd]:
            if node in ok:
                holds[node] = width[rnd - 1]
            elif (node, rnd) == LOSES_B:
                holds.pop(node, None)
        width[rnd] = width[rnd - 1] + sum(RANK_B[n] for n in ok)
        assert rows[rnd]["bytes_down"] == sum(logical_bytes(from_record(m.content["arrays"]))
                                              for m in _train_msgs(grid, rnd))
    # Round 3: node 1000 held round 2's starting point (width 7) and gets only round 2's stack (ranks 2 + 3).
    (m3,) = [m for m in _train_msgs(grid, 3) if m.metadata.dst_node_id == 1000]
    assert set(_merged_widths(m3).values()) == {RANK_B[1000] + RANK_B[1001]}
    assert sum(r["bytes_down"] for r in rows[1:]) < cumulative_bytes
    assert sum(r["wire_bytes_down"] for r in rows) == grid.bytes_down  # no evaluation messages in this run


def test_a_node_that_lost_its_state_refuses_the_delta_and_gets_the_cumulative_factors_next(run_b):
    grid, rows, warnings = run_b
    node, rnd = LOSES_B
    (lost,) = [m for m in _train_msgs(grid, rnd) if m.metadata.dst_node_id == node]
    assert all(v > 0 for v in lost.content["config"]["merged-from"])  # the server sent it a delta ...
    reply = _reply(grid, lost)
    assert reply.has_error() and reply.error.code == MERGED_STATE_LOST  # ... which it refused: no training
    assert "holds no merged factors" in reply.error.reason
    assert rows[rnd]["failed"] == [f"node {node}: client error (code {MERGED_STATE_LOST}): {reply.error.reason}"]
    assert rows[rnd]["clients_aggregated"] == 1
    assert any(f"node {node} failed" in w.getMessage() and str(MERGED_STATE_LOST) in w.getMessage() for w in warnings)
    (again,) = [m for m in _train_msgs(grid, rnd + 1) if m.metadata.dst_node_id == node]
    assert not any(again.content["config"]["merged-from"])  # cumulative
    widths = _merged_widths(again)
    assert set(widths.values()) == {sum(RANK_B[n] for n in (1001, 1003)) + sum(RANK_B[n] for n in (1000, 1001))
                                    + RANK_B[1000]}
    assert not _reply(grid, again).has_error() and not rows[rnd + 1]["failed"]
    assert rows[rnd + 1]["clients_aggregated"] == 2
