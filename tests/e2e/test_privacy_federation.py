"""DP-SGD in a federation: per-client budgets across rounds, refusal when spent, restart-proof accountants."""

from __future__ import annotations

import pytest

from fedlora.config import FedLoraConfig
from fedlora.privacy.accountant import ClientAccountant
from fedlora.tasks import get_task
from tests.conftest import run_local

# 3 clients on a skewed split (sizes 4405, 4537, 2439): the small client has the largest sampling rate q and
# spends its budget fastest. sigma fixed so the budget, not the noise, decides who trains.
DP = {"data.partition": "dirichlet", "data.dirichlet-alpha": 0.5, "seed": 42, "train.batch-size": 64,
      "train.local-steps": 4, "privacy.mode": "sample", "privacy.noise-multiplier": 0.8, "method.name": "fedit"}


def _eps(n: int, rounds: int) -> float:
    return ClientAccountant.from_state(None, "rdp").epsilon_after(1e-5, 0.8, 64 / n, 4 * rounds)


def _sizes() -> list[int]:
    cfg = FedLoraConfig.from_run_config({k: v for k, v in DP.items() if not k.startswith("privacy")})
    return [len(get_task(cfg).client_dataset("train", i, 3)) for i in range(3)]


def test_a_client_with_a_spent_budget_stops_and_the_server_goes_on(tmp_path):
    sizes = _sizes()
    small = sizes.index(min(sizes))
    target = 2.6
    # The premise: the small client can afford 2 rounds but not 3; the others can afford all 4.
    assert _eps(sizes[small], 2) <= target < _eps(sizes[small], 3)
    assert all(_eps(n, 4) <= target for i, n in enumerate(sizes) if i != small)
    _, rows, summary = run_local(tmp_path, **DP, **{"num-server-rounds": 4, "privacy.target-epsilon": target})
    trained = {r["round"]: r for r in rows if r["round"] > 0}
    assert [trained[r]["clients_aggregated"] for r in (1, 2, 3, 4)] == [3, 3, 2, 2]
    assert len(trained[3]["exhausted"]) == 1 and f"node {1000 + small}" in trained[3]["exhausted"][0]
    assert "target-epsilon=2.6" in trained[3]["exhausted"][0]
    assert trained[4]["clients_sampled"] == 2  # a spent client is not sampled again
    # The epsilon each client reports equals opacus' for all the steps it took.
    assert trained[2]["client_epsilon"][str(1000 + small)] == pytest.approx(_eps(sizes[small], 2), abs=1e-6)
    for i, n in enumerate(sizes):
        if i != small:
            assert trained[4]["client_epsilon"][str(1000 + i)] == pytest.approx(_eps(n, 4), abs=1e-6)
    assert summary["epsilon"] <= target


def test_when_every_client_is_spent_the_run_stops_cleanly(tmp_path, capsys):
    sizes = _sizes()
    target = 1.95
    assert all(_eps(n, 1) <= target < _eps(n, 2) for n in sizes if n != min(sizes))
    assert _eps(min(sizes), 1) > target  # the small client never trains
    _, rows, summary = run_local(tmp_path, **DP, **{"num-server-rounds": 4, "privacy.target-epsilon": target})
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_aggregated"] == 2 and len(rows[1]["exhausted"]) == 1
    assert "stopping early: all 3 clients have spent their privacy budget" in capsys.readouterr().out
    assert summary["rounds"] == 1


def test_the_accountant_survives_a_supernode_restart(tmp_path):
    """Two runs of 2 rounds each with fresh node contexts (a restart) share privacy.state-dir: the second
    run's clients continue from the first run's spending."""
    state_dir = tmp_path / "accountants"
    common = {**DP, "data.partition": "iid", "num-server-rounds": 2, "privacy.state-dir": str(state_dir)}
    run_local(tmp_path / "a", **common)
    assert sorted(p.name for p in state_dir.iterdir()) == [f"accountant-partition-{i}.json" for i in range(3)]
    _, rows, _ = run_local(tmp_path / "b", **common)
    cfg = FedLoraConfig.from_run_config({k: v for k, v in common.items() if not k.startswith("privacy")})
    n0 = len(get_task(cfg).client_dataset("train", 0, 3))
    assert rows[1]["client_epsilon"]["1000"] == pytest.approx(_eps(n0, 3), abs=1e-6)  # round 3 overall
    assert rows[2]["client_epsilon"]["1000"] == pytest.approx(_eps(n0, 4), abs=1e-6)


@pytest.mark.parametrize("method", ["fedit", "ffa", "flora", "lora_fair", "fed_sb", "fedsvd", "fedex_lora"])
def test_dp_sgd_works_with_every_method(method, tmp_path):
    _, rows, summary = run_local(tmp_path, **{"method.name": method, "num-server-rounds": 1,
                                              "privacy.mode": "sample", "privacy.target-epsilon": 4.0})
    assert rows[1]["clients_aggregated"] == 3 and not rows[1]["rejected"]
    assert len(rows[1]["client_epsilon"]) == 3 and 0 < summary["epsilon"] <= 4.0


def test_client_level_dp_clips_noises_and_accounts(tmp_path):
    """DP-FedAvg on FedSVD: the federation's epsilon grows per round as opacus' RDP at q = 1 (all clients)."""
    z = 1.5
    _, rows, _ = run_local(tmp_path, **{"method.name": "fedsvd", "method.weighting": "uniform",
                                        "privacy.mode": "client", "privacy.noise-multiplier": z,
                                        "privacy.clip": 0.05, "num-server-rounds": 2})
    for r in (1, 2):
        expected = ClientAccountant.from_state(None, "rdp").epsilon_after(1e-5, z, 1.0, r)
        assert rows[r]["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert rows[r]["update_norm_median"] > 0.05  # the updates really were clipped at this S
    assert rows[2]["epsilon"] > rows[1]["epsilon"]


def test_adaptive_client_clipping_moves_the_norm_and_resumes_with_it(tmp_path):
    common = {"method.name": "ffa", "method.weighting": "uniform", "privacy.mode": "client",
              "privacy.noise-multiplier": 1.0, "privacy.clip": 1e-3, "privacy.adaptive-clip": True,
              "privacy.count-noise": 2.0}
    _, rows, _ = run_local(tmp_path, **common, **{"num-server-rounds": 2})
    assert rows[1]["clip"] == pytest.approx(1e-3)
    assert rows[2]["clip"] > rows[1]["clip"]  # every update is larger than 1e-3: the norm grows
    _, rows3, _ = run_local(tmp_path, **common, **{"num-server-rounds": 3, "resume": True})
    assert rows3[-1]["round"] == 3 and rows3[-1]["clip"] > rows[2]["clip"]


def test_per_client_budgets_each_client_stops_at_its_own(tmp_path):
    """privacy.target-epsilons: partition i gets entry i; with sigma fixed, the tight client stops, the rest go on."""
    sizes = _sizes()
    tight = _eps(sizes[0], 1) * 1.01  # partition 0 affords one round
    assert _eps(sizes[0], 2) > tight
    budgets = f"{tight},100,100"
    _, rows, summary = run_local(tmp_path, **DP, **{"num-server-rounds": 3, "privacy.target-epsilons": budgets})
    trained = {r["round"]: r for r in rows if r["round"] > 0}
    assert [trained[r]["clients_aggregated"] for r in (1, 2, 3)] == [3, 2, 2]
    assert len(trained[2]["exhausted"]) == 1 and "node 1000" in trained[2]["exhausted"][0]
    assert f"target-epsilon={tight:g}" in trained[2]["exhausted"][0]
    eps = summary["client_epsilon"]
    assert eps["1000"] == pytest.approx(_eps(sizes[0], 1), abs=1e-6) and eps["1000"] <= tight
    assert eps["1001"] == pytest.approx(_eps(sizes[1], 3), abs=1e-6)  # the others trained every round


def test_per_client_budgets_derive_each_clients_noise_from_its_own(tmp_path):
    """Without a fixed sigma each client's noise spends exactly its own budget over the planned rounds."""
    cfg = {**{k: v for k, v in DP.items() if k != "privacy.noise-multiplier"}, "num-server-rounds": 2,
           "privacy.target-epsilons": "1,4", "fraction-evaluate": 0.0}
    _, rows, summary = run_local(tmp_path, num_nodes=2, **cfg)
    assert all(r["clients_aggregated"] == 2 for r in rows[1:])
    eps = summary["client_epsilon"]
    assert 0.97 <= eps["1000"] <= 1.0 and 3.88 <= eps["1001"] <= 4.0
