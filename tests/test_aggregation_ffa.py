"""FFA-LoRA: A frozen and shared, so averaging B is exact."""

from __future__ import annotations

import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator

SHAPES = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}
HEAD = "classifier.weight"
RANK = 4
NUM_EXAMPLES = (10, 30, 5, 55)
F64 = torch.float64


def _init(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {HEAD: torch.zeros(3, 16)}
    for layer, (d_out, d_in) in SHAPES.items():
        state[naming.key(layer, "A")] = (torch.rand(RANK, d_in, generator=gen) * 2 - 1) / d_in**0.5
        state[naming.key(layer, "B")] = torch.zeros(d_out, RANK)
    return state


def _updates(gen: torch.Generator) -> list[ClientUpdate]:
    out = []
    for cid, n in enumerate(NUM_EXAMPLES):
        t = {HEAD: torch.randn(3, 16, generator=gen)}
        for layer, (d_out, _) in SHAPES.items():
            t[naming.key(layer, "B")] = torch.randn(d_out, RANK, generator=gen)
        out.append(ClientUpdate(client_id=cid, tensors=t, num_examples=n, rank=RANK))
    return out


def test_ffa_average_of_b_is_exact_and_a_is_untouched() -> None:
    gen = torch.Generator().manual_seed(0)
    agg = get_aggregator("ffa", AggregatorConfig(rank=RANK))
    state = agg.init_state(_init(gen))
    updates = _updates(gen)
    new = agg.aggregate(state, updates)
    p = [n / sum(NUM_EXAMPLES) for n in NUM_EXAMPLES]
    assert set(new) == set(state)
    for layer in SHAPES:
        ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
        assert torch.equal(new[ka], state[ka])
        a = state[ka].to(F64)
        ideal = sum(pk * u.tensors[kb].to(F64) @ a for pk, u in zip(p, updates, strict=True))
        torch.testing.assert_close(new[kb].to(F64) @ a, ideal, atol=1e-5, rtol=1e-5)
    head = sum(pk * u.tensors[HEAD] for pk, u in zip(p, updates, strict=True))
    torch.testing.assert_close(new[HEAD], head, atol=1e-6, rtol=1e-6)


def test_ffa_declares_b_up_and_a_frozen() -> None:
    agg = get_aggregator("ffa", AggregatorConfig(rank=RANK))
    assert agg.mode == "ffa" and agg.uploads == ("B",) and agg.frozen == ("A",)
    shapes = agg.expected_upload(agg.init_state(_init(torch.Generator().manual_seed(1))), RANK)
    assert shapes == {HEAD: (3, 16), "enc.0.q.lora_B.weight": (64, RANK), "enc.1.v.lora_B.weight": (32, RANK)}
