"""Server optimisers (Reddi et al., "Adaptive Federated Optimization", 2021): FedAvgM, FedAdam, FedYogi.

The round's aggregate of the uploads, ``mean_k p_k u_k``, defines a pseudo-gradient ``g = x - mean`` at the global
tensors ``x`` the clients started from; a torch optimiser steps ``x`` with ``g`` as its ``.grad`` (FedAvgM: SGD with
momentum; FedAdam: ``torch.optim.Adam``; FedYogi: :class:`Yogi`, Adam with Yogi's additive second moment, which
torch does not ship). SGD at lr 1 without momentum is plain averaging. docs/algorithms.md section 13, item 12.

Where it applies: methods whose new global tensors are the weighted mean of the uploads (``Aggregator.linear``):
FedIT's A and B, FFA-LoRA's B, Fed-SB's R, and the head. The optimised mean is handed back to the method as the one
update of the round, so what the method does after averaging still happens. FedSVD is refused: it re-factorises
B A every round, which rotates B's coordinates, so moments kept for B would be applied in another basis.

The moments are tensors of the server state: :meth:`ServerOptimizer.tensors` goes into every checkpoint beside the
global state (names ``fedlora.server-opt.<slot>.<tensor>``) and :meth:`ServerOptimizer.load` restores them, so a
resumed run steps exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.aggregation import Aggregator, ClientUpdate

SERVER_OPTS = ("none", "avgm", "adam", "yogi")
DEFAULT_LR = {"avgm": 1.0, "adam": 1e-2, "yogi": 1e-2}  # method.server-lr = 0 picks these (Reddi et al.'s ranges)
PREFIX = "fedlora.server-opt."


def refusal(agg: type[Aggregator]) -> str:
    """Why ``agg`` cannot take a server optimiser ('' where it can)."""
    if not agg.linear:
        return "its aggregate is not a weighted mean of the uploads, so there is no pseudo-gradient to step with"
    if agg.name == "fedsvd":
        return ("it re-factorises B A every round (new A, B in the new basis), so moments kept for B would be "
                "applied in another basis")
    return ""


class Yogi(torch.optim.Optimizer):
    """Adam with Yogi's second moment (Zaheer et al. 2018): ``v -= (1 - beta2) sign(v - g^2) g^2``, so v grows
    or shrinks by at most (1 - beta2) g^2 a step instead of forgetting geometrically. Bias-corrected as torch's
    Adam, so the three optimisers here differ only in their moment rules."""

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                v.addcmul_(torch.sign(v - g2), g2, value=-(1 - beta2))
                m_hat = m / (1 - beta1 ** t)
                v_hat = v / (1 - beta2 ** t)
                p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
        return None


class ServerOptimizer:
    """A torch optimiser per global tensor a linear method averages (the uploaded roles and the head). One per
    tensor, not one over all: the rules are elementwise, so the steps are the same, and a tensor that is not
    uploaded in a round (RoLoRA's frozen factor) keeps its moments untouched instead of decaying them."""

    def __init__(self, agg: Aggregator, name: str, lr: float = 0.0, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        if name not in SERVER_OPTS[1:]:
            raise ValueError(f"method.server-opt={name!r}: use one of {list(SERVER_OPTS)}")
        why = refusal(type(agg))
        if why:
            raise ValueError(f"method.server-opt={name!r} does not apply to method {agg.name!r}: {why}")
        self.agg, self.name = agg, name
        self.lr = lr or DEFAULT_LR[name]
        self.momentum, self.betas, self.tau = momentum, (beta1, beta2), tau
        self.params: OrderedDict[str, torch.nn.Parameter] = OrderedDict()
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.steps = 0

    def _param(self, name: str, like: Mapping[str, torch.Tensor]) -> torch.nn.Parameter:
        if name not in self.params:
            param = self.params[name] = torch.nn.Parameter(like[name].detach().to(torch.float32).clone())
            if self.name == "avgm":
                self.opts[name] = torch.optim.SGD([param], lr=self.lr, momentum=self.momentum)
            elif self.name == "adam":
                self.opts[name] = torch.optim.Adam([param], lr=self.lr, betas=self.betas, eps=self.tau)
            else:
                self.opts[name] = Yogi([param], lr=self.lr, betas=self.betas, eps=self.tau)
        return self.params[name]

    def step(self, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """The round's one update: the uploaded global tensors after a step along ``x - mean_k p_k u_k``."""
        names = list(updates[0].tensors)
        p = self.agg.weights(updates)
        with torch.no_grad():
            for k in names:
                param = self._param(k, state)
                param.copy_(state[k].to(torch.float32))  # the global state may have been rolled back: start there
                param.grad = param - self.agg.weighted_mean([u.tensors[k] for u in updates], p)
        for k in names:
            self.opts[k].step()
        self.steps += 1
        first = updates[0]
        tensors = {k: self.params[k].detach().clone() for k in names}
        return [ClientUpdate(client_id=first.client_id, tensors=tensors, num_examples=1, rank=first.rank)]

    def snapshot(self) -> dict[str, Any]:
        """The optimiser as it is now (before a step the divergence guard may undo)."""
        import copy

        return {"steps": self.steps, "opts": {k: copy.deepcopy(o.state_dict()) for k, o in self.opts.items()}}

    def restore(self, snap: dict[str, Any]) -> None:
        """Undo the steps since :meth:`snapshot` (a rolled-back round leaves no trace in the moments)."""
        self.steps = snap["steps"]
        for k in list(self.opts):
            if k in snap["opts"]:
                self.opts[k].load_state_dict(snap["opts"][k])
            else:  # first stepped after the snapshot
                del self.opts[k], self.params[k]

    # -- checkpoints ---------------------------------------------------------------------------------------
    def tensors(self) -> OrderedDict[str, torch.Tensor]:
        """The optimisers' moments as named tensors (``fedlora.server-opt.<slot>.<tensor>``)."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, param in self.params.items():
            for slot, value in self.opts[name].state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    out[f"{PREFIX}{slot}.{name}"] = value.detach().clone()
        return out

    def meta(self) -> dict[str, Any]:
        steps = {}
        for name, param in self.params.items():
            s = self.opts[name].state.get(param, {}).get("step")
            if s is not None:
                steps[name] = float(s)
        return {"name": self.name, "steps": self.steps, "param_steps": steps, "order": list(self.params)}

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]
             ) -> None:
        """Restore the moments a checkpoint holds (nothing to restore before the first step)."""
        if not meta or meta.get("name") != self.name:
            if tensors:
                raise ValueError(f"resume: the checkpoint's server optimiser is {meta.get('name')!r}, not "
                                 f"{self.name!r}; keep method.server-opt as it was or use another output-dir")
            return
        self.steps = int(meta.get("steps", 0))
        slots = _slots(tensors)
        for name in meta.get("order", []):
            param = self._param(name, state)
            st: dict[str, Any] = {slot: t.clone() for slot, tensor, t in slots if tensor == name}
            if name in meta.get("param_steps", {}):
                st["step"] = torch.tensor(float(meta["param_steps"][name]))
            if st:
                self.opts[name].state[param] = st


def _slots(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """(slot, tensor name, value) of checkpointed moments: ``fedlora.server-opt.<slot>.<tensor name>`` (slot names
    have no dot; tensor names do)."""
    out = []
    for key, t in tensors.items():
        if key.startswith(PREFIX):
            slot, _, name = key[len(PREFIX):].partition(".")
            out.append((slot, name, t))
    return out


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[OrderedDict[str, torch.Tensor],
                                                            OrderedDict[str, torch.Tensor]]:
    """(global state, server-optimiser tensors) of a checkpoint's tensors."""
    own = OrderedDict((k, v) for k, v in state.items() if not k.startswith(PREFIX))
    opt = OrderedDict((k, v) for k, v in state.items() if k.startswith(PREFIX))
    return own, opt
