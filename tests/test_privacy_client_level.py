"""Client-level DP (DP-FedAvg): update clipping, the noise on the average, and which methods allow it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.config import ConfigError, FedLoraConfig
from fedlora.privacy.client_level import clip_update, privatise_updates, update_norm


def _rand(gen, scale=1.0):
    return {"l.lora_B.weight": scale * torch.randn(16, 4, generator=gen, dtype=torch.float64),
            "classifier.weight": scale * torch.randn(3, 16, generator=gen, dtype=torch.float64)}


def test_clip_bounds_the_update_norm_and_keeps_small_updates():
    gen = torch.Generator().manual_seed(0)
    ref = _rand(gen)
    big = {k: ref[k] + 10 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in ref.items()}
    clipped, norm = clip_update(big, ref, clip=0.5)
    assert norm > 0.5 and update_norm(clipped, ref) == pytest.approx(0.5, rel=1e-9)
    # direction kept: the clipped delta is a positive multiple of the original delta
    for k in ref:
        d0, d1 = big[k] - ref[k], clipped[k] - ref[k]
        assert torch.allclose(d1, d0 * (0.5 / norm), atol=1e-12)
    small = {k: ref[k] + 1e-3 * torch.ones_like(v) for k, v in ref.items()}
    same, _ = clip_update(small, ref, clip=0.5)
    assert all(torch.equal(same[k], small[k]) for k in ref)


def test_noise_on_the_average_has_std_z_s_over_m():
    gen = torch.Generator().manual_seed(1)
    ref = {"w": torch.zeros(200_000, dtype=torch.float64)}
    m, z, s = 5, 1.3, 0.7
    uploads = [{"w": torch.zeros(200_000, dtype=torch.float64)} for _ in range(m)]  # zero updates: pure noise
    noised, norms = privatise_updates(uploads, ref, clip=s, noise_multiplier=z, generator=gen)
    mean = sum(u["w"] for u in noised) / m
    assert norms == [0.0] * m
    assert float(mean.std()) == pytest.approx(z * s / m, rel=0.01)
    assert abs(float(mean.mean())) < 5 * z * s / m / math.sqrt(200_000)


def test_clipped_updates_bound_one_clients_influence():
    gen = torch.Generator().manual_seed(2)
    ref = _rand(gen)
    uploads = [_rand(gen, 100.0) for _ in range(4)]
    out, _ = privatise_updates(uploads, ref, clip=1.0, noise_multiplier=0.0, generator=gen)
    for u in out:
        assert update_norm(u, ref) <= 1.0 + 1e-9


@pytest.mark.parametrize("method", ["flora", "lora_fair", "fedex_lora"])
def test_client_level_dp_refuses_nonlinear_methods(method):
    with pytest.raises(ConfigError, match="linear"):
        FedLoraConfig.from_run_config({"privacy.mode": "client", "privacy.noise-multiplier": 1.0,
                                       "method.name": method, "method.weighting": "uniform"})


def test_client_level_dp_needs_uniform_weights_and_a_noise_source():
    with pytest.raises(ConfigError, match="method.weighting"):
        FedLoraConfig.from_run_config({"privacy.mode": "client", "privacy.noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="target-epsilon"):
        FedLoraConfig.from_run_config({"privacy.mode": "client", "method.weighting": "uniform"})
    cfg = FedLoraConfig.from_run_config({"privacy.mode": "client", "privacy.noise-multiplier": 1.0,
                                         "method.weighting": "uniform", "method.name": "fedsvd"})
    assert cfg.privacy.mode == "client"


def test_split_noise_keeps_the_total_privacy_cost():
    from fedlora.privacy.client_level import split_noise

    z, sigma_b = 1.1, 2.0
    zu = split_noise(z, sigma_b)
    assert zu > z and zu**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    with pytest.raises(ValueError, match="count-noise"):
        split_noise(3.0, 1.0)


def test_adaptive_clipping_tracks_the_target_quantile_of_update_norms():
    from fedlora.aggregation import ClientUpdate
    from fedlora.privacy.client_level import ClientLevelDP

    cfg = FedLoraConfig.from_run_config({"privacy.mode": "client", "privacy.noise-multiplier": 5.0,
                                         "method.weighting": "uniform", "privacy.adaptive-clip": True,
                                         "privacy.clip": 0.5, "privacy.target-quantile": 0.3})
    dp = ClientLevelDP(cfg)
    gen = torch.Generator().manual_seed(3)
    state = {"w": torch.zeros(8)}
    for _ in range(80):
        norms = torch.rand(100, generator=gen) * 10  # update norms uniform on [0, 10]: 30% quantile = 3
        updates = []
        for k, n in enumerate(norms):
            direction = torch.randn(8, generator=gen)
            updates.append(ClientUpdate(k, {"w": direction / direction.norm() * n}, 1, 4))
        _, info = dp.privatise(state, updates, 100, 100)
        assert info["clip"] is not None and info["epsilon"] > 0
    assert dp.clip == pytest.approx(3.0, abs=0.6)
    assert dp.state_dict()["clip"] == dp.clip
    resumed = ClientLevelDP(cfg)
    resumed.load_state_dict(json.loads(json.dumps(dp.state_dict())))  # through a checkpoint's JSON metadata
    assert resumed.clip == dp.clip and resumed.accountant.steps == 80
    assert torch.equal(resumed.generator.get_state(), dp.generator.get_state())  # the same noise from here on
