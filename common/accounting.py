"""Privacy accounting: one accountant per client for DP-SGD steps and push releases.

Adjacency: two datasets of one client that differ in one example, **replaced** by another
(the client's number of examples is public: it goes to the server with every reply, so
an example added or removed would be plain to see). Both releases are accounted under
that one relation, by privacy loss distributions (PLDs) from Google's ``dp-accounting``
library (:data:`ACCOUNTING` ``"replace-one-pld/2"``):

- **DP-SGD steps** (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each
  step clips every example's gradient to norm C, sums, and adds N(0, (sigma C)^2 I)
  noise, on a batch drawn by Poisson sampling at rate q. Replacing example x by x'
  (same place, hence the same sampling coin) turns one step's output, given the rest of
  the batch (drawn alike in both datasets) with clipped sum s, into
  P = (1-q) N(s, .) + q N(s + g, .) against Q = (1-q) N(s, .) + q N(s + g', .),
  |g|, |g'| <= C. Averaging over the rest of the batch is a mixture with the same
  weights on both sides, and a hockey-stick divergence is jointly convex, so the fixed-s
  pair bounds the step. In units of C, the pair taken is the 1-D one
  P* = (1-q) N(0, sigma^2) + q N(1, sigma^2) against Q* = (1-q) N(0, sigma^2) + q N(-1, sigma^2)
  (g = -g', both of norm C: the clipped sum moves by up to 2C): dp-accounting's
  ``REPLACE`` adjacency of the Poisson-subsampled Gaussian (``from_gaussian_mechanism``
  with ``NeighboringRelation.REPLACE_ONE``, sensitivity 1, the library's
  "Privacy Loss Distributions" notes). P* and Q* are mirror images, so one PLD covers
  both directions (swapping the datasets). Lebeda et al. 2024 ("Avoiding Pitfalls for
  Privacy Accounting of Subsampled Mechanisms under Composition") show why both matter:
  a subsampled mechanism's two directions compose differently, so neither one step's
  worse direction nor sampling without replacement stands in for Poisson sampling.
  Why this pair dominates every replacement: coordinates orthogonal to g and g' are the
  same noise on both sides and drop out; in the plane of 0, g, g', rotate so g - g' lies
  on the first axis, g = (a, c), g' = (b, c). The second coordinate then has the same law
  under P and Q, so the divergence is its average of 1-D divergences between
  (1-q_y) N(0) + q_y N(a) and (1-q_y) N(0) + q_y N(b), q_y the posterior weight of the
  sampled branch, with a, b in [-r, r], r = sqrt(1 - c^2) <= 1. Each 1-D pair is at most
  the one with shifts r and -r (a scalar additive-noise mechanism is more private the
  smaller its shifts: the library's model of one; the tests integrate the 1-D pairs with
  shorter gradients, and with g' = 0, an example added or removed, against it). That
  the average over y with c > 0 (which tells more about whether the example was sampled,
  but moves the sum less) stays below the c = 0 pair is checked numerically, not proven
  here: ``tests/test_accounting.py`` integrates planar pairs against it. Opacus then
  divides the noisy sum by the expected batch size: post-processing.
- **Push releases**: each round, rows of a Poisson sample (rate ``push_fraction``) of the
  client's examples, each a unit-norm embedding plus N(0, push_noise^2 I), renormalised
  (post-processing). Bounded by the release with every example's row in its own place
  (shuffling only hides more): replacing one example changes only its place, which is
  empty with probability 1 - q in both datasets and otherwise a Gaussian shifted by at
  most 2 (rows z and -z, the worst case, reduce to one axis exactly). Its PLD is the
  mixture, weights 1 - q and q, of the identity PLD (an empty place, seen as such) and
  the Gaussian mechanism's for a shift of 2 at std push_noise (the library's sensitivity
  1 at std push_noise / 2, the ``noise_multiplier`` a push :class:`Release` records).

PLDs compose over steps and rounds by convolution, valid for adaptive composition of
dominating pairs (Zhu, Dong & Wang 2022, "Optimal Accounting of Differential Privacy via
Characteristic Function", AISTATS; Meiser & Mohammadi 2018, "Tight on Budget?"), and the
library reads epsilon at delta off the composed PLD. Its discretisation is pessimistic
(Doroshenko et al. 2022, "Connect the Dots: Tighter Discrete Approximations of Privacy
Loss Distributions", PETS): the epsilon reported is an upper bound of the pair's, at
most 0.5% above the same composition at buckets ten times finer (checked by the tests) at
:data:`VALUE_DISCRETIZATION` (coarser for noise multipliers below 1, :func:`discretization`).

The accountant before it (``"replace-one-rdp/1"``) bounded Renyi divergences by hand
(Mironov 2017's weak triangle inequality over Opacus's add-or-remove divergence, and
joint convexity) and converted them as Balle et al. 2020 do; it is kept here
(:func:`release_rdp`, :meth:`PrivacyAccountant.rdp_epsilon`) for comparison: the tests
check that the PLD epsilon is never above it, and ``bench/accounting_bench.py`` reports
the noise each needs for a target.

:class:`PrivacyAccountant` keeps the history as plain JSON so a client can keep it in its
state directory across rounds, processes and runs; it records mechanisms, not epsilons,
so a history written by an older release is accounted with today's formula.
:func:`calibrate_noise_multiplier` finds the DP-SGD noise for which the whole planned
run, composed with what was already spent, stays within a target epsilon; a calibration
derived under the former formula is derived anew (:class:`NoiseCalibration`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

logger = logging.getLogger(__name__)

ACCOUNTANT_FORMAT = "fedcontrast-accountant/1"
#: Names the epsilon formula; a noise calibration derived under another is derived anew.
ACCOUNTING = "replace-one-pld/2"
#: The formula before it: the hand-written Renyi bound, kept for comparison.
FORMER_ACCOUNTING = "replace-one-rdp/1"
#: The neighbouring datasets every epsilon here is about, in words (``summary.json``).
ADJACENCY = ("one example of a client replaced by another (its number of examples is "
             "public: it is sent with every reply)")
KINDS = ("dp-sgd", "push")
#: Reply metrics that are statistics of local data the accountant does not cover: a
#: client under DP sends them as 0, and the server leaves them out of its rows.
WITHHELD_UNDER_DP = ("train-loss", "alignment", "uniformity")
#: Sensitivity of one pushed unit-norm row when one example is replaced by another.
PUSH_SENSITIVITY = 2.0
#: Width of the PLD's privacy-loss buckets at noise multipliers of 1 and above (the
#: library's default is 1e-4; 1e-3 is ten times faster and its epsilon at most 0.5% higher).
VALUE_DISCRETIZATION = 1e-3
#: Renyi orders the former bound's epsilon is minimised over: Opacus's default grid, thinned above 2
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
    """The former bound: Renyi divergence at ``order`` of one DP-SGD step, one example replaced.

    The smaller of two bounds at each order: through R = N(s, .), the step without x
    (Mironov 2017, "Renyi Differential Privacy", Prop. 11, the weak triangle inequality,
    with Hoelder exponents p and p / (p - 1)): D_a(P||Q) <= (a - 1/p) / (a - 1) D_pa(P||R)
    + D_b(R||Q), b = (a - 1) p / (p - 1) + 1, where D(P||R) is the add-or-remove divergence
    of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019) and D(R||Q) at most
    that too and at most log(1 / (1 - q)); and by joint convexity of exp((a - 1) D_a),
    the Gaussian's divergence for a shift of up to 2C mixed at rate q
    (:func:`shared_mixture_rdp` at sigma / 2).
    """
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
    """The former bound: Renyi divergence at each of :data:`ORDERS` of one application.

    A DP-SGD step's bound at an order is also lowered to its bound at any higher order:
    a divergence grows with the order (the triangle bound does not, near order 1).
    """
    if kind != "dp-sgd":
        return tuple(shared_mixture_rdp(sample_rate, noise_multiplier, a) for a in ORDERS)
    bounds = [dp_sgd_step_rdp(sample_rate, noise_multiplier, a) for a in ORDERS]
    return tuple(np.minimum.accumulate(bounds[::-1])[::-1].tolist())


def epsilon_from_rdp(rdp: Iterable[float], delta: float) -> float:
    """The former bound's epsilon at ``delta``: the smallest over :data:`ORDERS`.

    The conversion of Balle et al. 2020 ("Hypothesis Testing Interpretations and Renyi
    Differential Privacy", Thm. 21), as Opacus does it.
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    values = np.asarray(list(rdp), dtype=float)
    if np.isnan(values).any() or (values < 0).any():  # a divergence is >= 0: a numerical fault
        raise ValueError(f"Renyi divergences must be >= 0, got {values.min()} (numerical error)")
    eps, _order = get_privacy_spent(orders=list(ORDERS), rdp=values, delta=delta)
    return max(float(eps), 0.0)  # the conversion goes below 0 for a large delta


def discretization(noise_multipliers: Iterable[float]) -> float:
    """The PLD bucket width for releases at these noise multipliers.

    A step's privacy losses spread over about 1 / sigma^2, and so do the buckets a PLD
    needs (time and memory grow with their number): below sigma = 1 the width grows as
    :data:`VALUE_DISCRETIZATION` / sigma^2, which keeps the relative error of an epsilon
    about where it is at sigma = 1 (such epsilons are in the tens or more).
    """
    smallest = min(noise_multipliers, default=1.0)
    return VALUE_DISCRETIZATION * max(1.0, 1.0 / (smallest * smallest))


@functools.lru_cache(maxsize=256)
def release_pld(kind: str, noise_multiplier: float, sample_rate: float,
                interval: float = VALUE_DISCRETIZATION) -> PrivacyLossDistribution:
    """The PLD of one application of a release, one example replaced (module doc).

    ``"dp-sgd"``: the Poisson-subsampled Gaussian at rate q, noise sigma, sensitivity 1
    under ``REPLACE_ONE``: (1-q) N(0) + q N(1) against (1-q) N(0) + q N(-1), std sigma.
    ``"push"``: with probability 1 - q an empty place (privacy loss 0), otherwise the
    Gaussian mechanism with std ``noise_multiplier`` and shift 1 (push_noise / 2 per unit:
    rows 2 apart). Both pessimistic, with buckets ``interval`` wide.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld
    from dp_accounting.privacy_accountant import NeighboringRelation

    if kind == "dp-sgd":
        return pld.from_gaussian_mechanism(
            noise_multiplier, sensitivity=1.0, sampling_prob=sample_rate,
            value_discretization_interval=interval,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
        )
    gaussian = pld.from_gaussian_mechanism(noise_multiplier, sensitivity=1.0,
                                           value_discretization_interval=interval)
    if sample_rate >= 1:
        return gaussian
    return gaussian.compute_mixture(pld.identity(interval), sample_rate)


@functools.lru_cache(maxsize=256)
def composed_release_pld(kind: str, noise_multiplier: float, sample_rate: float, steps: int,
                         interval: float = VALUE_DISCRETIZATION) -> PrivacyLossDistribution:
    """:func:`release_pld` composed with itself ``steps`` times."""
    return release_pld(kind, noise_multiplier, sample_rate, interval).self_compose(steps)


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
    """The privacy one client has spent: a history of releases, composed as PLDs.

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
        """Epsilon of everything recorded, at ``delta`` (0.0 when nothing was released).

        Read off the composed PLD (:meth:`pld`); ValueError for a delta outside (0, 1).
        """
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._history:
            return 0.0
        return max(float(self.pld().get_epsilon_for_delta(delta)), 0.0)

    def pld(self) -> PrivacyLossDistribution:
        """The PLD of everything recorded (one replaced example), composed by the library."""
        if not self._history:
            raise ValueError("nothing was recorded: there is no PLD to compose")
        interval = discretization(r.noise_multiplier for r in self._history)
        total = None
        for r in self._history:
            part = composed_release_pld(r.kind, r.noise_multiplier, r.sample_rate, r.steps,
                                        interval)
            total = part if total is None else total.compose(part)
        logger.debug("composed %d release(s) at bucket width %g", len(self._history), interval)
        return total

    def rdp_epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` by the former Renyi bound (``"replace-one-rdp/1"``), for comparison."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._history:
            return 0.0
        return epsilon_from_rdp(self.rdp(), delta)

    def rdp(self) -> np.ndarray:
        """The former bound: Renyi divergence at each of :data:`ORDERS` of everything recorded."""
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
    accounting: str = ACCOUNTING,
) -> float:
    """The DP-SGD noise multiplier whose composed epsilon is within ``rel_tolerance`` below the target.

    The epsilon of ``spent`` plus the whole ``plan`` at noise sigma falls as sigma grows.
    A bracket [lo, hi] with eps(lo) > target >= eps(hi) is found by doubling or halving,
    then narrowed by regula falsi on (log sigma, log eps), which is nearly a straight line
    (the Illinois variant, so neither end stalls). Each step is one accountant evaluation
    at a new sigma (tens of milliseconds): a calibration takes about half a second. The
    result errs on the safe side:
    ``(1 - rel_tolerance) * target <= eps(result) <= target``.

    ``accounting``: the epsilon formula, :data:`ACCOUNTING` or, for comparison,
    :data:`FORMER_ACCOUNTING`.

    Raises:
        ValueError: when the releases without DP-SGD (what was already spent, plus the
            planned push releases) already reach the target, or when no noise up to
            ``max_noise`` meets it.
    """
    formulas = {ACCOUNTING: PrivacyAccountant.epsilon,
                FORMER_ACCOUNTING: PrivacyAccountant.rdp_epsilon}
    if accounting not in formulas:
        raise ValueError(f"accounting must be one of {', '.join(formulas)}, got {accounting!r}")
    epsilon_of = formulas[accounting]
    if plan.rounds < 1 or plan.steps_per_round < 1:
        raise ValueError(f"a plan needs rounds >= 1 and steps_per_round >= 1, got {plan}")
    target, delta = plan.target_epsilon, plan.delta
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target epsilon must be positive, got {target}")
    floor = epsilon_of(plan.accountant(None, spent), delta)
    if floor >= target:
        already = epsilon_of(spent, delta) if spent is not None and len(spent) else 0.0
        raise ValueError(
            f"--target-epsilon {target:g} cannot be met: without any DP-SGD step, the releases "
            f"already spend epsilon {floor:.3g} at delta {delta:g} (earlier rounds and runs of "
            f"this client: {already:.3g}; {plan.rounds} planned push round(s) with --push-noise "
            f"{plan.push_noise:g} at rate {plan.push_rate:g}). Raise --target-epsilon or "
            "--push-noise, or lower --push-fraction"
        )

    def eps(sigma: float) -> float:
        return epsilon_of(plan.accountant(sigma, spent), delta)

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
