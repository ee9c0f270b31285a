"""LoRA-FAIR: FedIT plus a server-side residual dB that points (B_bar + dB) A_bar at the ideal update.

FedIT's ``B_bar A_bar`` differs from the ideal ``dW = sum p_k B_k A_k``. LoRA-FAIR keeps A_bar and solves
``min_dB 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F`` by Adam (spec section 7; the solver
details are a fedlora decision). Every term is evaluated through (r, r) traces (spec section 11), so no
(d_out, d_in) matrix is ever formed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, AggregatorConfig, ClientUpdate, register

_EARLY_STOP = 1e-9  # stop when the loss changes by less than this between Adam steps
_ALREADY_IDEAL = 1e-12  # 1 - cos below this at dB = 0: nothing to correct, return dB = 0 exactly
_NEGLIGIBLE = 1e-6  # ||dW|| below this fraction of sum p_k ||B_k|| ||A_k||: the clients cancel, dB = 0


@register
class LoRAFAIR(Aggregator):
    name = "lora_fair"
    mode = "lora"
    uploads = ("A", "B")

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        for layer in naming.layers_of(state):
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            a_s = [u.tensors[ka] for u in updates]
            b_s = [u.tensors[kb] for u in updates]
            a_bar, b_bar = self.weighted_mean(a_s, p), self.weighted_mean(b_s, p)
            db = solve_residual(FairObjective(a_bar, b_bar, a_s, b_s, p, self.config.fair_lambda), self.config)
            out[ka] = a_bar
            out[kb] = (b_bar.to(torch.float64) + db).to(torch.float32)
        return out


class FairObjective:
    """``L(dB) = 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F`` from thin factors, in float64.

    With Bt = B_bar + dB: <dW, Bt A_bar> = <P, Bt> where P = sum p_k B_k (A_k A_bar^T) (d_out, r);
    ||Bt A_bar||^2 = tr(Bt^T Bt C), C = A_bar A_bar^T; ||dW||^2 = sum_jk p_j p_k tr((B_j^T B_k)(A_k A_j^T)).
    """

    def __init__(
        self,
        a_bar: torch.Tensor,
        b_bar: torch.Tensor,
        a_s: Sequence[torch.Tensor],
        b_s: Sequence[torch.Tensor],
        p: Sequence[float],
        lam: float,
    ) -> None:
        f64 = torch.float64
        a_bar, b_bar = a_bar.detach().to(f64), b_bar.detach().to(f64)
        a_s = [a.detach().to(f64) for a in a_s]
        b_s = [b.detach().to(f64) for b in b_s]
        self.b_bar = b_bar.clone()
        self.lam = lam
        self.p_mat = sum(pk * b @ (a @ a_bar.T) for pk, a, b in zip(p, a_s, b_s, strict=True))
        self.c_mat = a_bar @ a_bar.T
        ww = sum(
            pj * pk * torch.trace((bj.T @ bk) @ (ak @ aj.T))
            for pj, aj, bj in zip(p, a_s, b_s, strict=True)
            for pk, ak, bk in zip(p, a_s, b_s, strict=True)
        )
        self.ideal_norm = float(torch.as_tensor(ww).clamp_min(0.0).sqrt())
        # Upper bound on ||dW||: the scale against which "dW is ~0" is judged.
        self.bound = sum(pk * float(b.norm() * a.norm()) for pk, a, b in zip(p, a_s, b_s, strict=True))

    def __call__(self, db: torch.Tensor) -> torch.Tensor:
        bt = self.b_bar + db
        inner = (self.p_mat * bt).sum()
        xx = torch.trace(bt.T @ bt @ self.c_mat).clamp_min(torch.finfo(torch.float64).tiny)
        cos = inner / (self.ideal_norm * xx.sqrt())
        return 1.0 - cos + self.lam * torch.linalg.vector_norm(db)


def solve_residual(objective: FairObjective, config: AggregatorConfig) -> torch.Tensor:
    """Adam on dB from 0; returns the best iterate seen, so the loss is never worse than at dB = 0.

    Returns exactly zero when the ideal update is ~0 (nothing to align with) or already reached by
    B_bar A_bar (e.g. all clients agree).
    """
    db = torch.zeros_like(objective.b_bar)
    if objective.ideal_norm <= _NEGLIGIBLE * objective.bound:
        return db
    best_db, best_loss, prev = db.clone(), float("inf"), float("nan")
    db.requires_grad_(True)
    opt = torch.optim.Adam([db], lr=config.fair_lr)
    with torch.enable_grad():
        for step in range(config.fair_steps + 1):
            opt.zero_grad()
            loss = objective(db)
            value = float(loss)
            if value < best_loss:
                best_db, best_loss = db.detach().clone(), value
            if (step == 0 and value < _ALREADY_IDEAL) or abs(prev - value) < _EARLY_STOP:
                break
            prev = value
            if step < config.fair_steps:
                loss.backward()
                opt.step()
    return best_db
