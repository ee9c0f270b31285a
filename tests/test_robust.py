"""Byzantine-robust rules on deltas: against numpy brute force, against attacks, through a linear aggregator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, ClientUpdate, get_aggregator
from fedlora.robust import RULES, RobustConfig, krum_scores, product_delta_norm, robust_combine

SHAPES = {"layer0.query": (12, 10), "layer1.value": (8, 14)}  # layer -> (d_out, d_in)
HEAD = "classifier.weight"
RANK = 3
F64 = torch.float64


def _reference(gen: torch.Generator) -> dict[str, torch.Tensor]:
    ref = {HEAD: torch.randn(3, 16, generator=gen)}
    for layer, (d_out, d_in) in SHAPES.items():
        ref[naming.key(layer, "A")] = torch.randn(RANK, d_in, generator=gen)
        ref[naming.key(layer, "B")] = torch.randn(d_out, RANK, generator=gen)
    return ref


def _deltas(ref: dict[str, torch.Tensor], n: int, gen: torch.Generator, scale: float = 1.0
            ) -> list[dict[str, torch.Tensor]]:
    return [{k: scale * torch.randn(t.shape, generator=gen) for k, t in ref.items()} for _ in range(n)]


def _updates(ref: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]], ids=None) -> list[ClientUpdate]:
    ids = list(range(len(deltas))) if ids is None else ids
    return [ClientUpdate(client_id=cid, tensors={k: ref[k] + d[k] for k in ref}, num_examples=5 + 7 * i, rank=RANK)
            for i, (cid, d) in enumerate(zip(ids, deltas, strict=True))]


def _np_deltas(ref: dict[str, torch.Tensor], updates: list[ClientUpdate], name: str) -> np.ndarray:
    return np.stack([u.tensors[name].double().numpy() - ref[name].double().numpy() for u in updates])


def _np_trim(d: np.ndarray, fraction: float) -> np.ndarray:
    cut = int(np.floor(fraction * d.shape[0]))
    return np.sort(d, axis=0)[cut:d.shape[0] - cut].mean(axis=0)


def _combine(ref, updates, rule: str, **kw):
    return robust_combine(ref, updates, [1.0 / len(updates)] * len(updates) if updates else [],
                          RobustConfig(rule=rule, **kw))


@pytest.mark.parametrize("n", [5, 6])
@pytest.mark.parametrize("rule,fraction", [("median", 0.0), ("trimmed_mean", 0.2), ("trimmed_mean", 0.34)])
def test_coordinate_rules_match_numpy_and_pass_through_fedit(n: int, rule: str, fraction: float) -> None:
    gen = torch.Generator().manual_seed(n)
    ref = _reference(gen)
    updates = _updates(ref, _deltas(ref, n, gen))
    res = _combine(ref, updates, rule, trim_fraction=fraction)
    assert len(res.updates) == 1 and res.info["rule"] == rule
    syn = res.updates[0]
    assert (syn.client_id, syn.num_examples, syn.rank) == (-1, sum(u.num_examples for u in updates), RANK)
    new = get_aggregator("fedit", AggregatorConfig(rank=RANK)).aggregate(ref, res.updates)
    assert set(new) == set(ref)
    for name in ref:
        d = _np_deltas(ref, updates, name)
        robust = np.median(d, axis=0) if rule == "median" else _np_trim(d, fraction)
        expected = torch.from_numpy(ref[name].double().numpy() + robust)
        assert syn.tensors[name].dtype == torch.float32
        torch.testing.assert_close(syn.tensors[name].double(), expected, atol=1e-6, rtol=0)
        assert torch.equal(new[name], syn.tensors[name])  # the weighted mean of one update is that update


def test_trim_zero_is_the_unweighted_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    ref = _reference(gen)
    updates = _updates(ref, _deltas(ref, 7, gen))  # unequal num_examples: a weighted mean would differ
    syn = _combine(ref, updates, "trimmed_mean", trim_fraction=0.0).updates[0]
    for name in ref:
        mean = torch.stack([u.tensors[name].double() for u in updates]).mean(dim=0)
        torch.testing.assert_close(syn.tensors[name].double(), mean, atol=1e-6, rtol=0)


def test_trimmed_mean_drops_opposite_outliers_per_coordinate() -> None:
    gen = torch.Generator().manual_seed(2)
    ref = _reference(gen)
    deltas = _deltas(ref, 10, gen)
    honest = {k: torch.stack([d[k] for d in deltas]).double() for k in ref}
    for k, t in ref.items():  # per coordinate, two different random clients send +1e6 and -1e6
        for idx in range(t.numel()):
            hi, lo = torch.randperm(10, generator=gen)[:2].tolist()
            deltas[hi][k].view(-1)[idx] = 1e6
            deltas[lo][k].view(-1)[idx] = -1e6
            honest[k].view(10, -1)[[hi, lo], idx] = float("nan")
    syn = _combine(ref, _updates(ref, deltas), "trimmed_mean", trim_fraction=0.1).updates[0]
    for k in ref:
        expected = ref[k].double() + honest[k].nansum(dim=0) / 8
        torch.testing.assert_close(syn.tensors[k].double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n,bad", [(4, 1), (10, 2)])
def test_median_resists_scaled_sign_flips(n: int, bad: int) -> None:
    gen = torch.Generator().manual_seed(n)
    ref = _reference(gen)
    deltas = _deltas(ref, n, gen)
    honest = {k: torch.stack([d[k] for d in deltas[bad:]]).double() for k in ref}
    for d in deltas[:bad]:
        for k in d:
            d[k] = d[k] * -50
    updates = _updates(ref, deltas)
    syn = _combine(ref, updates, "median").updates[0]
    mean = _combine(ref, updates, "trimmed_mean", trim_fraction=0.0).updates[0]
    escaped = 0
    for k in ref:
        got = syn.tensors[k].double() - ref[k].double()
        assert (got >= honest[k].min(dim=0).values - 1e-6).all()
        assert (got <= honest[k].max(dim=0).values + 1e-6).all()
        m = mean.tensors[k].double() - ref[k].double()
        escaped += int(((m < honest[k].min(dim=0).values) | (m > honest[k].max(dim=0).values)).sum())
    assert escaped > 0  # the plain mean is dragged out of the honest range: the attack is real


def _krum_case(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ref = _reference(gen)
    common = _deltas(ref, 1, gen)[0]
    deltas = [{k: common[k] + 0.1 * v for k, v in d.items()} for d in _deltas(ref, 10, gen)]
    for i in (2, 7):  # two Byzantine clients, about 100x farther from the others than honest ones are
        deltas[i] = {k: common[k] + 10.0 * torch.randn(t.shape, generator=gen) for k, t in ref.items()}
    ids = [31, 4, 17, 8, 42, 15, 23, 16, 9, 50]  # not sorted: selection must come back sorted by id
    return ref, _updates(ref, deltas, ids)


def test_multi_krum_excludes_outliers_and_returns_the_original_updates() -> None:
    ref, updates = _krum_case()
    res = _combine(ref, updates, "multi_krum", krum_byzantine=2)
    bad = {updates[2].client_id, updates[7].client_id}
    assert res.info["krum_selected"] == sorted(u.client_id for u in updates if u.client_id not in bad)
    assert [u.client_id for u in res.updates] == res.info["krum_selected"]
    originals = {id(u) for u in updates}
    assert all(id(u) in originals for u in res.updates)
    json.dumps(res.info)
    few = _combine(ref, updates, "multi_krum", krum_byzantine=2, krum_keep=3)
    scores = few.info["krum_scores"]
    assert few.info["krum_selected"] == sorted(sorted(scores, key=scores.get)[:3])


def test_krum_scores_match_brute_force() -> None:
    ref, updates = _krum_case(4)
    f = 2
    scores = _combine(ref, updates, "multi_krum", krum_byzantine=f).info["krum_scores"]
    deltas = [{k: u.tensors[k].double() - ref[k].double() for k in ref} for u in updates]
    for i, u in enumerate(updates):
        dist = sorted(sum(float(((deltas[i][k] - deltas[j][k]) ** 2).sum()) for k in ref)
                      for j in range(len(updates)) if j != i)
        expected = sum(dist[: len(updates) - f - 2])
        assert scores[u.client_id] == pytest.approx(expected, rel=1e-9)


def test_krum_scores_ignore_duplicates_and_translation() -> None:
    flat = torch.randn(6, 20, generator=torch.Generator().manual_seed(5), dtype=F64)
    flat[1] = flat[0]  # a tie at distance 0: a row's own zero must not be confused with its twin's
    s = krum_scores(flat, 1)
    torch.testing.assert_close(krum_scores(flat + 1e3, 1), s, rtol=1e-6, atol=1e-6)
    d = torch.cdist(flat, flat) ** 2
    d.fill_diagonal_(float("inf"))
    torch.testing.assert_close(s, d.sort(dim=1).values[:, :3].sum(dim=1), rtol=1e-9, atol=1e-9)


def test_multi_krum_needs_2f_plus_3_clients() -> None:
    ref, updates = _krum_case()
    with pytest.raises(ValueError, match=r"robust.krum-byzantine=2 .*had 6"):
        _combine(ref, updates[:6], "multi_krum", krum_byzantine=2)
    with pytest.raises(ValueError, match="robust.krum-keep=11"):
        _combine(ref, updates, "multi_krum", krum_byzantine=2, krum_keep=11)


def test_mean_is_identity_and_inputs_are_checked() -> None:
    gen = torch.Generator().manual_seed(6)
    ref = _reference(gen)
    updates = _updates(ref, _deltas(ref, 3, gen))
    res = _combine(ref, updates, "mean")
    assert res.info == {"rule": "mean"} and all(a is b for a, b in zip(res.updates, updates, strict=True))
    for rule in RULES:
        with pytest.raises(ValueError, match="at least one client update"):
            _combine(ref, [], rule)
        with pytest.raises(ValueError, match=HEAD):
            _combine({k: v for k, v in ref.items() if k != HEAD}, updates, rule)
    updates[1].tensors.pop(HEAD)
    with pytest.raises(ValueError, match="client 1"):
        _combine(ref, updates, "median")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_product_delta_norm_matches_dense(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in, r, r0 = 48, 40, 4, 6
    a, b = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
    a0, b0 = torch.randn(r0, d_in, generator=gen), torch.randn(d_out, r0, generator=gen)
    dense = 1.7 * b.double() @ a.double()
    assert product_delta_norm(a, b, 1.7) == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-6)
    diff = dense - 0.6 * b0.double() @ a0.double()
    got = product_delta_norm(a, b, 1.7, a0, b0, 0.6)
    assert got == pytest.approx(float(torch.linalg.matrix_norm(diff)), rel=1e-6)
    assert product_delta_norm(a, b, 1.7, a, b) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="both a0 and b0"):
        product_delta_norm(a, b, 1.0, a0=a0)


@pytest.mark.parametrize("kw,key", [
    ({"rule": "krum"}, r"robust.rule='krum'.*'mean', 'median', 'trimmed_mean', 'multi_krum'"),
    ({"trim_fraction": 0.5}, r"robust.trim-fraction=0.5 .*\[0, 0.5\)"),
    ({"trim_fraction": -0.1}, "robust.trim-fraction=-0.1"),
    ({"krum_byzantine": -1}, "robust.krum-byzantine=-1"),
    ({"krum_keep": -2}, "robust.krum-keep=-2"),
])
def test_config_validate_names_the_key(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        RobustConfig(**kw).validate()
    RobustConfig().validate()
