"""The local contrastive trainer: pure PyTorch, no Flower, no gRPC.

One step: two augmented views of a batch, queries from the trainable encoder,
positive keys from the key encoder, InfoNCE against the negatives of every
source (the global queue, a local FIFO queue) and, optionally, in-batch
negatives. Key modes:

- ``shared``: the key is the trainable encoder itself, gradients through both
  views (SimCLR, Chen et al. 2020).
- ``ema``: a momentum copy, updated after every step (MoCo, He et al. 2020); with
  ``--key-sync server`` it persists across rounds, averaged at the server
  (:mod:`common.key_state`).
- ``frozen``: a copy fixed for the trainer's lifetime (in federation: the global
  encoder received this round, so keys and pushed rows share one version).

With ``--objective moment`` the negatives of every query are unit vectors drawn from
N(0, M), M a running second moment of the keys (each step's keys weigh
``SECOND_MOMENT_RATE``), plus any rows of the sources: a repulsion that follows the key
encoder, as MoCo's local queue does, while no example's loss reads another example of its
batch. Under DP-SGD each step's contribution to M is released with Gaussian noise (the
"Analyze Gauss" release of a second moment, Dwork, Talwar, Thakurta & Zhang, STOC 2014)
and accounted with the step (:func:`client.privacy.joint_noise_multiplier`).

With a :class:`client.privacy.DPSGD`, steps are DP-SGD steps: Poisson-sampled
batches, per-example clipping and Gaussian noise (see :mod:`client.privacy`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from client.negatives import NegativeSource
from client.privacy import DPSGD, check_private_training
from common import key_state
from common.config import TrainConfig
from common.encoders import ContrastiveModel
from common.loss import info_nce
from common.plugins import make_views
from common.schedule import cosine_lr as cosine_lr

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]

#: Weight of a step's keys in the running second moment of ``--objective moment``.
SECOND_MOMENT_RATE = 0.1
#: Negatives drawn from that second moment per step.
MOMENT_SAMPLES = 1024


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class EpochStats:
    """What one pass over the data measured."""

    loss: float
    steps: int
    examples: int
    mean_negatives: float
    steps_without_negatives_from_sources: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "steps": self.steps,
            "examples": self.examples,
            "mean_negatives": self.mean_negatives,
            "steps_without_source_negatives": self.steps_without_negatives_from_sources,
            **self.extra,
        }


@torch.no_grad()
def moment_draws(second_moment: Tensor, count: int,
                 generator: torch.Generator | None = None) -> Tensor:
    """``count`` unit vectors normalize(N(0, M+)) on the CPU, M+ the second moment (D, D)
    with its negative eigenvalues (a noisy release's) set to 0; (count, D). ``generator``
    ``None``: torch's global one."""
    vals, vecs = torch.linalg.eigh(second_moment.double().cpu())
    root = (vecs * vals.clamp(min=0).sqrt()).float()  # D x D, root @ root.T = M+
    eps = torch.randn(count, root.shape[0], generator=generator)
    return nn.functional.normalize(eps @ root.T, dim=1)


class ContrastiveTrainer:
    """Train ``model`` with InfoNCE on views of local data.

    Args:
        model: the trainable encoder (queries).
        cfg: temperature, batch size, optimiser, views, key mode, in-batch negatives.
        device: where the step runs (data is moved batch by batch).
        sources: negative sources consulted every step, in order (their banks are
            concatenated); each also observes the step's keys.
        key_model: the key encoder for ``ema`` / ``frozen`` modes; a copy of ``model``
            is made when not given. Ignored in ``shared`` mode.
        lr_schedule: maps the trainer's global step to a learning rate (constant
            ``cfg.lr`` when not given).
        generator: the CPU generator that draws views and batch order.
        optimizer: the optimiser (:func:`make_optimizer` of ``cfg`` when not given).
        dp: train with DP-SGD: batches by Poisson sampling, per-example clipping and
            noise. Refused (``ValueError``) with in-batch negatives, a model with
            BatchNorm, or a source of this client's own un-noised keys.
    """

    def __init__(
        self,
        model: ContrastiveModel,
        cfg: TrainConfig,
        *,
        device: torch.device,
        sources: Sequence[NegativeSource] = (),
        key_model: ContrastiveModel | None = None,
        lr_schedule: Callable[[int], float] | None = None,
        generator: torch.Generator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        dp: DPSGD | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.sources = list(sources)
        if cfg.key_mode == "shared":
            self.key_model: ContrastiveModel | None = None
        else:
            self.key_model = (key_model if key_model is not None else copy.deepcopy(model)).to(device)
            self.key_model.requires_grad_(False)
            self.key_model.eval()
        self.optimizer = optimizer if optimizer is not None else make_optimizer(self.model, cfg)
        self.dp = dp
        if dp is not None:
            check_private_training(cfg, self.model, self.sources, dp.own_rows_noised)
            self.optimizer = dp.attach(self.model, self.optimizer)
        self.lr_schedule = lr_schedule or (lambda _step: cfg.lr)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        self.augment = make_views(cfg)
        self.step = 0
        self.moment_negatives = getattr(cfg, "objective", "infonce") == "moment"
        if self.moment_negatives:
            d = self.model.embedding_dim
            self.second_moment = torch.eye(d, device=device) / d  # D x D, isotropic at first

    # -- one step -------------------------------------------------------------------

    def _keys(self, view: Tensor) -> Tensor:
        if self.key_model is None:
            return self.model(view)
        with torch.no_grad():
            return self.key_model(view)

    def _bank(self) -> tuple[Tensor | None, bool]:
        """Concatenate the sources' negatives (K, D); also whether any source had rows."""
        banks = []
        for s in self.sources:
            bank = s.negatives(self.step, self.device)
            if bank is not None and bank.numel() > 0:
                banks.append(bank)
        if not banks:
            return None, False
        return torch.cat(banks).detach(), True  # K x D, constants for the loss

    def loss_on(self, x: Tensor, negatives: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-example loss on a batch ``x`` (N, C, ...); returns (loss (N,), keys of view 2)."""
        v1 = self.augment(x, self.generator)
        v2 = self.augment(x, self.generator)
        return self.view_loss(v1, v2, negatives)

    def view_loss(self, v1: Tensor, v2: Tensor, negatives: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-example loss of two views (N, C, ...) of a batch; returns (loss (N,), keys of v2).

        ``negatives`` (K, D) enter at the queue temperature, weighted by the config's
        ``hard_negative_beta``. With ``symmetric``, the trainable model runs on both
        views: two forward passes whose per-example gradients add up (what DP-SGD clips
        is their sum per example).
        """
        loss_kwargs = {"in_batch": self.cfg.in_batch,
                       "hard_negative_beta": self.cfg.hard_negative_beta,
                       "queue_temperature": self.cfg.queue_temperature or None,
                       "negative_weight": self.cfg.negative_weight}
        q1 = self.model(v1)  # N x D
        k2 = self._keys(v2)  # N x D
        loss = info_nce(q1, k2, negatives, self.cfg.temperature, **loss_kwargs)
        if self.cfg.symmetric:
            q2 = self.model(v2) if self.key_model is not None else k2
            k1 = self._keys(v1) if self.key_model is not None else q1
            loss = 0.5 * (loss + info_nce(q2, k1, negatives, self.cfg.temperature, **loss_kwargs))
        return loss, k2.detach()

    def train_step(self, x: Tensor) -> tuple[float, int, bool]:
        """One optimiser step on the batch; returns (mean loss, negatives used, had source rows).

        Under DP-SGD an empty batch (a Poisson draw of no example) is a noise-only step.
        """
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_schedule(self.step)
        if self.dp is not None and x.shape[0] == 0:
            self.dp.noise_only_step()
            if self.moment_negatives:  # the step's release of the second moment: noise only
                self._update_second_moment(torch.zeros(0, self.model.embedding_dim))
            self._momentum_update()
            self.step += 1
            return 0.0, 0, False
        negatives, had_rows = self._negatives(x.shape[0])
        x = x.to(self.device, non_blocking=True)
        loss, keys = self.loss_on(x, negatives)
        mean = loss.mean()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dp is not None:
            self.dp.backward(mean)
        else:
            mean.backward()
        self.optimizer.step()
        self._momentum_update()
        if self.moment_negatives:
            self._update_second_moment(keys)
        for s in self.sources:
            s.observe(keys)
        self.step += 1
        return float(mean.detach()), 0 if negatives is None else int(negatives.shape[0]), had_rows

    def _negatives(self, batch_size: int) -> tuple[Tensor | None, bool]:
        """The step's negatives (K, D) and whether a source had rows (:meth:`_bank`), or
        random unit vectors when there would be none; with ``--objective moment`` the
        sources' rows and ``MOMENT_SAMPLES`` draws from the running second moment."""
        negatives, had_rows = self._bank()
        if self.moment_negatives:  # the queue's rows (if any) and the second moment's samples
            samples = self._moment_samples(MOMENT_SAMPLES)
            return (samples if negatives is None else torch.cat([negatives, samples])), had_rows
        if negatives is None and not self.cfg.in_batch and batch_size > 0:
            # No in-batch negatives and every source empty (round 1 of a fresh queue,
            # an unreachable service): random unit vectors are data-independent
            # negatives that keep the loss defined without touching private data. Their
            # number is fixed by the config, not the batch: under DP the batch size is a
            # Poisson draw, and one example's loss must not depend on how many others came.
            count = max(1, getattr(self.cfg, "global_negatives", 0) or self.cfg.batch_size)
            negatives = nn.functional.normalize(
                torch.randn(count, self.model.embedding_dim, generator=self.generator), dim=1,
            ).to(self.device)
        return negatives, had_rows

    @torch.no_grad()
    def _moment_samples(self, count: int) -> Tensor:
        """``count`` draws of :func:`moment_draws` from the running second moment; (count, D)."""
        return moment_draws(self.second_moment, count, self.generator).to(self.device)

    @torch.no_grad()
    def _update_second_moment(self, z: Tensor) -> None:
        """M <- (1 - a) M + a mean_i z_i z_i^T over this step's embeddings (the next step's M);
        under DP-SGD the batch's sum is released with noise (:meth:`DPSGD.noisy_moment_sum`)."""
        rate = SECOND_MOMENT_RATE
        if self.dp is not None:  # released with noise, over the expected Poisson batch
            d = self.second_moment.shape[0]
            batch = (self.dp.noisy_moment_sum(z, d) / self.dp.expected_batch_size).to(self.device)
        else:
            batch = z.T @ z / max(1, z.shape[0])  # D x D
        self.second_moment.mul_(1 - rate).add_(batch, alpha=rate)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """k <- m k + (1 - m) q, MoCo's key-encoder update (ema mode only)."""
        if self.cfg.key_mode != "ema" or self.key_model is None:
            return
        # A key encoder kept across rounds (--key-sync server) follows the buffers too: its
        # BatchNorm statistics would otherwise stay those of round 1's copy.
        key_state.momentum_step(self.key_model, self.model, self.cfg.key_momentum,
                                buffers=key_state.enabled(self.cfg))

    # -- epochs ---------------------------------------------------------------------

    def train_epoch(self, x: Tensor, on_step: StepCallback | None = None) -> EpochStats:
        """One shuffled pass over ``x`` (N, C, ...) in batches; the last short batch is dropped
        when it would hold fewer than 2 examples (InfoNCE needs a batch to contrast).

        Under DP-SGD: ``dp.steps_per_epoch`` Poisson-sampled batches instead, every one a
        step, empty or not (the accountant counts them all).
        """
        n = x.shape[0]
        if self.dp is not None:
            batches = self.dp.batches(n)
        else:
            order = torch.randperm(n, generator=self.generator)
            bs = self.cfg.batch_size
            batches = [order[i : i + bs] for i in range(0, n, bs)]
            if len(batches) > 1 and len(batches[-1]) < 2:
                batches.pop()
        total_loss, total_neg, empty, seen = 0.0, 0, 0, 0
        for i, idx in enumerate(batches):
            loss, k, had_rows = self.train_step(x[idx])
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss} at step {self.step}: lower --lr or raise --temperature"
                )
            total_loss += loss * len(idx)
            total_neg += k
            empty += int(bool(self.sources) and not had_rows and len(idx) > 0)
            seen += len(idx)
            if on_step is not None:
                on_step(i + 1, len(batches), loss)
        steps = max(1, len(batches))
        return EpochStats(
            loss=total_loss / max(1, seen), steps=len(batches), examples=seen,
            mean_negatives=total_neg / steps, steps_without_negatives_from_sources=empty,
        )
