"""FedEx-LoRA: averaged A and B plus the residual folded into the base as thin factors; over rounds the global model
W0 + MB @ MA + s B_bar A_bar is the average of the clients' models, exactly.

The oracle is the paper's dense bookkeeping in float64: each round, the client models D + s B_k A_k on the dense
residual D so far are averaged (G = D + sum_k p_k s B_k A_k), and D <- G - s B_bar A_bar. Clients start every
round from the global A, B (not fresh adapters), as FedEx-LoRA's clients do."""

from __future__ import annotations

import pytest
import torch
from flwr.app import MessageType
from torch import nn
from torch.overrides import TorchFunctionMode

from fedlora import naming
from fedlora.adapters import adapter_layers, inject_adapters, load_adapter_state
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.aggregation.exactness import exactness_error
from fedlora.checkpoint import checkpoint_path, read_checkpoint
from fedlora.config import FedLoraConfig
from fedlora.downlink import MergedDownlink, apply_merged
from fedlora.wire import from_record, logical_bytes
from tests.conftest import run_local

F64 = torch.float64
R, ALPHA = 4, 6.0  # s = 1.5: a dropped or doubled scaling shows
S = ALPHA / R
HEAD = "classifier.weight"
SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}  # min(d) 48 and 32: recompression within a few rounds


def _agg(weighting: str = "num_examples"):
    return get_aggregator("fedex_lora", AggregatorConfig(rank=R, alpha=ALPHA, weighting=weighting))


def _init(shapes=SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    init = {HEAD: torch.zeros(3, 16)}
    for layer, (d_out, d_in) in shapes.items():
        init[naming.key(layer, "A")] = torch.randn(R, d_in, generator=gen) / d_in**0.5
        init[naming.key(layer, "B")] = torch.zeros(d_out, R)
    return init


def _train(state, gen, num_examples, shapes=SHAPES) -> list[ClientUpdate]:
    """Clients that continue from the global A and B (B moves off zero: the residual is not trivially zero)."""
    out = []
    for cid, n in enumerate(num_examples):
        t = {HEAD: state[HEAD] + torch.randn(3, 16, generator=gen)}
        for layer in shapes:
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            t[ka] = state[ka] + 0.3 * torch.randn(state[ka].shape, generator=gen)
            t[kb] = state[kb] + 0.2 * torch.randn(state[kb].shape, generator=gen)
        out.append(ClientUpdate(client_id=10 + cid, tensors=t, num_examples=n, rank=R))
    return out


class Oracle:
    """The paper's dense residual per layer, in float64, and the averaged client models."""

    def __init__(self, shapes=SHAPES) -> None:
        self.residual = {layer: torch.zeros(d_out, d_in, dtype=F64) for layer, (d_out, d_in) in shapes.items()}
        self.model: dict[str, torch.Tensor] = {}

    def round(self, updates: list[ClientUpdate], weights: list[float]) -> None:
        for layer, d in self.residual.items():
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            a = [u.tensors[ka].to(F64) for u in updates]
            b = [u.tensors[kb].to(F64) for u in updates]
            self.model[layer] = d + sum(p * S * bk @ ak for p, ak, bk in zip(weights, a, b, strict=True))
            a_bar = sum(p * ak for p, ak in zip(weights, a, strict=True))
            b_bar = sum(p * bk for p, bk in zip(weights, b, strict=True))
            self.residual[layer] = self.model[layer] - S * b_bar @ a_bar


def _residual(state, layer: str) -> torch.Tensor:
    return state[naming.key(layer, "MB")].to(F64) @ state[naming.key(layer, "MA")].to(F64)


def _model(state, layer: str) -> torch.Tensor:
    """The global model's update over W0: folded residual + s B A."""
    b, a = state[naming.key(layer, "B")].to(F64), state[naming.key(layer, "A")].to(F64)
    return _residual(state, layer) + S * b @ a


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def _width(state, layer: str) -> int:
    return state[naming.key(layer, "MA")].shape[0]


def test_init_state_keeps_the_adapters_and_an_empty_residual() -> None:
    init = _init()
    state = _agg().init_state(init)
    for layer, (d_out, d_in) in SHAPES.items():
        assert state[naming.key(layer, "MA")].shape == (0, d_in)
        assert state[naming.key(layer, "MB")].shape == (d_out, 0)
        for role in ("A", "B"):
            assert torch.equal(state[naming.key(layer, role)], init[naming.key(layer, role)])
    agg = _agg()
    assert agg.stacked and not agg.fresh_each_round and not agg.linear and agg.uploads == ("A", "B")
    assert list(agg.client_payload(state, R)) == list(state)  # A, B, the residual and the head go down


def test_rounds_keep_the_global_model_the_average_of_the_client_models() -> None:
    """Six rounds of 2 to 5 clients with very unequal weights, recompressions included: the global model equals the
    dense average of the client models, the residual the paper's dense residual, A and B the weighted means."""
    agg, oracle = _agg(), Oracle()
    gen = torch.Generator().manual_seed(1)
    state = agg.init_state(_init())
    widths = {layer: 0 for layer in SHAPES}
    recompressed = set()
    for num_examples in ((3, 40, 7, 1), (5, 5, 20), (1, 2, 3, 50, 9), (8, 1), (13, 2, 4), (30, 1, 1, 6)):
        updates = _train(state, gen, num_examples)
        p = [n / sum(num_examples) for n in num_examples]
        old, state = state, agg.aggregate(state, updates)
        oracle.round(updates, p)
        for layer, (d_out, d_in) in SHAPES.items():
            assert _rel(_model(state, layer), oracle.model[layer]) < 1e-5, layer
            assert _rel(_residual(state, layer), oracle.residual[layer]) < 1e-5, layer
            for role in ("A", "B"):
                k = naming.key(layer, role)
                mean = sum(pk * u.tensors[k].to(F64) for pk, u in zip(p, updates, strict=True))
                torch.testing.assert_close(state[k].to(F64), mean, rtol=0, atol=1e-6)
            # (K - 1) r new columns a round (client K's term folds into the others'), until the layer saturates.
            widths[layer] += (len(updates) - 1) * R
            if widths[layer] > min(d_out, d_in):
                recompressed.add(layer)
                widths[layer] = min(d_out, d_in)
            assert _width(state, layer) == widths[layer]
            assert state[naming.key(layer, "MB")].shape == (d_out, widths[layer])
        assert exactness_error(agg, old, state, updates) < 1e-5
        torch.testing.assert_close(state[HEAD], sum(pk * u.tensors[HEAD] for pk, u in zip(p, updates, strict=True)))
    assert recompressed == set(SHAPES)


def test_the_exactness_meter_counts_the_residual_and_the_adapter() -> None:
    agg = _agg()
    gen = torch.Generator().manual_seed(7)
    state = agg.aggregate(agg.init_state(_init()), _train(agg.init_state(_init()), gen, (2, 5, 3)))
    updates = _train(state, gen, (4, 1, 6))
    new = agg.aggregate(state, updates)
    assert exactness_error(agg, state, new, updates) < 1e-5
    unfolded = {**new, **{k: state[k] for k in new if naming.split(k) and naming.split(k)[1] in ("MA", "MB")}}
    assert exactness_error(agg, state, unfolded, updates) > 0.05  # FedIT's gap, without this round's residual


def test_uniform_weighting_and_one_client() -> None:
    agg, oracle = _agg("uniform"), Oracle()
    gen = torch.Generator().manual_seed(2)
    state = agg.init_state(_init())
    updates = _train(state, gen, (1, 100, 3))
    state = agg.aggregate(state, updates)
    oracle.round(updates, [1 / 3] * 3)
    for layer in SHAPES:
        assert _rel(_model(state, layer), oracle.model[layer]) < 1e-5
    # One client: its own model, nothing to fold (the residual does not grow).
    (single,) = _train(state, gen, (7,))
    new = agg.aggregate(state, [single])
    for layer in SHAPES:
        assert _width(new, layer) == _width(state, layer)
        assert torch.equal(new[naming.key(layer, "MA")], state[naming.key(layer, "MA")])
        for role in ("A", "B"):
            assert torch.equal(new[naming.key(layer, role)], single.tensors[naming.key(layer, role)])


def test_a_client_with_other_shapes_is_refused() -> None:
    agg = _agg()
    state = agg.init_state(_init())
    updates = _train(state, torch.Generator().manual_seed(3), (1, 2))
    key = naming.key("enc.0.q", "A")
    updates[1].tensors[key] = updates[1].tensors[key][:2]
    with pytest.raises(ValueError, match=r"client 11 sent enc\.0\.q\.lora_A\.weight \(2, 48\)"):
        agg.aggregate(state, updates)


class NoDenseTensors(TorchFunctionMode):
    """Fails on any torch call that returns a tensor of a quarter of a layer's d_out x d_in entries or more."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    raise AssertionError(f"{func} made a tensor of shape {tuple(t.shape)}")
        return out


def test_the_server_never_forms_a_dense_residual() -> None:
    shapes = {"big.q": (300, 200)}
    agg = _agg()
    gen = torch.Generator().manual_seed(4)
    state = agg.init_state(_init(shapes))
    rounds = [_train(state, gen, (3, 5, 7, 9), shapes)]
    guard = NoDenseTensors(300 * 200 // 4)
    with guard:
        with pytest.raises(AssertionError, match=r"\(300, 200\)"):  # the guard sees a dense product
            torch.randn(300, 4) @ torch.randn(4, 200)
        for _ in range(3):
            state = agg.aggregate(state, rounds[-1])
            rounds.append(_train(state, gen, (3, 5, 7, 9), shapes))
    assert guard.largest >= 300 * 36  # it did watch the aggregation: MB (300, 36) after three rounds
    oracle = Oracle(shapes)
    for updates in rounds[:-1]:
        oracle.round(updates, [n / 24 for n in (3, 5, 7, 9)])
    assert _rel(_model(state, "big.q"), oracle.model["big.q"]) < 1e-5


def test_recompression_keeps_the_product_and_the_width_bounded() -> None:
    """Nine clients a round on a (32, 80) layer: 32 columns a round, recompressed to rank <= 32 every round."""
    shapes = {"enc.1.v": (32, 80)}
    agg, oracle = _agg(), Oracle(shapes)
    gen = torch.Generator().manual_seed(5)
    state = agg.init_state(_init(shapes))
    for _ in range(4):
        updates = _train(state, gen, tuple(range(1, 10)), shapes)
        state = agg.aggregate(state, updates)
        oracle.round(updates, [n / 45 for n in range(1, 10)])
        assert _width(state, "enc.1.v") <= 32
        assert _rel(_residual(state, "enc.1.v"), oracle.residual["enc.1.v"]) < 1e-5
        assert _rel(_model(state, "enc.1.v"), oracle.model["enc.1.v"]) < 1e-5


# -- what a client builds: the delta downlink and the cumulative path agree ------------------------------------
class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(48, 64)}), nn.ModuleDict({"v": nn.Linear(80, 32)})])
        self.classifier = nn.Linear(16, 3, bias=False)


def _client_weights(payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The effective weight W0 + MB MA + s B A of every layer of a fresh client model loaded with ``payload``."""
    model = Toy()
    inject_adapters(model, ["q", "v"], rank=R, alpha=ALPHA, head=["classifier"])
    load_adapter_state(model, payload)
    layers = adapter_layers(model).items()
    return {p: (layer.base.weight + layer.delta_weight()).detach().to(F64) for p, layer in layers}


def test_a_node_holding_last_rounds_factors_gets_only_the_new_columns_and_builds_the_same_model() -> None:
    agg, dl, oracle = _agg(), MergedDownlink(), Oracle()
    gen = torch.Generator().manual_seed(6)
    w0 = {p: layer.weight.detach().to(F64) for p, layer in [("enc.0.q", Toy().enc[0]["q"]),
                                                              ("enc.1.v", Toy().enc[1]["v"])]}
    state = agg.init_state(_init())
    held: dict[int, tuple[dict, dict]] = {7: ({}, {})}
    for rnd, num_examples in enumerate(((3, 9, 1), (2, 2, 5), (4, 1, 1, 6, 2, 3)), start=1):
        updates = _train(state, gen, num_examples)
        state = agg.aggregate(state, updates)
        oracle.round(updates, [n / sum(num_examples) for n in num_examples])
        version = dl.sync(state)
        payload = agg.client_payload(state, R)
        delta, cfg_delta = dl.cut(7, payload, version)  # node 7 evaluated every earlier round's state
        full, cfg_full = dl.cut(8, payload, version)  # node 8 is new
        before = {layer: held[7][0].get(naming.key(layer, "MA"), torch.zeros(0)).shape[0] for layer in SHAPES}
        assert cfg_full["merged-from"] == [0, 0]
        for layer, (d_out, d_in) in SHAPES.items():
            new = _width(state, layer) - before[layer]
            if cfg_delta["merged-from"][sorted(SHAPES).index(layer)]:
                assert delta[naming.key(layer, "MA")].shape == (new, d_in)
                assert delta[naming.key(layer, "MB")].shape == (d_out, new)
                assert new == (len(updates) - 1) * R
        if rnd == 2:  # 8 more columns on the 8 node 7 holds: a pure delta
            assert cfg_delta["merged-from"] == [8, 8]
            assert logical_bytes(delta) == logical_bytes(full) - 4 * 8 * sum(a + b for a, b in SHAPES.values())
        if rnd == 3:  # 16 + 20 > 32: enc.1.v recompressed, a new generation, the cumulative factors; enc.0.q a delta
            assert cfg_delta["merged-from"] == [16, 0] and cfg_delta["merged-generation"] == [0, 1]
        via_delta, now, now_gen = apply_merged(delta, cfg_delta, *held[7])
        via_full, _, _ = apply_merged(full, cfg_full, {}, {})
        held[7] = (now, now_gen)
        dl.record(7, version)
        a, b = _client_weights(via_delta), _client_weights(via_full)
        for layer in SHAPES:
            assert torch.equal(a[layer], b[layer])
            assert _rel(a[layer] - w0[layer], oracle.model[layer]) < 1e-5


# -- through the real ServerApp and ClientApp ----------------------------------------------------------------
def test_a_federation_ends_on_the_average_of_its_client_models(tmp_path) -> None:
    """Two rounds of three nodes on the in-process grid: every round's new global model (from the checkpoints)
    is the p_k-weighted average of the models the clients sent back, each built on the base they were sent."""
    grid, rows, _ = run_local(tmp_path, **{"method.name": "fedex_lora", "keep-checkpoints": 3})
    assert [r["clients_aggregated"] for r in rows[1:]] == [3, 3]
    assert not any(r["rejected"] or r["clipped"] or r["weight_capped"] for r in rows)  # p_k = n_k / n as sent
    assert all(r["exactness"] < 1e-5 for r in rows[1:])
    s = FedLoraConfig().adapter.alpha / 4  # FAST's adapter.rank is 4
    by_id = {r.metadata.reply_to_message_id: r for r in grid.replies}
    previous = None
    for rnd in (1, 2):
        state = read_checkpoint(checkpoint_path(tmp_path, rnd))[0]
        replies = [by_id[m.metadata.message_id] for m in grid.sent
                   if m.metadata.message_type == MessageType.TRAIN and int(m.content["config"]["server-round"]) == rnd]
        n = [int(r.content["metrics"]["num-examples"]) for r in replies]
        uploads = [from_record(r.content["arrays"]) for r in replies]
        for layer in naming.layers_of(state):
            base = torch.zeros(1, dtype=F64) if previous is None else _residual(previous, layer)
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            ideal = base + sum(nk / sum(n) * s * u[kb].to(F64) @ u[ka].to(F64) for nk, u in zip(n, uploads,
                                                                                                  strict=True))
            got = _residual(state, layer) + s * state[kb].to(F64) @ state[ka].to(F64)
            assert _rel(got, ideal) < 1e-5, (rnd, layer)
            assert _width(state, layer) == 2 * 4 * rnd  # (3 - 1) clients x rank 4 per round
        previous = state
