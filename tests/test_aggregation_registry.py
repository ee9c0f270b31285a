"""The registry knows every method; rank rules and unknown names fail with messages that say the fix."""

from __future__ import annotations

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import Aggregator, AggregatorConfig, ClientUpdate, available, get_aggregator

METHODS = {  # name -> (mode, uploads, frozen, heterogeneous ranks)
    "fedit": ("lora", ("A", "B"), (), False),
    "ffa": ("ffa", ("B",), ("A",), False),
    "flora": ("lora", ("A", "B"), (), True),
    "lora_fair": ("lora", ("A", "B"), (), False),
    "fed_sb": ("sb", ("R",), ("A", "B"), False),
    "fedsvd": ("ffa", ("B",), (), False),
    "fedex_lora": ("lora", ("A", "B"), (), False),
    "rolora": ("lora", ("B", "A"), (), False),  # B in odd rounds, A in even ones (round_uploads)
    "fedsa_lora": ("lora", ("A",), (), False),  # B is personal (Aggregator.personal)
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_get_aggregator_builds_each_method(name: str) -> None:
    cfg = AggregatorConfig(rank=4, alpha=8.0)
    agg = get_aggregator(name, cfg)
    assert isinstance(agg, Aggregator) and agg.name == name and agg.config is cfg
    mode, uploads, frozen, hetero = METHODS[name]
    assert (agg.mode, agg.uploads, agg.frozen, agg.heterogeneous_ranks) == (mode, uploads, frozen, hetero)
    assert set(METHODS) <= set(available())


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'fedavg' is not a known aggregator") as err:
        get_aggregator("fedavg")
    for name in METHODS:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize("name", sorted(n for n, spec in METHODS.items() if not spec[3]))
def test_fixed_rank_methods_reject_other_ranks(name: str) -> None:
    agg = get_aggregator(name, AggregatorConfig(rank=4))
    agg.check_rank(4)
    with pytest.raises(ValueError, match=rf"{name}.*adapter\.rank=4, got rank 8.*'flora'"):
        agg.check_rank(8)
    with pytest.raises(ValueError, match="got rank 2"):
        agg.client_payload({}, 2)


def test_flora_accepts_any_rank() -> None:
    agg = get_aggregator("flora", AggregatorConfig(rank=4))
    for rank in (1, 4, 8, 64):
        agg.check_rank(rank)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_one_round_end_to_end(name: str) -> None:
    """init_state -> client_payload -> (fake training) -> aggregate keeps names, shapes and dtype float32."""
    shapes, rank = {"enc.0.q": (64, 48), "enc.1.v": (32, 80)}, 4
    gen = torch.Generator().manual_seed(0)
    init = {"classifier.weight": torch.zeros(3, 16)}
    for layer, (d_out, d_in) in shapes.items():
        init[naming.key(layer, "A")] = torch.randn(rank, d_in, generator=gen) / d_in**0.5
        init[naming.key(layer, "B")] = torch.zeros(d_out, rank)
    agg = get_aggregator(name, AggregatorConfig(rank=rank))
    state = agg.init_state(init)
    agg.client_payload(state, rank)
    updates = []
    for cid, n in enumerate((3, 5, 8)):
        tensors = {k: torch.randn(s, generator=gen) for k, s in agg.expected_upload(state, rank, 1).items()}
        updates.append(ClientUpdate(client_id=cid, tensors=tensors, num_examples=n, rank=rank))
    new = agg.aggregate(state, updates)
    assert set(new) == set(state)
    for k, t in new.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        if not (name in ("flora", "fedex_lora") and k.endswith(("merged_A", "merged_B"))):
            assert t.shape == state[k].shape
