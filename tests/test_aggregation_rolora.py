"""RoLoRA: B trains in odd rounds and A in even ones; every round's aggregate is exact, the untrained factor is
kept, an upload of the wrong factor is rejected; end to end through the ServerApp and ClientApp with DP-SGD and
a resume that keeps the round parity."""

from __future__ import annotations

import shutil

import pytest
import torch
from flwr.app import Message, MessageType

import fedlora.client
from client.app import make_client_app
from fedlora import naming
from fedlora.adapters import set_trainable
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.aggregation.exactness import exactness_error
from fedlora.checkpoint import load_checkpoint
from fedlora.config import FedLoraConfig
from fedlora.influence import bound_norms
from fedlora.robust import RobustConfig, robust_combine
from fedlora.wire import InvalidUpdate, decode_update, from_record, logical_bytes, record_shapes, to_record
from tests.conftest import FAST, run_local

SHAPES = {"l0": (24, 16), "l1": (12, 20)}
R, ALPHA = 4, 8.0
HEAD = "classifier.weight"


def _state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {HEAD: torch.randn(3, 8, generator=gen)}
    for layer, (d_out, d_in) in SHAPES.items():
        state[naming.key(layer, "A")] = torch.randn(R, d_in, generator=gen) / d_in**0.5
        state[naming.key(layer, "B")] = torch.randn(d_out, R, generator=gen)  # non-zero: as after a B round
    return state


def _updates(agg, state, server_round: int, gen: torch.Generator) -> list[ClientUpdate]:
    """Three clients that moved the round's factor (and the head) away from the global state."""
    expected = agg.expected_upload(state, R, server_round)
    return [ClientUpdate(k, {n: state[n] + torch.randn(s, generator=gen) for n, s in expected.items()}, 10 * k + 7, R)
            for k in range(3)]


def test_roles_alternate_b_first() -> None:
    agg = get_aggregator("rolora", AggregatorConfig(rank=R, alpha=ALPHA))
    assert (agg.mode, agg.linear, agg.frozen) == ("lora", True, ())
    assert [agg.trainable(t) for t in (1, 2, 3, 4, 7, 10)] == [("B",), ("A",), ("B",), ("A",), ("B",), ("A",)]
    assert [agg.round_uploads(t) for t in (1, 2)] == [("B",), ("A",)]
    with pytest.raises(ValueError, match="rounds start at 1"):
        agg.trainable(0)
    state = _state(torch.Generator().manual_seed(0))
    for t, role in ((1, "B"), (2, "A"), (5, "B"), (6, "A")):
        want = {HEAD: (3, 8)}
        for layer, (d_out, d_in) in SHAPES.items():
            want[naming.key(layer, role)] = (d_out, R) if role == "B" else (R, d_in)
        assert agg.expected_upload(state, R, t) == want


def test_every_round_is_exact_and_keeps_the_untrained_factor() -> None:
    """Five rounds on random clients: the new global s B A equals sum_k p_k s B_k A_k (each client's product
    with the frozen factor it shared), densely checked, and the frozen factor is bit-for-bit the old one."""
    gen = torch.Generator().manual_seed(1)
    agg = get_aggregator("rolora", AggregatorConfig(rank=R, alpha=ALPHA))
    s = agg.config.scaling(R)
    state = _state(gen)
    for t in range(1, 6):
        trained, kept = ("B", "A") if t % 2 else ("A", "B")
        updates = _updates(agg, state, t, gen)
        new = agg.aggregate(state, updates)
        assert set(new) == set(state) and all(v.dtype == torch.float32 for v in new.values())
        p = agg.weights(updates)
        for layer in SHAPES:
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            ideal = sum(pk * s * u.tensors.get(kb, state[kb]).double() @ u.tensors.get(ka, state[ka]).double()
                        for u, pk in zip(updates, p, strict=True))
            got = s * new[kb].double() @ new[ka].double()
            assert float((got - ideal).norm() / ideal.norm()) < 1e-5, (t, layer)
            assert torch.equal(new[naming.key(layer, kept)], state[naming.key(layer, kept)])
            assert not torch.equal(new[naming.key(layer, trained)], state[naming.key(layer, trained)])
        head = sum(pk * u.tensors[HEAD] for u, pk in zip(updates, p, strict=True))
        torch.testing.assert_close(new[HEAD], head)
        assert exactness_error(agg, state, new, updates) < 1e-5
        state = new


def test_wrong_factor_is_rejected_by_validation_and_by_aggregate() -> None:
    gen = torch.Generator().manual_seed(2)
    agg = get_aggregator("rolora", AggregatorConfig(rank=R, alpha=ALPHA))
    state = _state(gen)
    b_round = _updates(agg, state, 1, gen)
    a_round = _updates(agg, state, 2, gen)
    decode_update(to_record(b_round[0].tensors), agg.expected_upload(state, R, 3))  # a B round accepts B
    with pytest.raises(InvalidUpdate, match=r"missing tensors \['l0.lora_A"):
        decode_update(to_record(b_round[0].tensors), agg.expected_upload(state, R, 2))  # B in an A round
    with pytest.raises(InvalidUpdate, match=r"missing tensors \['l0.lora_B"):
        decode_update(to_record(a_round[0].tensors), agg.expected_upload(state, R, 1))  # A in a B round
    both = ClientUpdate(9, {**b_round[0].tensors, **a_round[0].tensors}, 5, R)
    for mixed in ([b_round[0], a_round[1]], [both]):
        with pytest.raises(ValueError, match="the same one factor"):
            agg.aggregate(state, mixed)


def test_influence_bounds_and_robust_rules_work_on_the_rounds_upload_set() -> None:
    """linear = True: the default bounds clip an A round's outlier exactly and a median over the A uploads
    aggregates with B kept."""
    gen = torch.Generator().manual_seed(3)
    agg = get_aggregator("rolora", AggregatorConfig(rank=R, alpha=ALPHA))
    state = _state(gen)
    updates = _updates(agg, state, 2, gen)
    outlier = updates[0]
    outlier.tensors = {k: state[k] + 5 * (v - state[k]) for k, v in outlier.tensors.items()}
    payloads = {u.client_id: agg.client_payload(state, R) for u in updates}
    kept, clipped, rejected, _ = bound_norms(agg, payloads, updates, RobustConfig())
    assert not rejected and len(clipped) == 1 and "node 0" in clipped[0] and len(kept) == 3
    reference = {k: state[k] for k in kept[0].tensors}
    result = robust_combine(reference, kept, agg.weights(kept), RobustConfig(rule="median"))
    new = agg.aggregate(state, result.updates)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        assert torch.equal(new[kb], state[kb]) and not torch.equal(new[ka], state[ka])


# -- end to end: ServerApp + ClientApp on the in-process grid -------------------------------------------------
NODES, DISAGREEING = 3, 1002
DP = {"method.name": "rolora", "privacy.mode": "sample", "privacy.noise-multiplier": 1.0, "train.local-steps": 2,
      "num-server-rounds": 2}


class DisagreeingApp:
    """The real ClientApp, but node DISAGREEING counts rounds one ahead in round 2: it trains and uploads B."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, msg: Message, context):
        config = msg.content["config"]
        rnd = int(config["server-round"])
        if context.node_id != DISAGREEING or msg.metadata.message_type != MessageType.TRAIN or rnd != 2:
            return self.app(msg, context)
        config["server-round"] = rnd + 1
        try:
            return self.app(msg, context)
        finally:
            config["server-round"] = rnd


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, request):
    """Two DP-SGD rounds of 3 nodes; records what each client's model trained (requires_grad after the round's
    set_trainable) and its factors after local training."""
    out = tmp_path_factory.mktemp("rolora")
    seen: list[tuple[set[str], dict[str, torch.Tensor]]] = []
    real = fedlora.client.set_trainable

    def spy(model, roles):
        real(model, roles)
        trained = {n.split(".lora_")[1][0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
        seen.append((trained, model))

    mp = pytest.MonkeyPatch()
    mp.setattr(fedlora.client, "set_trainable", spy)
    request.addfinalizer(mp.undo)
    app = DisagreeingApp(make_client_app({**FAST, "output-dir": str(out), **DP}))
    grid, rows, _ = run_local(out, num_nodes=NODES, client_app=app, **DP)
    mp.undo()
    return out, grid, rows, seen


def _by_round(grid, rnd: int) -> list[tuple[Message, Message]]:
    replies = {r.metadata.reply_to_message_id: r for r in grid.replies}
    return [(m, replies[m.metadata.message_id]) for m in grid.sent
            if m.metadata.message_type == MessageType.TRAIN and int(m.content["config"]["server-round"]) == rnd]


def test_clients_train_and_upload_the_rounds_factor(dp_run) -> None:
    out, grid, rows, seen = dp_run
    # the third client of round 2 believed it was round 3: it trained B
    assert [trained for trained, _ in seen] == [{"B"}] * NODES + [{"A"}, {"A"}, {"B"}]
    for rnd, role in ((1, "B"), (2, "A")):
        for i, (msg, reply) in enumerate(_by_round(grid, rnd)):
            sent = from_record(msg.content["arrays"])
            assert {s[1] for k in sent if (s := naming.split(k))} == {"A", "B"}  # both factors travel down
            up = {s[1] for k in record_shapes(reply.content["arrays"]) if (s := naming.split(k))}
            node = msg.metadata.dst_node_id
            assert up == ({"B"} if rnd == 2 and node == DISAGREEING else {role})
            frozen = "A" if role == "B" else "B"
            if not (rnd == 2 and node == DISAGREEING):  # local training left the shared factor as it came
                model = seen[(rnd - 1) * NODES + i][1]
                for k, v in sent.items():
                    if (s := naming.split(k)) and s[1] == frozen:
                        assert torch.equal(model.get_parameter(f"{s[0]}.lora_{frozen}.weight"), v), k


def test_exact_rounds_half_the_uplink_and_the_disagreeing_client_rejected(dp_run) -> None:
    out, grid, rows, _ = dp_run
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients_aggregated"] == NODES and not rows[1]["rejected"]
    assert rows[2]["clients_aggregated"] == NODES - 1 and len(rows[2]["rejected"]) == 1
    assert f"node {DISAGREEING}" in rows[2]["rejected"][0] and "missing tensors" in rows[2]["rejected"][0]
    for r in rows[1:]:
        assert r["exactness"] < 1e-5 and r["epsilon"] > 0  # exact under DP-SGD; the accountant spent budget
    cfg = FedLoraConfig.from_run_config({**FAST, **DP})
    payload = from_record(_by_round(grid, 1)[0][0].content["arrays"])
    fedit = get_aggregator("fedit", AggregatorConfig(rank=cfg.adapter.rank)).expected_upload(payload, 4)
    fedit_bytes = logical_bytes({k: torch.empty(s) for k, s in fedit.items()})
    head = logical_bytes({k: v for k, v in payload.items() if naming.is_extra(k)})
    assert rows[1]["bytes_up"] == NODES * (fedit_bytes + head) // 2  # B + head (square layers: |A| = |B|)
    assert rows[1]["bytes_up"] < 0.6 * NODES * fedit_bytes
    # round 2 counted the rejected upload too: what crossed the wire
    assert rows[2]["bytes_up"] == rows[1]["bytes_up"]


def test_resume_keeps_the_round_parity(dp_run, tmp_path) -> None:
    """Resumed from round 1's checkpoint, round 2 trains A: the schedule follows the absolute round (a restarted
    counter would train B again)."""
    out, grid, rows, _ = dp_run
    shutil.copytree(out, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "server_state-000002.safetensors").unlink()
    before, last, _ = load_checkpoint(tmp_path / "run")
    assert last == 1
    grid_b, rows_b, _ = run_local(tmp_path / "run", num_nodes=NODES, **{**DP, "resume": True})
    assert [r["round"] for r in rows_b] == [0, 1, 2]
    assert {int(m.content["config"]["server-round"]) for m in grid_b.sent} == {2}
    assert all({s[1] for k in record_shapes(r.content["arrays"]) if (s := naming.split(k))} == {"A"}
               for r in grid_b.replies)
    after, last, _ = load_checkpoint(tmp_path / "run")
    assert last == 2 and rows_b[2]["clients_aggregated"] == NODES and rows_b[2]["exactness"] < 1e-5
    for layer in naming.layers_of(after):
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        assert torch.equal(after[kb], before[kb]) and not torch.equal(after[ka], before[ka])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()  # the PEFT export


def test_set_trainable_rejects_a_factor_the_layer_lacks() -> None:
    from torch import nn

    from fedlora.adapters import LowRankLinear

    layer = LowRankLinear(nn.Linear(6, 5), rank=2, alpha=4.0, mode="lora")
    set_trainable(nn.Sequential(layer), ("A",))
    assert (layer.lora_A.weight.requires_grad, layer.lora_B.weight.requires_grad) == (True, False)
    with pytest.raises(ValueError, match="no such factor"):
        layer.set_trainable(("R",))
