"""Example-level differential privacy of one client: DP-SGD, noisy pushes, the round's plan.

DP-SGD (Abadi et al. 2016, arXiv:1607.00133) through Opacus (Yousefpour et al. 2021,
arXiv:2109.12298): Opacus's hooks compute every example's gradient, its
``DPOptimizer`` clips each to ``max_grad_norm``, adds Gaussian noise and averages over
the expected batch size. Batches are drawn by Poisson sampling, as the accountant
assumes: each example joins a step independently with probability q = 1 / steps per
epoch, steps per epoch = ceil(N / batch_size) (Opacus's ``DPDataLoader`` convention),
and an empty draw is still a step: noise only, as Opacus's optimiser does it.

Why per-example clipping bounds one example's influence here: with queue negatives
(constants) and no in-batch negatives, example i's loss depends on example i alone
(:func:`common.loss.info_nce`), its positive key being a view of example i by the key
encoder or, with ``--key-mode shared``, by the trainable encoder itself. The symmetric
loss (and the shared key) runs the trainable encoder twice (view 1 and view 2 of the
same batch); Opacus keeps each forward pass's activations and sums the two passes'
per-example gradients into one per example (``tests/test_privacy.py`` checks this
against per-example autograd for each key mode). What would couple examples is refused
(:func:`check_private_training`): in-batch negatives, BatchNorm, and negatives made of
this client's own un-noised keys.

The randomness that privacy rests on (which examples a step or a push samples, the
gradient noise, the push noise) comes from the operating system's entropy
(:func:`secret_generator`), never from the run's ``--seed``: the seed is in the run
config, which the server knows.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from client.negatives import LocalQueue, NegativeSource
from client.state import ClientState
from common.accounting import WITHHELD_UNDER_DP as WITHHELD_UNDER_DP
from common.accounting import NoiseCalibration, PrivacyPlan, calibrate_noise_multiplier
from common.config import DP_REFUSED, FedConfig, TrainConfig
from common.encoders import register_opacus_grad_samplers

if TYPE_CHECKING:  # Opacus (and SciPy under it) loads in seconds: only when DP-SGD is set up
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

logger = logging.getLogger(__name__)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def secret_generator() -> torch.Generator:
    """A CPU generator seeded from the OS entropy pool (not reproducible, on purpose)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> Tensor:
    """Indices of a Poisson sample of ``range(n)``: each independently with probability ``rate``.

    Returned in random order (a shuffled release does not reveal which index is which).
    """
    chosen = torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()
    return chosen[torch.randperm(chosen.numel(), generator=generator)]


def noisy_rows(rows: Tensor, push_noise: float, generator: torch.Generator) -> Tensor:
    """normalize(normalize(rows) + N(0, push_noise^2 I)): the Gaussian mechanism on unit rows.

    Args:
        rows: (n, D) embeddings, one per example.
        push_noise: the noise std (sensitivity of a unit row under replacement: 2).

    Returns:
        (n, D) unit-norm rows; renormalising is post-processing.
    """
    unit = nn.functional.normalize(rows.float().cpu(), dim=1)  # n x D
    noise = torch.randn(unit.shape, generator=generator) * push_noise
    return nn.functional.normalize(unit + noise, dim=1)


#: Under ``--objective moment`` every DP-SGD step also releases the batch's second moment
#: (:meth:`DPSGD.noisy_moment_sum`) with noise of this many times DP-SGD's noise multiplier.
MOMENT_NOISE_RATIO = 2.0


def joint_noise_multiplier(sgd_noise: float, ratio: float = MOMENT_NOISE_RATIO) -> float:
    """The noise multiplier of a DP-SGD step that also releases the noisy second moment.

    Both releases are Gaussian mechanisms on the same Poisson batch: the clipped gradients
    (norm <= C, noise sigma C) and the outer products z z^T of unit embeddings (Frobenius
    norm 1, noise r sigma). Scaling the second by 1 / r gives one Gaussian mechanism of
    noise sigma on vectors of norm <= sqrt(1 + 1 / r^2), so the pair is accounted as one
    step of multiplier ``sigma / sqrt(1 + 1 / r^2)``.
    """
    return sgd_noise / math.sqrt(1.0 + 1.0 / ratio**2)


def sgd_noise_multiplier(joint_noise: float, ratio: float = MOMENT_NOISE_RATIO) -> float:
    """Inverse of :func:`joint_noise_multiplier`: DP-SGD's sigma for an accounted one."""
    return joint_noise * math.sqrt(1.0 + 1.0 / ratio**2)


def check_model(model: nn.Module) -> None:
    """Refuse a model whose per-example gradients Opacus cannot compute (BatchNorm)."""
    from opacus.validators import ModuleValidator

    register_opacus_grad_samplers()  # weight-standardised convs (--weight-standardization)
    was_training = model.training
    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
        raise ValueError(f"--norm batch with --dp true: {DP_REFUSED['norm']}")
    if errors:
        raise ValueError(
            "the model cannot be trained with DP-SGD: " + "; ".join(str(e) for e in errors)
        )


def check_private_training(cfg: TrainConfig, model: nn.Module,
                           sources: Sequence[NegativeSource], own_rows_noised: bool) -> None:
    """Raise ``ValueError`` for anything that would let one example move another's loss.

    Args:
        cfg: the trainer's settings (in-batch negatives, key mode).
        model: the trainable encoder.
        sources: the trainer's negative sources.
        own_rows_noised: whether this client's rows in the global queue were pushed
            with noise and accounted (then they may come back as negatives).
    """
    if cfg.in_batch:
        raise ValueError(f"--in-batch true with --dp true: {DP_REFUSED['in_batch']}")
    check_model(model)
    for source in sources:
        if isinstance(source, LocalQueue):
            raise ValueError(f"a local queue with --dp true: {DP_REFUSED['queue_size']}")
        if not getattr(source, "exclude_own", True) and not own_rows_noised:
            raise ValueError(
                "global negatives that include this client's own rows, with --dp true and "
                "--push-noise 0: those rows are un-noised keys of its own data and would "
                "couple examples like in-batch negatives; pull with exclude_own=True"
            )


class DPSGD:
    """DP-SGD with Poisson sampling for one client's N examples, through Opacus.

    Args:
        noise_multiplier: sigma, the noise std over ``max_grad_norm`` (0 only in tests:
            clipping without noise).
        max_grad_norm: C, the per-example clipping norm.
        num_examples: N, the client's examples (the sampling rate depends on it).
        batch_size: the batch size asked for; the expected Poisson batch is N q <= it.
        own_rows_noised: whether this client's pushes are noised and accounted.
        moment_noise: ``--objective moment``: the noise multiplier of the second moment
            each step releases (:meth:`noisy_moment_sum`).
        generator: a CPU generator, the source of the sampling and noise randomness
            (:func:`secret_generator` when not given; on a GPU the noise comes from a
            generator on that device seeded from it).

    Attributes:
        steps_per_epoch: ceil(N / batch_size).
        sample_rate: q = 1 / steps_per_epoch.
        expected_batch_size: N q, the denominator of the averaged noisy gradient.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        num_examples: int,
        batch_size: int,
        own_rows_noised: bool = False,
        generator: torch.Generator | None = None,
        moment_noise: float = 0.0,
    ) -> None:
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"need num_examples and batch_size >= 1, got {num_examples}, {batch_size}")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.num_examples = num_examples
        self.own_rows_noised = own_rows_noised
        self.moment_noise = moment_noise
        self.steps_per_epoch = max(1, math.ceil(num_examples / batch_size))
        self.sample_rate = 1.0 / self.steps_per_epoch
        self.expected_batch_size = num_examples * self.sample_rate
        self.generator = generator if generator is not None else secret_generator()
        self._hooks: GradSampleHooks | None = None
        self.optimizer: DPOptimizer | None = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """Hook ``model`` for per-example gradients; return ``optimizer`` made private.

        The model is hooked in place (its ``state_dict`` keys do not change).
        """
        from opacus.grad_sample import GradSampleHooks
        from opacus.optimizers import DPOptimizer

        check_model(model)
        device = next(model.parameters()).device
        noise = self.generator
        if device.type != "cpu":  # torch draws noise on a device only from that device's generator
            noise = torch.Generator(device=device).manual_seed(
                int(torch.randint(2**62, (1,), generator=self.generator))
            )
        self._hooks = GradSampleHooks(model, loss_reduction="mean")
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, loss_reduction="mean", generator=noise,
        )
        return self.optimizer

    def batches(self, n: int) -> list[Tensor]:
        """One epoch: ``steps_per_epoch`` Poisson samples of ``range(n)`` (some may be empty)."""
        if n != self.num_examples:
            raise ValueError(
                f"DP-SGD was set up for {self.num_examples} examples (its sampling rate and "
                f"accounting depend on it), got {n}"
            )
        return [poisson_sample(n, self.sample_rate, self.generator)
                for _ in range(self.steps_per_epoch)]

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()`` with the per-example hooks (mean over the batch's examples)."""
        with warnings.catch_warnings():
            # The input images need no gradient; Opacus's full backward hooks still fire.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()

    def noise_only_step(self) -> None:
        """A step on an empty Poisson batch: no example, still the Gaussian noise.

        Empty per-example gradients take Opacus's own empty-batch path in
        ``DPOptimizer.clip_and_accumulate``, so the step is what Opacus's data loader
        would have produced.
        """
        if self.optimizer is None:
            raise RuntimeError("DPSGD.attach must be called before training")
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def noisy_moment_sum(self, z: Tensor, dim: int) -> Tensor:
        """sum_i z_i z_i^T over the batch's unit embeddings, plus N(0, moment_noise^2) per entry.

        Each example adds a matrix of Frobenius norm 1 (its embedding is renormalised to
        unit norm here), so the release is a Gaussian mechanism of multiplier
        ``moment_noise`` on the step's Poisson batch (:func:`joint_noise_multiplier`).
        The noise is symmetrised afterwards (post-processing). ``z`` may hold no row.
        """
        unit = nn.functional.normalize(z.detach().float().cpu().reshape(-1, dim), dim=1)  # n x D
        noise = torch.randn((dim, dim), generator=self.generator) * self.moment_noise
        return unit.T @ unit + 0.5 * (noise + noise.T)  # D x D

    def detach(self) -> None:
        """Remove the hooks and Opacus's attributes from the model."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None


@dataclass(frozen=True)
class RoundPrivacy:
    """The DP side of one round, fixed (and accounted) before the round trains.

    Attributes:
        noise_multiplier: DP-SGD sigma of this round.
        moment_noise: ``--objective moment``: the noise multiplier of the second moment
            each step releases (0 otherwise).
        sample_rate: DP-SGD Poisson rate q.
        steps: DP-SGD steps this round (local epochs x steps per epoch).
        epsilon: the client's epsilon at ``--delta`` once this round's releases count.
        pushes_accounted: whether this round's pushes are noised and in ``epsilon``.
        pull_max_age: the age bound of this round's pulls: ``--max-age``, or less when
            rows this client pushed without noise could come back under another token.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    pushes_accounted: bool
    pull_max_age: int
    moment_noise: float = 0.0


def plan_round(cfg: FedConfig, state: ClientState, num_examples: int, server_round: int, *,
               queue_token: str, queue_version: int) -> RoundPrivacy:
    """Fix this round's DP-SGD noise and record all of the round's releases in ``state``.

    The releases are recorded before anything is released (the caller saves ``state``
    first): a round that fails half-way is over-counted, never under-counted.

    The noise is ``--noise-multiplier``, or derived from ``--target-epsilon`` for the
    plan "every round from this one to ``--rounds``" composed with what the client spent
    before; the derived noise is kept in ``state`` and reused while the plan holds.

    Un-noised own rows: pulls leave out the rows of this node's contributor slot, but a
    restarted node or a resumed server run hands the client a new token, hence a new
    slot, and rows it pushed without noise before are no longer recognised as its own.
    ``state`` remembers at which version each token last pushed such rows, and the
    round's pulls are limited to versions after the latest of them (``pull_max_age``).
    """
    if not cfg.dp:
        raise ValueError("plan_round needs --dp true")
    steps_per_epoch = max(1, math.ceil(num_examples / cfg.batch_size))
    sample_rate = 1.0 / steps_per_epoch
    steps = cfg.local_epochs * steps_per_epoch
    pushes_accounted = cfg.push_noise > 0 and cfg.push_fraction > 0
    moment = cfg.objective == "moment"
    # sigma: the noise multiplier the accountant records per step (for the moment
    # objective the joint one of the gradient and the released second moment).
    sigma = cfg.noise_multiplier
    if moment and sigma > 0:
        sigma = joint_noise_multiplier(sigma)
    if sigma == 0:
        plan = PrivacyPlan(
            rounds=max(1, cfg.rounds - server_round + 1), steps_per_round=steps,
            sample_rate=sample_rate, push_rate=cfg.push_fraction if pushes_accounted else 0.0,
            push_noise=cfg.push_noise if pushes_accounted else 0.0, delta=cfg.delta,
            target_epsilon=cfg.target_epsilon,
        )
        calibration = state.calibration
        if calibration is not None and calibration.holds_for(plan, server_round):
            sigma = calibration.noise_multiplier
        else:
            sigma = calibrate_noise_multiplier(plan, state.accountant)
            logger.info(
                "client %s: DP-SGD noise multiplier %.4g for --target-epsilon %g over rounds "
                "%d..%d (%d steps per round at q = %.4g)", state.client_id, sigma,
                cfg.target_epsilon, server_round, server_round + plan.rounds - 1, steps, sample_rate,
            )
            calibration = NoiseCalibration(plan, server_round, sigma, server_round)
        state.calibration = NoiseCalibration(calibration.plan, calibration.first_round, sigma,
                                             server_round)
    state.accountant.record_steps(sigma, sample_rate, steps)
    if pushes_accounted:
        state.accountant.record_push(cfg.push_noise, cfg.push_fraction)
    elif cfg.push_fraction > 0:
        logger.warning(
            "client %s: pushes are NOT covered by differential privacy (--push-noise 0): the "
            "reported epsilon covers DP-SGD only, and the pushed rows are un-noised embeddings "
            "of this client's examples", state.client_id,
        )

    token = hashlib.sha256(queue_token.encode()).hexdigest()[:16]
    # Rows at versions < queue_version - max_age are evicted; rows at this version or
    # later cannot predate this token (a resumed queue holds only earlier versions).
    live = {t: v for t, v in state.unnoised_pushes.items()
            if queue_version - cfg.max_age <= v < queue_version}
    # With noised pushes the client pulls its own slot too, so every token counts.
    unrecognised = [v for t, v in live.items() if pushes_accounted or t != token]
    pull_max_age = cfg.max_age
    if unrecognised:
        pull_max_age = min(cfg.max_age, queue_version - max(unrecognised) - 1)
        logger.info("client %s: pulling only rows newer than version %d, which it pushed "
                    "without noise under another queue token", state.client_id, max(unrecognised))
    if not pushes_accounted and cfg.push_fraction > 0:
        live[token] = queue_version
    state.unnoised_pushes = live
    sgd_noise = sgd_noise_multiplier(sigma) if moment else sigma
    return RoundPrivacy(sgd_noise, sample_rate, steps, state.accountant.epsilon(cfg.delta),
                        pushes_accounted, pull_max_age,
                        moment_noise=MOMENT_NOISE_RATIO * sgd_noise if moment else 0.0)
