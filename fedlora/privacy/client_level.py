"""Client-level DP (DP-FedAvg with fixed clipping): each client's update is clipped to norm S, and the
server's average of m updates gets Gaussian noise of std z * S / m.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it clips every reply's arrays against the
one global ArrayRecord it sent, but fedlora sends per-node payloads (frozen factors once) and clients upload
only the roles their method trains, so its array-by-array pairing does not hold; the math is a few lines.

The noise is drawn per update with std z * S / sqrt(m) before a uniform average, which gives the average
exactly the N(0, (z S / m)^2) noise of DP-FedAvg and works for every method whose aggregate is linear in
the uploads (a method whose class says ``linear = True``: FedIT, FFA-LoRA, Fed-SB, FedSVD's average of B).
FLoRA and LoRA-FAIR aggregate products of uploaded factors, so the config refuses them.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedlora.config import ConfigError, FedLoraConfig
from fedlora.privacy.modes import PrivacyMode, needs_noise, register

if TYPE_CHECKING:
    from fedlora.aggregation import Aggregator, ClientUpdate


def update_norm(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the whole update (all uploaded tensors minus what the client started from)."""
    total = sum(float(((tensors[k].double() - reference[k].double()) ** 2).sum()) for k in tensors)
    return math.sqrt(total)


def clip_update(
    tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clip: float
) -> tuple[dict[str, torch.Tensor], float]:
    """reference + delta * min(1, clip / ||delta||): the clipped upload, and the norm before clipping."""
    norm = update_norm(tensors, reference)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: reference[k] + (tensors[k] - reference[k]) * factor for k in tensors}, norm


def add_noise(tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype) for k, t in tensors.items()}


def privatise_updates(
    uploads: list[dict[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Clip every upload to ``clip`` around ``reference`` and noise it so that their uniform mean carries
    N(0, (noise_multiplier * clip / m)^2) per coordinate. Returns the new uploads and the pre-clip norms."""
    m = len(uploads)
    std = noise_multiplier * clip / math.sqrt(m)
    out, norms = [], []
    for up in uploads:
        clipped, norm = clip_update(up, reference, clip)
        out.append(add_noise(clipped, std, generator))
        norms.append(norm)
    return out, norms


@register
class ClientLevelDP(PrivacyMode):
    """``privacy.mode = "client"``, the server's DP-FedAvg state: noise multiplier z (given, or derived once from
    the budget at the client sampling rate q = clients per round / clients), a seeded noise generator, the
    accountant (one step per round at (z, q)) and the clipping norm.

    With ``privacy.adaptive-clip`` the norm follows a target quantile of the clients' update norms (Andrew et
    al. 2021, "Differentially Private Learning with Adaptive Clipping"): each round the fraction b of updates
    with norm <= S is released with Gaussian noise (std sigma_b / m) and S <- S exp(-lr (b - quantile)). The
    count is a second Gaussian query on the same clients, so the update noise is raised to
    z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2): the pair then costs exactly what one query at z costs, and the
    accountant keeps stepping at z.
    """

    name = "client"
    clips_updates = True

    @classmethod
    def check_config(cls, cfg: FedLoraConfig, method: type[Aggregator]) -> None:
        needs_noise(cfg)
        if not method.linear:
            from fedlora.aggregation import aggregator_class, available

            linear = [n for n in available() if aggregator_class(n).linear]
            raise ConfigError(
                f"privacy.mode='client' with method.name={method.name!r}: client-level DP is exact only for "
                f"methods whose aggregate is linear in the uploads {linear}; the others aggregate products of "
                "uploaded factors (FLoRA and FedEx-LoRA also send each client's own factors to every node in "
                "their merged factors, which no noise on the averages hides). Use one of those methods or "
                "privacy.mode='sample'"
            )
        if cfg.method.weighting != "uniform":
            raise ConfigError(
                "privacy.mode='client' needs method.weighting='uniform' (DP-FedAvg's noise z*S/m assumes an "
                "unweighted mean of the m clipped updates); set method.weighting=\"uniform\""
            )

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self.p = cfg.privacy
        self.rounds = cfg.run.num_server_rounds
        self.z = self.p.noise_multiplier or None
        self.load_state_dict({})

    def noise_multiplier(self, sample_rate: float) -> float:
        if self.z is None:
            from fedlora.privacy.accountant import noise_for_budget

            self.z = noise_for_budget(self.p.target_epsilon, self.p.delta, sample_rate, self.rounds, self.p.accountant)
        return self.z

    def privatise(self, reference: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], num_nodes: int,
                  clients_sampled: int) -> tuple[list[ClientUpdate], dict[str, Any]]:
        """Clipped, noised copies of this round's updates (uniform weights); steps the accountant and, when
        adaptive, moves the clipping norm."""
        q = min(1.0, clients_sampled / max(num_nodes, 1))
        z = self.noise_multiplier(q)
        m = len(updates)
        z_update, sigma_b = z, 0.0
        if self.p.adaptive_clip:
            sigma_b = self.p.count_noise or m / 20
            z_update = split_noise(z, sigma_b)
        reference = {k: reference[k] for k in updates[0].tensors}
        clip = self.clip
        uploads, norms = privatise_updates([u.tensors for u in updates], reference, clip, z_update, self.generator)
        if self.p.adaptive_clip:
            below = sum(n <= clip for n in norms) + sigma_b * float(torch.randn((), generator=self.generator))
            self.clip = clip * math.exp(-self.p.clip_lr * (below / m - self.p.target_quantile))
        self.accountant.step(z, q, 1)
        info = {"epsilon": self.accountant.epsilon(self.p.delta), "clip": clip,
                "update_norm_median": float(torch.tensor(norms).median())}
        return [dataclasses.replace(u, tensors=t) for u, t in zip(updates, uploads, strict=True)], info

    def state_dict(self) -> dict:
        """The accountant, the (adaptive) clipping norm and the noise generator: a resumed run draws the noise the
        uninterrupted run would have drawn."""
        gen = base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()
        return {"accountant": self.accountant.state_dict(), "clip": self.clip, "generator": gen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from fedlora.privacy.accountant import ClientAccountant

        self.accountant = ClientAccountant.from_state(state.get("accountant"), self.p.accountant)
        self.clip = float(state.get("clip", self.p.clip))
        self.generator = torch.Generator().manual_seed(self.cfg.run.seed * 31 + 4242)
        if state.get("generator"):
            raw = bytearray(base64.b64decode(state["generator"]))
            self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8))


def split_noise(z: float, sigma_b: float) -> float:
    """Update noise multiplier when a count query with noise sigma_b shares the budget of one query at z."""
    rest = z**-2 - (2 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(f"adaptive clipping: count noise sigma_b={sigma_b:g} is too small for the budget of "
                         f"privacy.noise-multiplier={z:g} (the count alone would cost more); need sigma_b > z / 2 "
                         f"= {z / 2:g}: raise privacy.count-noise or use more clients per round")
    return rest**-0.5
