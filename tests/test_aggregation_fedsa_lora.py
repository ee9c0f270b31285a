"""FedSA-LoRA: the server averages A (and the head) only; each client's B stays on that client, round after round,
in its context state and in its state file; federated evaluation is personalised and reported per client."""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import Context, RecordDict

import client.app as client_app
from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.config import FedLoraConfig
from tests.conftest import run_local

LAYERS = ("m.0.q", "m.0.v")
R = 3


def _state() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = OrderedDict()
    for layer in LAYERS:
        out[naming.key(layer, "A")] = torch.randn(R, 10, generator=gen)
        out[naming.key(layer, "B")] = torch.zeros(12, R)
    out["classifier.weight"] = torch.randn(4, 12, generator=gen)
    return out


def test_a_is_averaged_b_never_travels_and_the_server_keeps_the_initial_b():
    agg = get_aggregator("fedsa_lora", AggregatorConfig(rank=R))
    state = _state()
    expected = agg.expected_upload(state, R)
    assert sorted(expected) == sorted([naming.key(layer, "A") for layer in LAYERS] + ["classifier.weight"])
    assert not any(naming.split(k) and naming.split(k)[1] == "B" for k in agg.client_payload(state, R))
    gen = torch.Generator().manual_seed(1)
    ups = [ClientUpdate(i, {k: torch.randn(s, generator=gen) for k, s in expected.items()}, 10 * (i + 1), R)
           for i in range(3)]
    new = agg.aggregate(state, ups)
    p = [u.num_examples / 60 for u in ups]
    for k in expected:
        torch.testing.assert_close(new[k], sum(pk * u.tensors[k] for pk, u in zip(p, ups, strict=True)))
    for layer in LAYERS:
        assert torch.equal(new[naming.key(layer, "B")], state[naming.key(layer, "B")])


def test_each_client_keeps_and_continues_its_own_b(tmp_path, monkeypatch):
    seen: dict[tuple[int, int], dict] = {}  # (round, partition) -> (B it started from, B it kept)
    real_fit = client_app.fit

    def spy(cfg, payload, pid, n, server_round, agg, privacy_state):
        res = real_fit(cfg, payload, pid, n, server_round, agg, privacy_state)
        start = {k: v.clone() for k, v in payload.items() if naming.split(k) and naming.split(k)[1] == "B"}
        seen[(server_round, pid)] = {"start": start, "kept": res.personal}
        assert not any(naming.split(k) and naming.split(k)[1] == "B" for k in res.tensors)  # never uploaded
        return res

    monkeypatch.setattr(client_app, "fit", spy)
    state_dir = tmp_path / "personal"
    _, rows, _ = run_local(tmp_path / "run", num_nodes=2, **{"method.name": "fedsa_lora", "fraction-evaluate": 1.0,
                                                             "method.fedsa-state-dir": str(state_dir)})
    assert seen[(1, 0)]["start"] == {}  # round 1: no B of its own yet (the model's B = 0)
    for pid in (0, 1):  # round 2 starts from exactly the B the same client kept after round 1
        kept, start = seen[(1, pid)]["kept"], seen[(2, pid)]["start"]
        assert list(start) == list(kept) and all(torch.equal(start[k], kept[k]) for k in kept)
    b0, b1 = seen[(2, 0)]["kept"], seen[(2, 1)]["kept"]
    assert any(not torch.allclose(b0[k], b1[k]) for k in b0)  # personal: the clients' B differ
    for row in rows[1:]:
        assert row["exactness"] is None
        assert len(row["client_accuracy"]) == 2
        assert row["client_accuracy_mean"] == sum(row["client_accuracy"].values()) / 2
    # the state file holds each client's last B, for a SuperNode that restarts
    cfg = FedLoraConfig.from_run_config({"method.name": "fedsa_lora", "method.fedsa-state-dir": str(state_dir)})
    agg = get_aggregator("fedsa_lora")
    fresh = Context(run_id=2, node_id=5, node_config={}, state=RecordDict(), run_config={})
    restored = client_app.with_personal({}, agg, cfg, fresh, 1)
    assert list(restored) == list(b1) and all(torch.equal(restored[k], b1[k]) for k in b1)
