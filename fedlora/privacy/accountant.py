"""A client's record-level privacy accountant that survives rounds and restarts, and the noise for a budget.

opacus' accountants are objects with a ``history`` of ``(noise_multiplier, sample_rate, steps)``; a Flower
client is rebuilt every round (and a SuperNode may restart), so :class:`ClientAccountant` keeps that
history as JSON-able state that the client stores in ``context.state`` or on disk between rounds.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

if TYPE_CHECKING:
    from opacus import PrivacyEngine
    from opacus.accountants.accountant import IAccountant

MECHANISMS = ("rdp", "prv")


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise ValueError(f"privacy.accountant={mechanism!r} is not supported; use one of {MECHANISMS}")


def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier sigma (to 0.5 % in epsilon) whose ``steps`` Poisson-subsampled Gaussian
    steps at ``sample_rate`` spend at most ``target_epsilon`` at ``delta``.

    For the whole planned training (rounds x local steps), not one round: the budget is spent over the run.
    """
    _check_mechanism(accountant)
    if not target_epsilon > 0:
        raise ValueError(f"privacy.target-epsilon={target_epsilon!r} must be > 0 to derive a noise multiplier")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate q={sample_rate!r} (train.batch-size / client examples) must be in (0, 1]")
    if steps < 1:
        raise ValueError(f"steps={steps} (num-server-rounds x train.local-steps) must be >= 1")
    if accountant == "rdp":
        # Even infinite noise leaves RDP's conversion term log(1/delta)/(alpha-1) over opacus' orders; below it
        # opacus' search would double sigma up to 1e6 (tens of seconds) before giving up.
        alphas = RDPAccountant.DEFAULT_ALPHAS
        with warnings.catch_warnings():  # of course the largest order is optimal at zero RDP
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            floor = float(get_privacy_spent(orders=alphas, rdp=np.zeros(len(alphas)), delta=delta)[0])
        if target_epsilon <= floor:
            raise ValueError(f"privacy.target-epsilon={target_epsilon:g} is unreachable with privacy.accountant='rdp' "
                             f"at privacy.delta={delta:g}: its bound never goes below {floor:.4f}, whatever the "
                             f"noise; raise privacy.target-epsilon or privacy.delta, or use privacy.accountant='prv'")
    try:
        with warnings.catch_warnings():  # "Optimal order is the largest alpha" for the search's large sigmas
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            # The tolerance is absolute in opacus; make it relative so small budgets are met as closely.
            sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                         steps=steps, accountant=accountant, epsilon_tolerance=0.005 * target_epsilon)
    except ValueError as e:
        if "budget is too low" not in str(e):  # opacus' words when sigma would have to exceed 1e6
            raise
        raise ValueError(
            f"privacy.target-epsilon={target_epsilon:g} is unreachable at privacy.delta={delta:g} with {steps} "
            f"steps at sample rate {sample_rate:.4g}: no noise multiplier up to 1e6 spends that little; raise "
            f"privacy.target-epsilon or privacy.delta, or train fewer steps/rounds or with smaller batches"
        ) from e
    return float(sigma)


class ClientAccountant:
    """One client's privacy ledger: an opacus RDP or PRV accountant plus a JSON-able state.

    Use :meth:`bind_engine` to let opacus' ``DPOptimizer`` step it during training; read :meth:`epsilon`
    afterwards and store :meth:`state_dict` for the next round.
    """

    def __init__(self, mechanism: str = "rdp"):
        _check_mechanism(mechanism)
        self._acc: IAccountant = create_accountant(mechanism=mechanism)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, mechanism: str) -> ClientAccountant:
        """Restore from :meth:`state_dict` (``None`` or ``{}``: a client that has not trained yet)."""
        acc = cls(mechanism)
        if state:
            if state.get("mechanism") != mechanism:
                raise ValueError(f"stored privacy state was accounted with {state.get('mechanism')!r} but "
                                 f"privacy.accountant={mechanism!r}; keep the accountant fixed for a run")
            history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
            acc._acc.load_state_dict({"history": history, "mechanism": mechanism})
        return acc

    @property
    def mechanism(self) -> str:
        return self._acc.mechanism()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` runs; consecutive equal steps are merged."""
        return [(float(s), float(q), int(n)) for s, q, n in self._acc.history]

    @property
    def steps(self) -> int:
        """Steps taken (opacus' ``len(accountant)`` counts history entries, not steps)."""
        return sum(n for _, _, n in self._acc.history)

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps at (sigma, q), merged into the last run if it has the same sigma and q."""
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        if steps == 0:
            return
        hist = self._acc.history
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            hist[-1] = (hist[-1][0], hist[-1][1], hist[-1][2] + steps)
        else:
            hist.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``: 0 before any step, inf after a step without noise."""
        if not self._acc.history:
            return 0.0
        if any(s == 0 for s, _, n in self._acc.history if n > 0):
            return math.inf
        return float(self._acc.get_epsilon(delta=delta))

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon if ``steps`` more steps at (sigma, q) were taken; this accountant is left unchanged."""
        probe = ClientAccountant.from_state(self.state_dict(), self.mechanism)
        probe.step(noise_multiplier, sample_rate, steps)
        return probe.epsilon(delta)

    def bind_engine(self, engine: PrivacyEngine) -> None:
        """Share the accountant of a fresh ``PrivacyEngine``, so the ``DPOptimizer`` step hook that
        ``make_private`` attaches to ``engine.accountant`` records every step in this ledger.

        Loads our history into the engine's existing accountant and adopts that object: assigning a new
        accountant to ``engine.accountant`` after ``make_private`` would leave the hook stepping the old one.
        """
        if engine.accountant.mechanism() != self.mechanism:
            raise ValueError(f"PrivacyEngine accountant {engine.accountant.mechanism()!r} does not match this "
                             f"client's {self.mechanism!r}; build it with PrivacyEngine(accountant={self.mechanism!r})")
        engine.accountant.load_state_dict(self._acc.state_dict())
        self._acc = engine.accountant


def save_state_file(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` as JSON atomically: a reader (or a restart after a crash) sees the old or the new file,
    never a torn one. Temp file in the same directory, fsync, ``os.replace``, then fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds: the replace itself is still atomic
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_state_file(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON state saved by :func:`save_state_file`, or ``None`` if there is none yet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"privacy state file {str(path)!r} is not valid JSON ({e}); save_state_file never leaves "
                         f"a partial file, so something else wrote it. Deleting it restarts this client's "
                         f"accounting at epsilon 0 and forgets what it already spent") from e
