"""LoRA-FAIR: FedIT plus a server-side residual dB that points (B_bar + dB) A_bar at the ideal update.

FedIT's ``B_bar A_bar`` differs from the ideal ``dW = sum p_k B_k A_k``. LoRA-FAIR keeps A_bar and solves
``min_dB 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F`` by Adam (docs/algorithms.md section 7; the solver
details are a fedlora decision). Every term is evaluated through thin factors (docs/algorithms.md section 11), so no
(d_out, d_in) matrix is ever formed.

Where the time goes (100 clients, r = 16, 4096 x 4096 layers): ``||dW||_F^2`` needs every pair of clients, the (K r,
K r) Gram matrices of the stacked factors, ~1e10 multiply-adds per layer even with symmetry; the rest is O(K r^2 d).
``method.fair-norm`` says how that norm is computed (see :func:`centred_terms`): ``float32`` (default; GEMMs on the
factors centred on their means, errors relative to the clients' drift, ~1e-8 of ||dW||^2), ``float64`` (everything
float64: the reference, about 2x slower), or ``bf16`` (cross-client Gram tiles in bfloat16: an approximation, whose
estimated deviation is logged and kept in ``LoRAFAIR.norm_report``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from fedlora import naming
from fedlora.aggregation.base import Aggregator, ClientUpdate, register
from fedlora.aggregation.linalg import reusable, stacked_gram_trace

log = logging.getLogger("fedlora")

_EARLY_STOP = 1e-9  # stop when the loss changes by less than this between Adam steps
_ALREADY_IDEAL = 1e-12  # 1 - cos below this at dB = 0: nothing to correct, return dB = 0 exactly
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults
_NEGLIGIBLE = 1e-6  # ||dW|| below this fraction of sum p_k ||B_k|| ||A_k||: the clients cancel, dB = 0
_CANCELLED = 1e-2  # ||dW||^2 below this fraction of its parts' sizes: float64 from the raw factors (centred_terms)
_NORMS = ("float32", "float64", "bf16")
_ADAM_BATCH = 16  # layers whose Adam runs as one batch (each keeps its Q, d_out x 2r float64, until then)
_TILE = {"float32": 256, "float64": 256, "bf16": 256}  # rows per Gram block (stacked_gram_trace)


@dataclass
class FairOptions:
    """The server-side residual solver: ``min_dB 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F``."""

    fair_lambda: float = field(default=0.01, metadata={"help": "LoRA-FAIR: weight lam of ||dB||_F"})
    fair_steps: int = field(default=200, metadata={"help": "LoRA-FAIR: Adam steps of the residual solver"})
    fair_lr: float = field(default=1e-2, metadata={"help": "LoRA-FAIR Adam step, relative to RMS(B_bar)"})
    fair_norm: str = field(default="float32", metadata={
        "help": "LoRA-FAIR ||dW||: float32 | float64 (reference) | bf16 (faster approximation, deviation logged)"})

    def validate(self) -> None:
        if self.fair_lambda < 0:
            raise ValueError(f"method.fair-lambda={self.fair_lambda!r} must be >= 0")
        if self.fair_steps < 0:
            raise ValueError(f"method.fair-steps={self.fair_steps!r} must be >= 0 (0 = FedIT)")
        if self.fair_lr <= 0:
            raise ValueError(f"method.fair-lr={self.fair_lr!r} must be > 0")
        if self.fair_norm not in _NORMS:
            raise ValueError(f"method.fair-norm={self.fair_norm!r} is not valid; use one of {', '.join(_NORMS)}")


@register
class LoRAFAIR(Aggregator):
    name = "lora_fair"
    mode = "lora"
    uploads = ("A", "B")
    Options = FairOptions

    def __init__(self, config=None, options=None) -> None:
        super().__init__(config, options)
        # Set by aggregate(): the norm mode and, per layer, the estimated relative deviation of ||dW|| from the exact
        # norm (0 for float32/float64), which also bounds the objective's deviation; "max_deviation" over layers.
        self.norm_report: dict = {}

    def aggregate(
        self, state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        p = self.weights(updates)
        out = self.average_extras(state, updates, p)
        buffers: dict[str, torch.Tensor] = {}  # the layers' client stacks share buffers (linalg.reusable)
        pending: list[tuple[str, _Restricted]] = []
        deviations: dict[str, float] = {}
        layers = naming.layers_of(state)
        for n, layer in enumerate(layers):
            ka, kb = naming.key(layer, "A"), naming.key(layer, "B")
            a_s = [u.tensors[ka] for u in updates]
            b_s = [u.tensors[kb] for u in updates]
            a_bar, b_bar = self.weighted_mean(a_s, p), self.weighted_mean(b_s, p)
            objective = FairObjective(
                a_bar, b_bar, a_s, b_s, p, self.options.fair_lambda, norm=self.options.fair_norm, buffers=buffers
            )
            out[ka] = a_bar
            out[kb] = b_bar
            deviations[layer] = objective.norm_deviation
            pending.append((layer, _restrict(objective)))  # only Q and the (2r, r) problem, not the (d_out, r) data
            if len(pending) == _ADAM_BATCH or n == len(layers) - 1:  # Adam for a batch of layers at once
                for (name, _), db in zip(pending, _solve([pr for _, pr in pending], self.options), strict=True):
                    kb = naming.key(name, "B")
                    out[kb] = (out[kb].to(torch.float64) + db).to(torch.float32)
                pending = []
        del buffers
        worst = max(deviations.values(), default=0.0)
        self.norm_report = {"norm": self.options.fair_norm, "max_deviation": worst, "deviation": deviations}
        if self.options.fair_norm == "bf16":
            log.info("lora_fair: ||dW|| with bf16 Gram tiles; estimated relative deviation from the exact norm (and "
                     "bound on the objective's) at most %.1e over %d layers", worst, len(deviations))
        return out


class FairObjective:
    """``L(dB) = 1 - cos(vec(dW), vec((B_bar + dB) A_bar)) + lam ||dB||_F`` from thin factors, in float64.

    With Bt = B_bar + dB: <dW, Bt A_bar> = <P, Bt> where P = sum p_k B_k (A_k A_bar^T) (d_out, r);
    ||Bt A_bar||^2 = tr(Bt^T Bt C), C = A_bar A_bar^T; P and ||dW|| come from :func:`centred_terms`, whose
    ``norm`` (float64 by default here; the aggregator passes ``method.fair-norm``) sets the GEMMs' precision. Building
    the objective costs O(K^2 r^2 (d_out + d_in)) for ||dW||, the rest O(K r^2 d). ``norm_deviation``: the estimated
    relative deviation of ``ideal_norm`` from the exact ||dW|| (bf16 only, else 0); since
    ``|L_approx(dB) - L(dB)| = |cos| |1 - ||dW|| / ideal_norm|``, it bounds the objective's deviation for every dB.
    """

    def __init__(
        self,
        a_bar: torch.Tensor,
        b_bar: torch.Tensor,
        a_s: Sequence[torch.Tensor],
        b_s: Sequence[torch.Tensor],
        p: Sequence[float],
        lam: float,
        norm: str = "float64",
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if norm not in _NORMS:
            raise ValueError(f"norm={norm!r} is not valid; use one of {', '.join(_NORMS)}")
        f64 = torch.float64
        self.b_bar = b_bar.detach().to(f64).clone()
        a_bar64 = a_bar.detach().to(f64)
        self.lam = lam
        self.c_mat = a_bar64 @ a_bar64.T
        terms = centred_terms(a_bar, b_bar, a_s, b_s, p, norm, buffers)
        if norm != "float64" and terms.ww < _CANCELLED * terms.scale:
            # The clients' updates cancel: the low-precision GEMMs' errors (relative to the parts) would be large
            # against the small ||dW||, so this layer takes the float64 path on the raw factors.
            p_mat, ww = direct_terms(a_bar, a_s, b_s, p)
            terms = terms._replace(p_mat=p_mat, ww=ww, deviation=0.0)
        self.p_mat = terms.p_mat
        self.ideal_norm = math.sqrt(max(terms.ww, 0.0))
        self.norm_deviation = terms.deviation / (2 * terms.ww) if terms.deviation and terms.ww > 0 else 0.0
        # Upper bound on ||dW||: the scale against which "dW is ~0" is judged.
        self.bound = terms.bound

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
        """:meth:`value_and_grad` writing into preallocated (d_out, r) buffers (bt = B_bar + dB, bt @ C, grad)."""
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


class Terms(NamedTuple):
    """The objective's data terms: P (d_out, r) and ww = ||dW||_F^2 (float64), the size of ww's parts (for the
    cancellation check), the bound sum p_k ||B_k|| ||A_k|| and the estimated |error| of ww (bf16 only, else 0)."""

    p_mat: torch.Tensor
    ww: float
    scale: float
    bound: float
    deviation: float


def centred_terms(
    a_bar: torch.Tensor,
    b_bar: torch.Tensor,
    a_s: Sequence[torch.Tensor],
    b_s: Sequence[torch.Tensor],
    p: Sequence[float],
    norm: str = "float32",
    buffers: dict[str, torch.Tensor] | None = None,
) -> Terms:
    """P and ||dW||^2 from the clients' factors centred on the means.

    With E_k = B_k - B_bar, F_k = A_k - A_bar and the residues beta = sum p_k E_k, alpha = sum p_k F_k (~0: the
    rounding of the float32 means), exactly dW = M0 + D with M0 = U V, U = [B_bar, beta] (d_out, 2r),
    V = [s A_bar + alpha; A_bar] (2r, d_in), s = sum p_k, and D = sum p_k E_k F_k = Et^T Ft (Et rows: p_k E_k^T,
    Ft rows: F_k; m = K r rows each). So ||dW||^2 = ||M0||^2 + 2 <M0, D> + ||D||^2 and P = M0 A_bar^T + D A_bar^T:
    ||M0||^2 from (2r, 2r) Grams in float64; <M0, D> = <U, D V^T> and D A_bar^T (the second half of D V^T) from
    D V^T = Et^T (Ft V^T), two (m, 2r)-wide products; ||D||^2 from the (m, m) Grams of Et and Ft, upper tiles only
    (:func:`stacked_gram_trace`).

    ``norm``: "float64" runs everything in float64. "float32" runs the O(drift) products (the stacks, the (m, 2r)
    products, the Gram GEMMs) in float32 and sums in float64: their errors are relative to the drift terms, so
    clients that (nearly) agree keep float64 accuracy (D ~ 0) and independent ones get ~1e-8 of ||dW||^2; when the
    parts cancel, :class:`FairObjective` redoes the layer in float64. "bf16": float32, with the Gram tiles between
    different clients' rows in bfloat16 and the estimated deviation of ||D||^2 (:func:`stacked_gram_trace`).
    """
    f64 = torch.float64
    work = f64 if norm == "float64" else torch.float32
    k, (r, d_in), d_out = len(a_s), a_bar.shape, b_bar.shape[0]
    a_bar_w, b_bar_w = a_bar.detach().to(work), b_bar.detach().to(work)
    # eb (d_out, K, r): column block k is B_k, so eb.view(d_out, K r) = [B_1, ..., B_K] and its transpose is Et.
    # Reused buffers (linalg.reusable): a fresh 26 MB stack per layer costs as much in page faults as the copy.
    eb = torch.stack([b.detach() for b in b_s], dim=1, out=reusable(buffers, "B", (d_out, k, r), work))
    fa = torch.stack([a.detach() for a in a_s], out=reusable(buffers, "A", (k, r, d_in), work))
    p_w = torch.tensor(p, dtype=work)
    norms = torch.stack([torch.linalg.vector_norm(b) for b in b_s]) * torch.stack(
        [torch.linalg.vector_norm(a) for a in a_s])
    bound = float((norms.to(f64) * torch.tensor(p, dtype=f64)).sum())
    eb.sub_(b_bar_w.unsqueeze(1)).mul_(p_w.view(1, k, 1))
    fa.sub_(a_bar_w)
    beta = eb.sum(1).to(f64)  # (d_out, r)
    alpha = (p_w @ fa.view(k, -1)).view(r, d_in).to(f64)
    e, ft = eb.view(d_out, k * r), fa.view(k * r, d_in)
    a_bar64 = a_bar_w.to(f64)
    u = torch.cat([b_bar_w.to(f64), beta], dim=1)
    v = torch.cat([sum(p) * a_bar64 + alpha, a_bar64], dim=0)
    m0m0 = float(((u.T @ u) * (v @ v.T)).sum())
    dv = (e @ (ft @ v.to(work).T)).to(f64)  # D V^T = Et^T (Ft V^T), (d_out, 2r); its second half is D A_bar^T
    m0d = float((u * dv).sum())  # <M0, D> = <U V, D> = <U, D V^T>
    p_mat = u @ (v @ a_bar64.T) + dv[:, r:]
    dd = stacked_gram_trace(e.T, ft, group=r, fast=norm == "bf16", tile=_TILE[norm], buffers=buffers)
    ww = m0m0 + 2 * m0d + dd.value
    return Terms(p_mat, ww, m0m0 + 2 * abs(m0d) + dd.within, bound, dd.deviation)


def direct_terms(
    a_bar: torch.Tensor, a_s: Sequence[torch.Tensor], b_s: Sequence[torch.Tensor], p: Sequence[float]
) -> tuple[torch.Tensor, float]:
    """P and ||dW||^2 in float64 from the raw factors, two full (m, m) Gram GEMMs: :func:`centred_terms`'s
    fallback when the clients' updates cancel."""
    f64 = torch.float64
    left = torch.cat([pk * b.detach().to(f64) for pk, b in zip(p, b_s, strict=True)], dim=1)
    right = torch.cat([a.detach().to(f64) for a in a_s], dim=0)
    p_mat = left @ (right @ a_bar.detach().to(f64).T)
    return p_mat, float(((left.T @ left) * (right @ right.T)).sum())


def solve_residual(objective: FairObjective, config: FairOptions) -> torch.Tensor:
    """Adam on dB from 0 for one layer (:func:`solve_residuals`)."""
    return solve_residuals([objective], config)[0]


def solve_residuals(objectives: Sequence[FairObjective], config: FairOptions) -> list[torch.Tensor]:
    """Adam on dB from 0, per layer; returns each layer's best iterate, so its loss is never worse than at dB = 0.

    Returns exactly zero when the ideal update is ~0 (nothing to align with) or already reached by
    B_bar A_bar (e.g. all clients agree). Adam runs in the coordinates Z of :meth:`FairObjective.restricted`
    (dB = Q Z), where the problem is (2r, r) whatever d_out is. Adam is written out (standard, bias-corrected)
    because the problem is tiny and torch.optim + autograd overhead would dominate the server's round time;
    layers whose restricted problems have the same shape run as one batch (:func:`_adam`), each with its own
    step size, stopping rule and best iterate, as if run alone.
    """
    return _solve([_restrict(o) for o in objectives], config)


class _Restricted(NamedTuple):
    """A layer's problem in the coordinates of :meth:`FairObjective.restricted` (q, sub), or nothing to solve
    (q = sub = None: dB = 0 of ``shape``)."""

    q: torch.Tensor | None
    sub: FairObjective | None
    shape: torch.Size


def _restrict(objective: FairObjective) -> _Restricted:
    if objective.ideal_norm <= _NEGLIGIBLE * objective.bound:
        return _Restricted(None, None, objective.b_bar.shape)
    return _Restricted(*objective.restricted(), objective.b_bar.shape)


def _solve(problems: Sequence[_Restricted], config: FairOptions) -> list[torch.Tensor]:
    out = [torch.zeros(pr.shape, dtype=torch.float64) for pr in problems]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, pr in enumerate(problems):
        if pr.sub is not None:
            groups.setdefault(tuple(pr.sub.b_bar.shape), []).append(i)
    for rows in groups.values():
        for i, z in zip(rows, _adam([problems[i].sub for i in rows], config), strict=True):
            out[i] = problems[i].q @ z
    return out


def _adam(objectives: Sequence[FairObjective], config: FairOptions) -> list[torch.Tensor]:
    """Best iterate of ``config.fair_steps`` Adam steps from dB = 0 on each of ``objectives`` (same shapes), batched.

    Layer i's arithmetic is :meth:`FairObjective.value_and_grad_into` and the standard bias-corrected Adam update on
    its own slice; a layer that stops (loss change < _EARLY_STOP, already ideal at step 0, or the step budget) keeps
    its best iterate while the others go on.
    """
    f64 = torch.float64
    n = len(objectives)
    b_bar = torch.stack([o.b_bar for o in objectives])  # (n, k, r)
    p_mat = torch.stack([o.p_mat for o in objectives])
    c_mat = torch.stack([o.c_mat for o in objectives])
    ideal = torch.tensor([o.ideal_norm for o in objectives], dtype=f64)
    lam = torch.tensor([o.lam for o in objectives], dtype=f64)
    # Step size relative to the size of B_bar's entries: LoRA B's are ~1e-3 after a few local steps, and an
    # absolute step of 1e-2 would overshoot on every iteration (leaving the best iterate at dB = 0, i.e. FedIT).
    lr = config.fair_lr * b_bar.square().mean(dim=(1, 2)).sqrt().clamp_min(1e-12)
    db = torch.zeros_like(b_bar)
    m, v = torch.zeros_like(db), torch.zeros_like(db)
    best_db = db.clone()
    best = [float("inf")] * n
    prev = [float("nan")] * n
    active = list(range(n))
    tiny = torch.finfo(f64).tiny
    for step in range(config.fair_steps + 1):
        bt = b_bar + db
        bt_c = torch.bmm(bt, c_mat)
        sums = torch.stack((
            (p_mat * bt).sum(dim=(1, 2)), (bt_c * bt).sum(dim=(1, 2)), torch.linalg.vector_norm(db, dim=(1, 2))
        ))
        xx = sums[1].clamp_min(tiny)
        denom = ideal * xx.sqrt()
        values = (1.0 - sums[0] / denom + lam * sums[2]).tolist()
        still = []
        for i in active:
            value = values[i]
            if value < best[i]:
                best_db[i] = db[i]
                best[i] = value
            if not ((step == 0 and value < _ALREADY_IDEAL) or abs(prev[i] - value) < _EARLY_STOP
                    or step == config.fair_steps):
                still.append(i)
            prev[i] = value
        if not still:
            break
        pen = torch.where(sums[2] > 0, lam / sums[2].clamp_min(tiny), torch.zeros_like(lam))
        grad = bt_c * (sums[0] / (xx * denom)).view(n, 1, 1) - p_mat / denom.view(n, 1, 1) + db * pen.view(n, 1, 1)
        # Adam, bias-corrected: db -= lr * m_hat / (sqrt(v_hat) + eps), on the layers still running.
        rows = slice(None) if len(still) == n else torch.tensor(still)
        g, m_s, v_s = grad[rows], m[rows], v[rows]
        m_s.lerp_(g, 1 - _BETA1)
        v_s.mul_(_BETA2).addcmul_(g, g, value=1 - _BETA2)
        root = v_s.sqrt().div_((1 - _BETA2 ** (step + 1)) ** 0.5).add_(_EPS)
        step_size = (lr[rows] / (1 - _BETA1 ** (step + 1))).view(-1, 1, 1)
        if len(still) < n:  # advanced indexing copied the rows: write them back
            m[rows], v[rows] = m_s, v_s
        db[rows] = db[rows] - step_size * (m_s / root)
        active = still
    return list(best_db.unbind(0))
