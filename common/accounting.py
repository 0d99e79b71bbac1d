"""Privacy accounting: one RDP accountant per client for DP-SGD steps and push releases.

Adjacency: two datasets of one client that differ in one example, **replaced** by another
(the client's number of examples is public: it goes to the server with every reply, so
an example added or removed would be plain to see). Both releases are accounted under
that one relation:

- **DP-SGD steps** (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each
  step clips every example's gradient to norm C, sums, and adds N(0, (sigma C)^2) noise,
  on a batch drawn by Poisson sampling at rate q. Replacing example x by x' turns one
  step's output from P = (1-q) N(s, .) + q N(s + g, .) into Q = (1-q) N(s, .) + q N(s + g', .),
  |g|, |g'| <= C. Its Renyi divergence is bounded two ways, and the smaller is taken at
  each order alpha (:func:`dp_sgd_step_rdp`):

  * through R = N(s, .), the step without x (Mironov 2017, "Renyi Differential Privacy",
    Prop. 11, the weak triangle inequality, with Hoelder exponents p and p / (p - 1)):
    D_a(P||Q) <= (a - 1/p) / (a - 1) D_pa(P||R) + D_b(R||Q), b = (a - 1) p / (p - 1) + 1.
    D(P||R) is the add-or-remove divergence of the sampled Gaussian mechanism (Mironov,
    Talwar & Zhang 2019; Opacus's exact formula at integer orders, bounded between them
    by convexity, :func:`sampled_gaussian_rdp`); D(R||Q), the other direction, is at most
    that too (ibid., at integer orders; between them (b - 1) D_b(R||Q) is convex and 0 at
    order 1, so the same chord bounds it) and at most log(1 / (1 - q)), because
    Q >= (1 - q) R everywhere;
  * by joint convexity of exp((a - 1) D_a), with the common part (1 - q) N(s, .):
    D_a(P||Q) <= log(1 - q + q exp((a - 1) a (2 / sigma)^2 / 2)) / (a - 1), the
    Gaussian's divergence for a shift of up to 2C.
- **Push releases**: each round, rows of a Poisson sample (rate ``push_fraction``) of the
  client's examples, each a unit-norm embedding plus N(0, push_noise^2 I), renormalised
  (post-processing). Bounded by the release with every example's row in its own place
  (shuffling only hides more): replacing one example changes only its place, which is
  empty with probability 1 - q in both datasets and otherwise a Gaussian shifted by at
  most 2. The same mixture formula (:func:`shared_mixture_rdp` with multiplier
  push_noise / 2) is then exact for the worst replacement, rows 2 apart (z and -z).

Renyi divergences compose over steps and rounds by addition (adaptive composition), and
the total converts to (epsilon, delta) with the bound of Balle et al. (2020, "Hypothesis
Testing Interpretations and Renyi Differential Privacy", Thm. 21) as Opacus does, minimised
over :data:`ORDERS`. For DP-SGD alone the result is about twice the epsilon Opacus
reports for adding or removing one example at the same orders (1.7 to 2.6 in the
settings tried: a replacement can move a step's clipped sum by 2C, not C); where the
best order is above Opacus's largest default (63) the wider grid here gives back some
of that. ``tests/test_accounting.py`` checks the bounds against
numerically integrated divergences.

:class:`PrivacyAccountant` keeps the history as plain JSON so a client can keep it in its
state directory across rounds, processes and runs; it records mechanisms, not epsilons,
so a history written by an older release is accounted with today's formula.
:func:`calibrate_noise_multiplier` finds the DP-SGD noise for which the whole planned
run, composed with what was already spent, stays within a target epsilon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ACCOUNTANT_FORMAT = "fedcontrast-accountant/1"
#: Names the epsilon formula; a noise calibration derived under another is derived anew.
ACCOUNTING = "replace-one-rdp/1"
#: The neighbouring datasets every epsilon here is about, in words (``summary.json``).
ADJACENCY = ("one example of a client replaced by another (its number of examples is "
             "public: it is sent with every reply)")
KINDS = ("dp-sgd", "push")
#: Reply metrics that are statistics of local data the accountant does not cover: a
#: client under DP sends them as 0, and the server leaves them out of its rows.
WITHHELD_UNDER_DP = ("train-loss", "alignment", "uniformity")
#: Sensitivity of one pushed unit-norm row when one example is replaced by another.
PUSH_SENSITIVITY = 2.0
#: Renyi orders the epsilon is minimised over: Opacus's default grid, thinned above 2
#: (each order costs evaluations at several others through the triangle inequality), and
#: extended above 63 for small budgets.
ORDERS: tuple[float, ...] = (
    tuple(1 + x / 20 for x in range(1, 21))  # 1.05 .. 2
    + tuple(2 + x / 4 for x in range(1, 13))  # 2.25 .. 5
    + tuple(5 + x / 2 for x in range(1, 11))  # 5.5 .. 10
    + tuple(float(a) for a in (11, 12, 13, 14, 16, 18, 20, 23, 26, 30, 34, 40, 46, 54, 64,
                               80, 100, 128, 160, 200, 256))
)
#: Highest order at which Opacus's divergence is evaluated (its cost grows with the order,
#: and it overflows to NaN above about 1,000).
MAX_ORDER = 512.0
#: Hoelder exponents p tried in the triangle bound of a DP-SGD step.
HOLDER = (1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)


@functools.lru_cache(maxsize=65536)
def _sampled_gaussian_rdp_int(q: float, sigma: float, order: int) -> float:
    """Opacus's add-or-remove divergence of a sampled Gaussian step at an integer order >= 2."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[float(order)])[0])


def sampled_gaussian_rdp(q: float, sigma: float, order: float) -> float:
    """Add-or-remove Renyi divergence of one sampled Gaussian step at any order > 1.

    Integer orders: Opacus's exact formula, a finite sum. Between two integers a < order
    < a + 1: (order - 1) D_order is a cumulant generating function, convex in the order
    (and 0 at order 1), so the chord between a and a + 1 bounds it from above. Opacus's
    series for fractional orders is not used: at q = 0.5 and large sigma it runs for
    thousands of terms and returns negative divergences above order 50.
    """
    low = math.floor(order + 1e-9)
    if abs(order - low) < 1e-9:
        return _sampled_gaussian_rdp_int(q, sigma, low)
    f_low = (low - 1) * _sampled_gaussian_rdp_int(q, sigma, low) if low >= 2 else 0.0
    f_high = low * _sampled_gaussian_rdp_int(q, sigma, low + 1)
    return ((low + 1 - order) * f_low + (order - low) * f_high) / (order - 1)


def shared_mixture_rdp(q: float, multiplier: float, order: float) -> float:
    """D_order between (1-q) mu + q N(a, m^2 I) and (1-q) mu + q N(b, m^2 I), |a - b| <= 1.

    An upper bound for any common part mu (joint convexity of exp((order - 1) D)); exact
    when mu is disjoint from the Gaussians, as an example's empty place in a push release,
    and |a - b| = 1.
    """
    shift = (order - 1) * order / (2 * multiplier * multiplier)  # (order-1) D of the Gaussians
    if q >= 1:
        return shift / (order - 1)
    return float(np.logaddexp(math.log1p(-q), math.log(q) + shift)) / (order - 1)


@functools.lru_cache(maxsize=4096)
def dp_sgd_step_rdp(q: float, sigma: float, order: float) -> float:
    """Renyi divergence at ``order`` of one DP-SGD step, one example replaced (module doc)."""
    convex = shared_mixture_rdp(q, sigma / 2, order)
    reverse_cap = -math.log1p(-q) if q < 1 else math.inf
    best = convex
    for p in HOLDER:
        if p * order > MAX_ORDER:
            continue
        forward = (order - 1 / p) / (order - 1) * sampled_gaussian_rdp(q, sigma, p * order)
        if not (math.isfinite(forward) and forward < best):  # Opacus overflows to NaN or inf
            continue
        back_order = (order - 1) * p / (p - 1) + 1
        back = reverse_cap
        if back_order <= MAX_ORDER:
            reverse = sampled_gaussian_rdp(q, sigma, back_order)
            if math.isfinite(reverse):
                back = min(back, reverse)
        if forward + back < best:
            best = forward + back
    return best


@functools.lru_cache(maxsize=256)
def release_rdp(kind: str, noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Renyi divergence at each of :data:`ORDERS` of one application of a release.

    A DP-SGD step's bound at an order is also lowered to its bound at any higher order:
    a divergence grows with the order (the triangle bound does not, near order 1).
    """
    if kind != "dp-sgd":
        return tuple(shared_mixture_rdp(sample_rate, noise_multiplier, a) for a in ORDERS)
    bounds = [dp_sgd_step_rdp(sample_rate, noise_multiplier, a) for a in ORDERS]
    return tuple(np.minimum.accumulate(bounds[::-1])[::-1].tolist())


def epsilon_from_rdp(rdp: Iterable[float], delta: float) -> float:
    """The smallest epsilon at ``delta`` over :data:`ORDERS` (Balle et al. 2020, as Opacus)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    values = np.asarray(list(rdp), dtype=float)
    if np.isnan(values).any() or (values < 0).any():  # a divergence is >= 0: a numerical fault
        raise ValueError(f"Renyi divergences must be >= 0, got {values.min()} (numerical error)")
    eps, _order = get_privacy_spent(orders=list(ORDERS), rdp=values, delta=delta)
    return max(float(eps), 0.0)  # the conversion goes below 0 for a large delta


@dataclass(frozen=True)
class Release:
    """``steps`` applications of one Poisson-sampled Gaussian mechanism.

    Attributes:
        kind: ``"dp-sgd"`` (optimiser steps) or ``"push"`` (push rounds).
        noise_multiplier: sigma, the noise std over C, for DP-SGD; push_noise / 2 for
            pushes (the noise std over a unit row's largest move).
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
    """The privacy one client has spent: a history of releases, composed in RDP.

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
        return epsilon_from_rdp(self.rdp(), delta)

    def rdp(self) -> np.ndarray:
        """Renyi divergence at each of :data:`ORDERS` of everything recorded (one replaced example)."""
        total = np.zeros(len(ORDERS))
        for r in self._history:
            total += r.steps * np.asarray(release_rdp(r.kind, r.noise_multiplier, r.sample_rate))
        return total

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

    The epsilon of ``spent`` plus the whole ``plan`` at noise sigma falls as sigma grows.
    A bracket [lo, hi] with eps(lo) > target >= eps(hi) is found by doubling or halving,
    then narrowed by regula falsi on (log sigma, log eps), which is nearly a straight line
    (the Illinois variant, so neither end stalls). Each step is one accountant evaluation
    at a new sigma (tens of milliseconds): a calibration takes about half a second. The result errs on the safe side:
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
        accounting: the epsilon formula it was derived under (:data:`ACCOUNTING`; "" for
            a record older than that field). Under another formula it is derived anew.
    """

    plan: PrivacyPlan
    first_round: int
    noise_multiplier: float
    last_round: int
    accounting: str = ACCOUNTING

    def holds_for(self, plan: PrivacyPlan, server_round: int) -> bool:
        """Whether ``plan``, starting at ``server_round``, continues the calibrated one."""
        same_settings = all(getattr(plan, f) == getattr(self.plan, f)
                            for f in PrivacyPlan.__dataclass_fields__ if f != "rounds")
        same_end = server_round + plan.rounds == self.first_round + self.plan.rounds
        return (same_settings and same_end and server_round > self.last_round
                and self.accounting == ACCOUNTING)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NoiseCalibration:
        try:
            return cls(PrivacyPlan(**dict(data["plan"])), int(data["first_round"]),
                       float(data["noise_multiplier"]), int(data["last_round"]),
                       str(data.get("accounting", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"noise calibration record is malformed ({exc!r})") from exc
