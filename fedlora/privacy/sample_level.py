"""``privacy.mode = "sample"``: DP-SGD on every client (record-level DP), one accountant per client.

Each client's accountant lives in its own privacy state across rounds; a client whose next round would pass
``privacy.target-epsilon`` declines to train (:class:`BudgetExhausted`), and the server never samples it again.
The noise multiplier is given, or derived once for the whole planned training (rounds x local steps at the
client's Poisson rate q = batch / n) so that it spends exactly the budget (docs/privacy.md).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from fedlora.config import FedLoraConfig
from fedlora.privacy.modes import BudgetExhausted, PrivacyMode, needs_noise, register

if TYPE_CHECKING:
    from fedlora.aggregation import Aggregator
    from fedlora.tasks import Task
    from fedlora.tasks.base import Encoded


@lru_cache(maxsize=64)
def sample_noise_multiplier(cfg_key: tuple, num_examples: int) -> float:
    """sigma for DP-SGD: given, or the smallest that spends privacy.target-epsilon over the planned run."""
    target, delta, sigma, accountant, batch_size, rounds, local_steps = cfg_key
    if sigma > 0:
        return sigma
    from fedlora.privacy.accountant import noise_for_budget

    return noise_for_budget(target, delta, min(1.0, batch_size / num_examples), rounds * local_steps, accountant)


@register
class SampleLevelDP(PrivacyMode):
    name = "sample"
    client_state = True

    @classmethod
    def check_config(cls, cfg: FedLoraConfig, method: type[Aggregator]) -> None:
        needs_noise(cfg)
        cfg.check([
            (not cfg.data.packing, "data.packing",
             "cannot be true with privacy.mode='sample': a packed window mixes documents, so DP-SGD would protect "
             "windows, not documents; set data.packing=false"),
            (not cfg.model.gradient_checkpointing, "model.gradient-checkpointing",
             "cannot be true with privacy.mode='sample' (opacus' per-sample hooks would see every forward twice); "
             "set it to false"),
            (not cfg.privacy.adaptive_clip, "privacy.adaptive-clip", "applies to privacy.mode='client' only"),
        ])

    def noise_multiplier(self, num_examples: int) -> float:
        p, t = self.cfg.privacy, self.cfg.train
        rounds = self.cfg.run.num_server_rounds
        key = (p.target_epsilon, p.delta, p.noise_multiplier, p.accountant, t.batch_size, rounds, t.local_steps)
        return sample_noise_multiplier(key, num_examples)

    def client_train(self, task: Task, model: torch.nn.Module, data: Encoded, seed: int,
                     state: dict | None = None) -> tuple[dict[str, float], dict | None]:
        from fedlora.privacy.accountant import ClientAccountant
        from fedlora.privacy.dpsgd import train_local_dp

        p, t = self.cfg.privacy, self.cfg.train
        n, enc, targets = data
        q, sigma = min(1.0, t.batch_size / n), self.noise_multiplier(n)
        accountant = ClientAccountant.from_state(state, p.accountant)
        spent = accountant.epsilon(p.delta)
        after = accountant.epsilon_after(p.delta, sigma, q, t.local_steps)
        if p.target_epsilon > 0 and after > p.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(f"privacy budget: epsilon spent {spent:.3f}, one more round would reach {after:.3f} "
                                  f"> privacy.target-epsilon={p.target_epsilon:g} (delta={p.delta:g})")
        losses, correct, counted = train_local_dp(model, enc, targets, t, p.clip, sigma, accountant, seed=seed,
                                                  loss_fn=task.batch_loss)
        metrics = task.train_metrics(losses, correct, counted)
        metrics.update(epsilon=accountant.epsilon(p.delta), noise_multiplier=sigma, sample_rate=q)
        return metrics, accountant.state_dict()
