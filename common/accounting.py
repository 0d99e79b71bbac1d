"""Privacy accounting: one RDP accountant per client for DP-SGD steps and push releases.

A client releases two things computed from its private examples:

- **DP-SGD steps** (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each
  step clips every example's gradient to norm C, sums, and adds N(0, (sigma C)^2) noise,
  on a batch drawn by Poisson sampling at rate q. Accounted as Opacus accounts them: the
  sampled Gaussian mechanism with noise multiplier sigma at rate q (Mironov, Talwar &
  Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism").
- **Push releases**: each round, rows of a Poisson sample (rate ``push_fraction``) of the
  client's examples, each a unit-norm embedding plus N(0, push_noise^2 I), renormalised
  (post-processing). Replacing one example moves its row by at most 2, so one push round
  is accounted as a sampled Gaussian with noise multiplier ``push_noise / 2``.

Both are composed in one :class:`PrivacyAccountant`, whose arithmetic is Opacus's
``RDPAccountant`` (no RDP formula is written here). Its history is plain JSON so a
client can keep it in its state directory across rounds, processes and runs.
:func:`calibrate_noise_multiplier` finds the DP-SGD noise for which the whole planned
run, composed with what was already spent, stays within a target epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Opacus (and SciPy under it) loads in seconds: only when epsilon is computed
    from opacus.accountants import RDPAccountant

ACCOUNTANT_FORMAT = "fedcontrast-accountant/1"
KINDS = ("dp-sgd", "push")
#: Sensitivity of one pushed unit-norm row when one example is replaced by another.
PUSH_SENSITIVITY = 2.0


@dataclass(frozen=True)
class Release:
    """``steps`` applications of one sampled Gaussian mechanism.

    Attributes:
        kind: ``"dp-sgd"`` (optimiser steps) or ``"push"`` (push rounds).
        noise_multiplier: noise std over sensitivity (sigma; push_noise / 2 for pushes).
        sample_rate: Poisson sampling rate of the examples involved (q).
        steps: how many times it was applied.
    """

    kind: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"release kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"a {self.kind} release needs a positive, finite noise multiplier, got "
                f"{self.noise_multiplier} (without noise there is no finite epsilon to account)"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


class PrivacyAccountant:
    """The privacy one client has spent: a history of releases, composed with Opacus's RDP.

    Composition is commutative, so releases of the same mechanism (kind, noise, rate)
    are kept as one entry with a step count; the history stays a few entries long over
    any number of rounds.

    Args:
        history: releases recorded so far (e.g. from :meth:`from_state_dict`).

    Examples:
        >>> acc = PrivacyAccountant()
        >>> acc.record_steps(noise_multiplier=1.1, sample_rate=0.1, steps=10)
        >>> acc.record_push(push_noise=4.0, sample_rate=0.2)
        >>> eps = acc.epsilon(delta=1e-5)
    """

    def __init__(self, history: Iterable[Release] = ()) -> None:
        self._history: list[Release] = []
        for release in history:
            self._add(release)

    @property
    def history(self) -> tuple[Release, ...]:
        return tuple(self._history)

    def __len__(self) -> int:
        return len(self._history)

    def record_steps(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP-SGD steps with noise multiplier sigma at Poisson rate q."""
        self._add(Release("dp-sgd", float(noise_multiplier), float(sample_rate), int(steps)))

    def record_push(self, push_noise: float, sample_rate: float, rounds: int = 1) -> None:
        """Record ``rounds`` push releases of rows noised with std ``push_noise`` at rate q."""
        self._add(Release("push", float(push_noise) / PUSH_SENSITIVITY, float(sample_rate),
                          int(rounds)))

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded, at ``delta`` (0.0 when nothing was released)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._history:
            return 0.0
        return float(self.opacus().get_epsilon(delta))

    def opacus(self) -> RDPAccountant:
        """An Opacus ``RDPAccountant`` holding the same history."""
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in self._history]
        return accountant

    def copy(self) -> PrivacyAccountant:
        return PrivacyAccountant(self._history)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: ``{"format": ..., "history": [release, ...]}``."""
        return {"format": ACCOUNTANT_FORMAT, "history": [asdict(r) for r in self._history]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        """Inverse of :meth:`state_dict`; ValueError naming what is wrong."""
        if state.get("format") != ACCOUNTANT_FORMAT:
            raise ValueError(
                f"accountant state has format {state.get('format')!r}, expected {ACCOUNTANT_FORMAT!r}"
            )
        try:
            history = [
                Release(str(r["kind"]), float(r["noise_multiplier"]), float(r["sample_rate"]),
                        int(r["steps"]))
                for r in state["history"]
            ]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"accountant history entry is malformed ({exc!r})") from exc
        return cls(history)

    def _add(self, release: Release) -> None:
        for i, r in enumerate(self._history):
            if (r.kind, r.noise_multiplier, r.sample_rate) == (
                release.kind, release.noise_multiplier, release.sample_rate
            ):
                self._history[i] = Release(r.kind, r.noise_multiplier, r.sample_rate,
                                           r.steps + release.steps)
                return
        self._history.append(release)


@dataclass(frozen=True)
class PrivacyPlan:
    """What one client may still release in a run: every round it could be sampled in.

    Attributes:
        rounds: rounds left in which the client could train (not the expected
            participation: a client that might be sampled is counted).
        steps_per_round: DP-SGD steps per round (local epochs x steps per epoch).
        sample_rate: DP-SGD Poisson rate q (1 / steps per epoch).
        push_rate: Poisson rate of the pushed examples (``push_fraction``).
        push_noise: std of the noise on pushed rows (0: pushes are not accounted).
        delta: the delta of the target.
        target_epsilon: epsilon the composed total must not exceed.
    """

    rounds: int
    steps_per_round: int
    sample_rate: float
    push_rate: float
    push_noise: float
    delta: float
    target_epsilon: float

    def accountant(self, noise_multiplier: float | None,
                   spent: PrivacyAccountant | None = None) -> PrivacyAccountant:
        """``spent`` plus the whole plan at DP-SGD noise ``noise_multiplier`` (None: pushes only)."""
        acc = spent.copy() if spent is not None else PrivacyAccountant()
        if noise_multiplier is not None and self.steps_per_round > 0:
            acc.record_steps(noise_multiplier, self.sample_rate, self.rounds * self.steps_per_round)
        if self.push_noise > 0 and self.push_rate > 0:
            acc.record_push(self.push_noise, self.push_rate, self.rounds)
        return acc


def calibrate_noise_multiplier(
    plan: PrivacyPlan,
    spent: PrivacyAccountant | None = None,
    *,
    rel_tolerance: float = 0.01,
    max_noise: float = 1e4,
) -> float:
    """The DP-SGD noise multiplier whose composed epsilon is within ``rel_tolerance`` below the target.

    The epsilon of ``spent`` plus the whole ``plan`` at noise sigma (Opacus's accountant)
    falls as sigma grows. A bracket [lo, hi] with eps(lo) > target >= eps(hi) is found by
    doubling or halving, then narrowed by regula falsi on (log sigma, log eps), which is
    nearly a straight line (the Illinois variant, so neither end stalls). Each step is one
    accountant evaluation, which costs a noticeable fraction of a second: the few steps
    matter. The result errs on the safe side:
    ``(1 - rel_tolerance) * target <= eps(result) <= target``.

    Raises:
        ValueError: when the releases without DP-SGD (what was already spent, plus the
            planned push releases) already reach the target, or when no noise up to
            ``max_noise`` meets it.
    """
    if plan.rounds < 1 or plan.steps_per_round < 1:
        raise ValueError(f"a plan needs rounds >= 1 and steps_per_round >= 1, got {plan}")
    target, delta = plan.target_epsilon, plan.delta
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target epsilon must be positive, got {target}")
    floor = plan.accountant(None, spent).epsilon(delta)
    if floor >= target:
        already = spent.epsilon(delta) if spent is not None and len(spent) else 0.0
        raise ValueError(
            f"--target-epsilon {target:g} cannot be met: without any DP-SGD step, the releases "
            f"already spend epsilon {floor:.3g} at delta {delta:g} (earlier rounds and runs of "
            f"this client: {already:.3g}; {plan.rounds} planned push round(s) with --push-noise "
            f"{plan.push_noise:g} at rate {plan.push_rate:g}). Raise --target-epsilon or "
            "--push-noise, or lower --push-fraction"
        )

    def eps(sigma: float) -> float:
        return plan.accountant(sigma, spent).epsilon(delta)

    hi, eps_hi = 1.0, eps(1.0)
    lo, eps_lo = hi, eps_hi
    while eps_hi > target:
        lo, eps_lo = hi, eps_hi
        hi *= 2
        if hi > max_noise:
            raise ValueError(
                f"--target-epsilon {target:g} needs a noise multiplier above {max_noise:g}: "
                "raise the target or plan fewer rounds or steps"
            )
        eps_hi = eps(hi)
    while eps_lo <= target:
        hi, eps_hi = lo, eps_lo
        lo /= 2
        eps_lo = eps(lo)
    # Regula falsi between (log lo, log eps_lo) and (log hi, log eps_hi) for log target.
    y_lo, y_hi, y = math.log(eps_lo), math.log(eps_hi), math.log(target)
    side = 0
    while eps_hi < (1 - rel_tolerance) * target and hi / lo > 1 + 1e-9:
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = x_hi + (y - y_hi) * (x_lo - x_hi) / (y_lo - y_hi)
        mid = math.exp(min(max(x, x_lo), x_hi))
        if not lo < mid < hi:
            mid = math.sqrt(lo * hi)
        e = eps(mid)
        if e > target:
            lo, eps_lo, y_lo = mid, e, math.log(e)
            if side == -1:
                y_hi = y + (y_hi - y) / 2  # Illinois: pull the stale end towards the target
            side = -1
        else:
            hi, eps_hi, y_hi = mid, e, math.log(e)
            if side == 1:
                y_lo = y + (y_lo - y) / 2
            side = 1
    return hi


@dataclass(frozen=True)
class NoiseCalibration:
    """A DP-SGD noise multiplier derived from a target, and the plan it was derived for.

    Kept in the client's state so the noise stays the same from round to round: it is
    reused while the run goes on as planned (same settings, same last round, rounds
    moving forward) and derived anew, against everything spent so far, when not.

    Attributes:
        plan: what the client could still release when the noise was derived.
        first_round: the round the plan starts at (its last is first_round + rounds - 1).
        noise_multiplier: the derived sigma.
        last_round: the latest round trained with it.
    """

    plan: PrivacyPlan
    first_round: int
    noise_multiplier: float
    last_round: int

    def holds_for(self, plan: PrivacyPlan, server_round: int) -> bool:
        """Whether ``plan``, starting at ``server_round``, continues the calibrated one."""
        same_settings = all(getattr(plan, f) == getattr(self.plan, f)
                            for f in PrivacyPlan.__dataclass_fields__ if f != "rounds")
        same_end = server_round + plan.rounds == self.first_round + self.plan.rounds
        return same_settings and same_end and server_round > self.last_round

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NoiseCalibration:
        try:
            return cls(PrivacyPlan(**dict(data["plan"])), int(data["first_round"]),
                       float(data["noise_multiplier"]), int(data["last_round"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"noise calibration record is malformed ({exc!r})") from exc
