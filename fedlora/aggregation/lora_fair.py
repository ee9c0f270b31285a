"""LoRA-FAIR: FedIT plus a server-side residual dB that points (B_bar + dB) A_bar at the ideal update.

FedIT's ``B_bar A_bar`` differs from the ideal ``dW = sum p_k B_k A_k``. LoRA-FAIR keeps A_bar and solves
``min_dB 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F`` by Adam (docs/algorithms.md section 7; the solver
details are a fedlora decision). Every term is evaluated through (r, r) traces (docs/algorithms.md section 11), so no
(d_out, d_in) matrix is ever formed.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register

_EARLY_STOP = 1e-9  # stop when the loss changes by less than this between Adam steps
_ALREADY_IDEAL = 1e-12  # 1 - cos below this at dB = 0: nothing to correct, return dB = 0 exactly
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults
_NEGLIGIBLE = 1e-6  # ||dW|| below this fraction of sum p_k ||B_k|| ||A_k||: the clients cancel, dB = 0


@dataclass
class FairOptions:
    """The server-side residual solver: ``min_dB 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F``."""

    fair_lambda: float = field(default=0.01, metadata={"help": "LoRA-FAIR: weight lam of ||dB||_F"})
    fair_steps: int = field(default=200, metadata={"help": "LoRA-FAIR: Adam steps of the residual solver"})
    fair_lr: float = field(default=1e-2, metadata={"help": "LoRA-FAIR Adam step, relative to RMS(B_bar)"})

    def validate(self) -> None:
        if self.fair_lambda < 0:
            raise ValueError(f"method.fair-lambda={self.fair_lambda!r} must be >= 0")
        if self.fair_steps < 0:
            raise ValueError(f"method.fair-steps={self.fair_steps!r} must be >= 0 (0 = FedIT)")
        if self.fair_lr <= 0:
            raise ValueError(f"method.fair-lr={self.fair_lr!r} must be > 0")


@register
class LoRAFAIR(Aggregator):
    name = "lora_fair"
    mode = "lora"
    uploads = ("A", "B")
    Options = FairOptions

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
            db = solve_residual(
                FairObjective(a_bar, b_bar, a_s, b_s, p, self.options.fair_lambda), self.options
            )
            out[ka] = a_bar
            out[kb] = (b_bar.to(torch.float64) + db).to(torch.float32)
        return out


class FairObjective:
    """``L(dB) = 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F`` from thin factors, in float64.

    With Bt = B_bar + dB: <dW, Bt A_bar> = <P, Bt> where P = sum p_k B_k (A_k A_bar^T) (d_out, r);
    ||Bt A_bar||^2 = tr(Bt^T Bt C), C = A_bar A_bar^T; ||dW||^2 = sum_jk p_j p_k tr((B_j^T B_k)(A_k A_j^T)).
    Building it costs O(K^2 r^2 (d_out + d_in)) for ||dW|| (two Gram matrices), the rest O(K r^2 d).
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
        # dW = L @ R with L = [p_1 B_1, ..., p_K B_K] (d_out, m) and R = [A_1; ...; A_K] (m, d_in), m = K r.
        # Two (m, m) Gram matrices give every tr((B_j^T B_k)(A_k A_j^T)) at once: a few large GEMMs instead
        # of K^2 small products (K = 100 clients: 10^4 Python-level products per layer, ~25x slower).
        left = torch.cat([pk * b for pk, b in zip(p, b_s, strict=True)], dim=1)
        right = torch.cat(a_s, dim=0)
        self.p_mat = left @ (right @ a_bar.T)
        self.c_mat = a_bar @ a_bar.T
        ww = ((left.T @ left) * (right @ right.T)).sum()
        self.ideal_norm = float(ww.clamp_min(0.0).sqrt())
        # Upper bound on ||dW||: the scale against which "dW is ~0" is judged.
        self.bound = sum(pk * float(b.norm() * a.norm()) for pk, a, b in zip(p, a_s, b_s, strict=True))

    def __call__(self, db: torch.Tensor) -> float:
        return self.value_and_grad(db)[0]

    def restricted(self) -> tuple[torch.Tensor, FairObjective]:
        """``(Q, L_Q)``: Q (d_out, k), k <= 2r, orthonormal columns spanning [B_bar, P], and L_Q(Z) = L(Q Z).

        The minimiser lies in that column space: with Bt in it, the gradient does too (Bt C and P do), and a
        part of dB orthogonal to it leaves <P, Bt> unchanged while adding to ||Bt A_bar|| and ||dB||. In the
        coordinates Z = Q^T dB every term keeps its form (B_bar -> Q^T B_bar, P -> Q^T P; C, ||dW||, lam
        unchanged), so the solver runs on (k, r) instead of (d_out, r) arrays: the same objective at a cost
        independent of d_out.
        """
        q, _ = torch.linalg.qr(torch.cat([self.b_bar, self.p_mat], dim=1), mode="reduced")
        sub = copy.copy(self)
        sub.b_bar, sub.p_mat = q.T @ self.b_bar, q.T @ self.p_mat
        return q, sub

    def value_and_grad(self, db: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Loss and its gradient in closed form: one (d_out, r) x (r, r) product, no autograd overhead."""
        bt, bt_c, grad = (torch.empty_like(self.b_bar) for _ in range(3))
        return self.value_and_grad_into(db, bt, bt_c, grad), grad

    def value_and_grad_into(
        self, db: torch.Tensor, bt: torch.Tensor, bt_c: torch.Tensor, grad: torch.Tensor
    ) -> float:
        """:meth:`value_and_grad` writing into preallocated (d_out, r) buffers (bt = B_bar + dB, bt @ C, grad).

        The solver calls this fields x steps times per round; fused in-place ops and one host sync per call
        keep the (d_out, r) arrays in cache and halve the passes over them.
        """
        torch.add(self.b_bar, db, out=bt)
        torch.mm(bt, self.c_mat, out=bt_c)
        flat = bt.view(-1)
        sums = torch.stack(
            (torch.vdot(self.p_mat.view(-1), flat), torch.vdot(bt_c.view(-1), flat), torch.linalg.vector_norm(db))
        )
        inner, xx, db_norm = sums.tolist()
        xx = max(xx, torch.finfo(torch.float64).tiny)
        denom = self.ideal_norm * xx**0.5
        torch.mul(bt_c, inner / (xx * denom), out=grad)  # ((inner / xx) bt_c - P) / denom
        grad.add_(self.p_mat, alpha=-1.0 / denom)
        if db_norm > 0:
            grad.add_(db, alpha=self.lam / db_norm)
        return 1.0 - inner / denom + self.lam * db_norm


def solve_residual(objective: FairObjective, config: FairOptions) -> torch.Tensor:
    """Adam on dB from 0; returns the best iterate seen, so the loss is never worse than at dB = 0.

    Returns exactly zero when the ideal update is ~0 (nothing to align with) or already reached by
    B_bar A_bar (e.g. all clients agree). Adam runs in the coordinates Z of :meth:`FairObjective.restricted`
    (dB = Q Z), where the problem is (2r, r) whatever d_out is. Adam is written out (standard, bias-corrected)
    because the problem is tiny and torch.optim + autograd overhead would dominate the server's round time.
    """
    if objective.ideal_norm <= _NEGLIGIBLE * objective.bound:
        return torch.zeros_like(objective.b_bar)
    q, sub = objective.restricted()
    return q @ _adam(sub, config)


def _adam(objective: FairObjective, config: FairOptions) -> torch.Tensor:
    """Best iterate of ``config.fair_steps`` Adam steps on ``objective`` from dB = 0."""
    db = torch.zeros_like(objective.b_bar)
    # Step size relative to the size of B_bar's entries: LoRA B's are ~1e-3 after a few local steps, and an
    # absolute step of 1e-2 would overshoot on every iteration (leaving the best iterate at dB = 0, i.e. FedIT).
    lr = config.fair_lr * max(float(objective.b_bar.pow(2).mean().sqrt()), 1e-12)
    m, v = torch.zeros_like(db), torch.zeros_like(db)
    bt, bt_c, grad, root = (torch.empty_like(db) for _ in range(4))
    best_db, best_loss, prev = db.clone(), float("inf"), float("nan")
    for step in range(config.fair_steps + 1):
        value = objective.value_and_grad_into(db, bt, bt_c, grad)
        if value < best_loss:
            best_db.copy_(db)
            best_loss = value
        if (
            (step == 0 and value < _ALREADY_IDEAL)
            or abs(prev - value) < _EARLY_STOP
            or step == config.fair_steps
        ):
            break
        prev = value
        # Adam, bias-corrected: db -= lr * m_hat / (sqrt(v_hat) + eps), in place.
        m.lerp_(grad, 1 - _BETA1)
        v.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
        torch.sqrt(v, out=root).div_((1 - _BETA2 ** (step + 1)) ** 0.5).add_(_EPS)
        db.addcdiv_(m, root, value=-lr / (1 - _BETA1 ** (step + 1)))
    return best_db
