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

With ``--neighbour-weight`` w > 0 (FedConfig only), a step whose sources had rows adds w
times :func:`common.loss.neighbour_info_nce`: each query's positive is also the pulled row
nearest its positive key (Wu et al. 2022's neighbourhood matching, NNCLR's positive).

With ``prototypes`` (the round's (K, D) centroids of the queue's rows, ``--prototypes``,
FedConfig only), every step adds ``--prototype-weight`` times
:func:`common.loss.prototype_loss`: the query predicts the other view's sharpened
assignment to them (Orchestra's global clusters, SwAV's swapped prediction).

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

from client.negatives import AgedNegativeSource, NegativeSource
from client.privacy import DPSGD, check_private_training
from common import key_state
from common.config import FedConfig, TrainConfig
from common.encoders import ContrastiveModel
from common.loss import (
    NegativeOptions,
    info_nce,
    neighbour_info_nce,
    prototype_loss,
    staleness_log_weights,
)
from common.plugins import make_views
from common.schedule import cosine_lr as cosine_lr

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]


def negative_options(cfg: TrainConfig) -> NegativeOptions:
    """How the loss treats each query's negatives, as a config asks (see :func:`info_nce`)."""
    return NegativeOptions(
        false_negative_mode=cfg.false_negative_mode,
        false_negative_top_k=cfg.false_negative_top_k,
        false_negative_threshold=cfg.false_negative_threshold,
        debias_tau_plus=cfg.debias_tau_plus,
        hard_negative_beta=cfg.hard_negative_beta,
    )


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
            noise. Refused (``ValueError``) with in-batch negatives, a shared key, a
            model with BatchNorm, or a source of this client's own un-noised keys.
        prototypes: (K, D) unit-norm prototypes of the round (``--prototypes``), constants
            of the prototype term; ``None``: no such term.
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
        prototypes: Tensor | None = None,
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
        self.loss_options = negative_options(cfg)
        # Only the global queue's rows have ages; gamma^age weighs them (FedConfig only).
        self.staleness_gamma = cfg.staleness_gamma if isinstance(cfg, FedConfig) else 1.0
        # Neighbourhood matching: weight of the term whose positives are pulled rows.
        self.neighbour_weight = cfg.neighbour_weight if isinstance(cfg, FedConfig) else 0.0
        self.rows_pulled = False  # whether this step's negatives are sources' rows
        # Prototypes: the round's shared centroids (K x D) and their term's weight.
        self.prototypes = None if prototypes is None else prototypes.detach().to(device)
        self.prototype_weight = cfg.prototype_weight if isinstance(cfg, FedConfig) else 0.0
        self.step = 0

    # -- one step -------------------------------------------------------------------

    def _keys(self, view: Tensor) -> Tensor:
        if self.key_model is None:
            return self.model(view)
        with torch.no_grad():
            return self.key_model(view)

    def _bank(self) -> tuple[Tensor | None, Tensor | None, bool]:
        """Concatenate the sources' negatives (K, D); also their log-weights (K,) under
        staleness weighting (``None`` otherwise), and whether any source had rows."""
        banks, ages = [], []
        for s in self.sources:
            bank = s.negatives(self.step, self.device)
            if bank is None or bank.numel() == 0:
                continue
            banks.append(bank)
            if self.staleness_gamma < 1:
                age = s.ages() if isinstance(s, AgedNegativeSource) else None
                ages.append(torch.zeros(bank.shape[0], dtype=torch.int64) if age is None else age)
        if not banks:
            return None, None, False
        log_weights = (staleness_log_weights(torch.cat(ages), self.staleness_gamma).to(self.device)
                       if ages else None)  # K
        return torch.cat(banks).detach(), log_weights, True  # K x D, constants for the loss

    def loss_on(
        self, x: Tensor, negatives: Tensor | None, negative_log_weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-example loss on a batch ``x`` (N, C, ...); returns (loss (N,), keys of view 2)."""
        v1 = self.augment(x, self.generator)
        v2 = self.augment(x, self.generator)
        return self.view_loss(v1, v2, negatives, negative_log_weights)

    def view_loss(
        self,
        v1: Tensor,
        v2: Tensor,
        negatives: Tensor | None,
        negative_log_weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-example loss of two views (N, C, ...) of a batch; returns (loss (N,), keys of v2).

        ``negatives`` (K, D) enter with ``negative_log_weights`` (K,) and the config's
        :class:`NegativeOptions`. With ``symmetric``, the trainable model runs on both
        views: two forward passes whose per-example gradients add up (what DP-SGD clips
        is their sum per example). When ``rows_pulled`` (the negatives are the sources'
        rows, not random ones) and the neighbour weight is > 0, the neighbour term is
        added (:meth:`_neighbour_loss`); with prototypes and a prototype weight > 0, the
        prototype term (:meth:`_prototype_loss`).
        """
        loss_kwargs = {"in_batch": self.cfg.in_batch, "options": self.loss_options,
                       "negative_log_weights": negative_log_weights,
                       "queue_temperature": self.cfg.queue_temperature or None}
        q1 = self.model(v1)  # N x D
        k2 = self._keys(v2)  # N x D
        loss = info_nce(q1, k2, negatives, self.cfg.temperature, **loss_kwargs)
        pairs = [(q1, k2)]
        if self.cfg.symmetric:
            q2 = self.model(v2) if self.key_model is not None else k2
            k1 = self._keys(v1) if self.key_model is not None else q1
            loss = 0.5 * (loss + info_nce(q2, k1, negatives, self.cfg.temperature, **loss_kwargs))
            pairs.append((q2, k1))
        if self.neighbour_weight > 0 and self.rows_pulled and negatives is not None:
            loss = loss + self.neighbour_weight * self._neighbour_loss(pairs, negatives, loss_kwargs)
        if self.prototypes is not None and self.prototype_weight > 0:
            loss = loss + self.prototype_weight * self._prototype_loss(pairs)
        return loss, k2.detach()

    def _prototype_loss(self, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """(N,) :func:`prototype_loss` of each (query, key of the other view) pair against the
        round's prototypes, averaged over the pairs as the loss is over view orders."""
        terms = [prototype_loss(q, k, self.prototypes, self.cfg.temperature) for q, k in pairs]
        return sum(terms) / len(terms)

    def _neighbour_loss(self, pairs: list[tuple[Tensor, Tensor]], rows: Tensor,
                        loss_kwargs: dict) -> Tensor:
        """(N,) :func:`neighbour_info_nce` of each (query, key of the other view) pair, averaged
        over the pairs as the loss is over view orders (Wu et al. 2022, arXiv 2111.10763)."""
        terms = [neighbour_info_nce(q, k, rows, self.cfg.temperature, **loss_kwargs)
                 for q, k in pairs]
        return sum(terms) / len(terms)

    def train_step(self, x: Tensor) -> tuple[float, int, bool]:
        """One optimiser step on the batch; returns (mean loss, negatives used, had source rows).

        Under DP-SGD an empty batch (a Poisson draw of no example) is a noise-only step.
        """
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_schedule(self.step)
        if self.dp is not None and x.shape[0] == 0:
            self.dp.noise_only_step()
            self._momentum_update()
            self.step += 1
            return 0.0, 0, False
        negatives, log_weights, had_rows = self._negatives(x.shape[0])
        self.rows_pulled = had_rows
        x = x.to(self.device, non_blocking=True)
        loss, keys = self.loss_on(x, negatives, log_weights)
        mean = loss.mean()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dp is not None:
            self.dp.backward(mean)
        else:
            mean.backward()
        self.optimizer.step()
        self._momentum_update()
        for s in self.sources:
            s.observe(keys)
        self.step += 1
        return float(mean.detach()), 0 if negatives is None else int(negatives.shape[0]), had_rows

    def _negatives(self, batch_size: int) -> tuple[Tensor | None, Tensor | None, bool]:
        """The step's negatives (K, D), their log-weights and whether a source had rows
        (:meth:`_bank`), or random unit vectors when there would be none."""
        negatives, log_weights, had_rows = self._bank()
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
        return negatives, log_weights, had_rows

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
