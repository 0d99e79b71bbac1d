"""Per-example objectives on one client, in process: what each keeps of the default loss's gain.

The arms of ``bench/results/per_example_pilots.md`` (from its section "Where the default
loss's gain comes from" on): one client trains with :func:`client.train_local.train_local`
from the encoder pretrained on synthetic images (``--pretrain-epochs``), with the loss,
the negatives or the optimiser step each arm names, and is evaluated on the held-out
images. The table gives each arm's figures (mean over seeds), its gain over the start
(± half the range over seeds) and the share of the ``--reference`` arm's gain at the same
seeds: linear probe / kNN on the backbone, retrieval on the head.

    python -m bench.objective_pilots --arms default moment detneg_u2 --seeds 0 1 2
        [--data PATH.npz] [--train 5000] [--test 5000] [--epochs 8] [--out DIR]

An arm is ``BASE[_u<L>][_e<EPS>][_ri]``:

- ``default``: the default loss (in-batch negatives, one network for both views,
  temperature 0.1); ``t<T>``: the same at temperature T.
- ``moment``: ``--objective moment`` as ``--dp true`` trains it (:data:`common.config.DP_LOSS`).
- ``localq``: MoCo's local queue, 1,024 of the client's own momentum keys, temperature 0.2.
- ``detneg``: the default loss with its in-batch negatives detached (gradients through the
  query and its positive only). Not per example: its negatives are the batch's embeddings.
- ``batchmoment``: one network for both views, 1,024 negatives drawn from this batch's own
  second moment (detached); ``batchmoment-ema``: a momentum key, negatives from the second
  moment of this batch's keys; ``batchmix``: one network, negatives from a 16-cluster
  mixture fitted to this batch (3 Lloyd steps).
- ``mix<K>``: the moment objective with its negatives drawn from a running mixture of K
  clusters of the keys (sums and counts, which a step could release with noise as it does
  the second moment; kept here without noise).
- ``pred``: the moment objective with a predictor on the query side (a D-4D-D MLP; MoCo v3,
  Chen, Xie & He 2021).
- ``synthetic``: one network for both views; negatives are this network's embeddings
  (detached) of one view each of 512 dead-leaves images drawn per step from 10,000
  (:mod:`common.synthetic`, Baradad et al. 2021); ``synthetic-grad``: with gradients
  through them (not per example under DP-SGD).
- ``fifo<Q>``: one network for both views; negatives are the last Q online embeddings of
  earlier batches (both views, detached): ``detneg`` with the batch replaced by earlier
  ones. Not DP-safe (un-noised rows of the client's own data).
- ``detneg-noise<S>``: ``detneg`` with each detached row released as normalize(z + N(0,
  S^2 I)) before it serves as a negative (the positive stays exact): how much noise the
  batch's rows stand, as a Gaussian release of them would add.
- ``logitdp<T>``: the default loss at temperature T, its exact mean gradient plus the
  Gaussian noise logit-level DP would add (Kong, Munoz Medina & Ribero 2023, arXiv
  2310.03104) at multiplier ``--logit-dp-sigma``: std sigma x S x C / T per coordinate with
  S = 1/n + min(2 e^(2/T) / (n + e^(2/T) - 1), 2), C the median norm of 64 pairwise
  similarity gradients of the first batch. No clipping: an optimistic proxy.

Modifiers: ``_u<L>`` adds the log-sum-exp of each query's logits against its (detached)
negatives L - 1 more times (alignment plus L times the uniformity term, Wang & Isola 2020);
``_e<EPS>`` trains with DP-SGD (Poisson batches, clip 1), the gradient and the
second-moment release calibrated together to epsilon EPS at delta 1e-5 over the run's
steps (the per-example arms only: ``moment``, ``pred``, ``synthetic``; the sampling and
noise come from a generator seeded by the run's seed, so that a pilot repeats and arms of
one seed share their batches and noise draws, where the package draws them from the
operating system's entropy);
``_ri`` starts from random init instead of the pretrained
encoder.

Each finished (arm, seed) is kept in ``--out`` and reused by the same command, so a
stopped run goes on where it stopped. Writes ``bench/results/<name>.{md,json,png}`` (the
plot: each arm's gain over the start, seeds as dots, one sampling error shaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.common import CIFAR_DATA, RESULTS_DIR, write_result
from bench.compare_bench import write_slice
from client.privacy import DPSGD, MOMENT_NOISE_RATIO, sgd_noise_multiplier
from client.train_local import train_local
from client.trainer import ContrastiveTrainer, moment_draws
from common.accounting import PrivacyPlan, calibrate_noise_multiplier
from common.config import DP_LOSS, FedConfig
from common.datasets import DatasetError, load_dataset
from common.loss import info_nce
from common.synthetic import CACHE_ENV, dead_leaves

#: Figures read off each run: linear probe, kNN, retrieval, head uniformity.
KEYS = ("linear_probe_backbone", "knn_backbone", "retrieval_head", "uniformity_head")
MOMENT = {**DP_LOSS}
LOCAL_QUEUE = {"objective": "infonce", "in_batch": False, "key_mode": "ema", "temperature": 0.2,
               "queue_temperature": 0.0, "queue_size": 1024}
#: Negatives drawn per step by the arms that draw them (as ``--objective moment`` does).
DRAWS = 1024
SYNTHETIC_BANK, SYNTHETIC_PER_STEP = 10_000, 512
MIX_RATE = 0.1  # weight of a step in the running mixture, as SECOND_MOMENT_RATE


def nce(q: Tensor, k: Tensor, negatives: Tensor | None, tau: float, weight: float = 1.0,
        **kwargs: Any) -> Tensor:
    """InfoNCE with its negative term weighed ``weight`` times (``negative_weight``)."""
    return info_nce(q, k, negatives, tau, negative_weight=weight, **kwargs)


def gaussian_draws(z: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """``count`` unit vectors normalize(N(0, mean z z^T)) of the rows of ``z``."""
    return moment_draws(z.T @ z / z.shape[0], count, gen)


def mixture_draws(means: Tensor, weights: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """Unit vectors from K clusters: mean mu_c plus isotropic spread sqrt((1 - |mu_c|^2) / D)
    per coordinate (the spread a unit vector's cluster of that mean length has), cluster c
    drawn by ``weights``."""
    rho2 = (means * means).sum(1).clamp(max=1.0)
    spread = ((1 - rho2).clamp(min=0) / means.shape[1]).sqrt()
    w = weights.clamp(min=0) + 1e-9
    idx = torch.multinomial(w / w.sum(), count, replacement=True, generator=gen)
    eps = torch.randn(count, means.shape[1], generator=gen)
    return nn.functional.normalize(means[idx] + spread[idx, None] * eps, dim=1)


class Pilot(ContrastiveTrainer):
    """The trainer with the negative term weighed ``weight`` times (``_u<L>``)."""

    weight = 1.0
    seed = 0

    def view_loss(self, v1: Tensor, v2: Tensor, negatives: Tensor | None) -> tuple[Tensor, Tensor]:
        kw = {"in_batch": self.cfg.in_batch, "hard_negative_beta": self.cfg.hard_negative_beta,
              "queue_temperature": self.cfg.queue_temperature or None}
        tau = self.cfg.temperature
        q1, k2 = self.model(v1), self._keys(v2)
        loss = nce(q1, k2, negatives, tau, self.weight, **kw)
        if not self.cfg.symmetric:
            return loss, k2.detach()
        q2 = self.model(v2) if self.key_model is not None else k2
        k1 = self._keys(v1) if self.key_model is not None else q1
        return 0.5 * (loss + nce(q2, k1, negatives, tau, self.weight, **kw)), k2.detach()

    def pair(self, v1: Tensor, v2: Tensor, negatives: Tensor, tau: float) -> Tensor:
        """One network for both views, gradients through both sides of the positive."""
        q1, q2 = self.model(v1), self.model(v2)
        return 0.5 * (nce(q1, q2, negatives, tau, self.weight)
                      + nce(q2, q1, negatives, tau, self.weight))


class DetachedNegatives(Pilot):
    """``detneg``: the default loss (temperature 0.1) with its in-batch negatives detached.

    It runs under the moment objective's settings, as in the results file: the key encoder
    and the second-moment draws are made and not used."""

    tau = 0.1
    noise = 0.0  # detneg-noise<S>: each detached row released as normalize(z + N(0, S^2 I))

    def view_loss(self, v1, v2, negatives):
        q1, q2 = self.model(v1), self.model(v2)
        n, tau = q1.shape[0], self.tau
        z = torch.cat([q1, q2])
        rows = z.detach()
        if self.noise:
            rows = nn.functional.normalize(
                rows + self.noise * torch.randn(rows.shape, generator=self.generator), dim=1)
        logits = (z @ rows.T) / tau
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        pos_idx = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        rows = torch.arange(2 * n)
        pos = (z * z[pos_idx]).sum(1) / tau  # gradient through both sides of the positive
        logits[rows, pos_idx] = pos
        loss = torch.logsumexp(logits, 1) - pos
        if self.weight != 1.0:
            neg = logits.clone()
            neg[rows, pos_idx] = float("-inf")
            loss = loss + (self.weight - 1.0) * torch.logsumexp(neg, 1)
        return 0.5 * (loss[:n] + loss[n:]), q2.detach()


class BatchMoment(Pilot):
    """``batchmoment`` / ``batchmoment-ema`` / ``batchmix``: negatives from this batch."""

    tau = 0.2
    source = "moment"  # "moment", "moment-ema" or "mix"

    def view_loss(self, v1, v2, negatives):
        if self.source == "moment-ema":
            q1, q2 = self.model(v1), self.model(v2)
            k1, k2 = self._keys(v1), self._keys(v2)
            neg = gaussian_draws(torch.cat([k1, k2]).detach(), DRAWS, self.generator)
            return 0.5 * (nce(q1, k2, neg, self.tau, self.weight)
                          + nce(q2, k1, neg, self.tau, self.weight)), k2.detach()
        q1, q2 = self.model(v1), self.model(v2)
        z = torch.cat([q1, q2]).detach()
        if self.source == "mix":
            centres = z[torch.randperm(z.shape[0], generator=self.generator)[:16]]
            for _ in range(3):
                assign = (z @ centres.T).argmax(1)
                sums = torch.zeros_like(centres).index_add_(0, assign, z)
                counts = torch.bincount(assign, minlength=16).float()
                centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
            neg = mixture_draws(centres, counts, DRAWS, self.generator)
        else:
            neg = gaussian_draws(z, DRAWS, self.generator)
        return 0.5 * (nce(q1, q2, neg, self.tau, self.weight)
                      + nce(q2, q1, neg, self.tau, self.weight)), q2.detach()


class RunningMixture(Pilot):
    """``mix<K>``: the moment objective's draws from a running K-cluster mixture of the keys."""

    clusters = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k, d = self.clusters, self.model.embedding_dim
        g = torch.Generator().manual_seed(1000 + self.seed)
        self.mix_sums = nn.functional.normalize(torch.randn(k, d, generator=g), dim=1) / k
        self.mix_counts = torch.full((k,), 1.0 / k)

    def _means(self) -> Tensor:
        return self.mix_sums / self.mix_counts.clamp(min=1e-6)[:, None]

    @torch.no_grad()
    def _moment_samples(self, count: int) -> Tensor:
        return mixture_draws(self._means(), self.mix_counts, count, self.generator).to(self.device)

    @torch.no_grad()
    def _update_second_moment(self, z: Tensor) -> None:
        super()._update_second_moment(z)
        z = z.detach().cpu()
        if z.shape[0] == 0:
            return
        k = self.clusters
        assign = (z @ nn.functional.normalize(self._means(), dim=1).T).argmax(1)
        sums = torch.zeros_like(self.mix_sums).index_add_(0, assign, z) / z.shape[0]
        counts = torch.bincount(assign, minlength=k).float() / z.shape[0]
        self.mix_sums.mul_(1 - MIX_RATE).add_(sums, alpha=MIX_RATE)
        self.mix_counts.mul_(1 - MIX_RATE).add_(counts, alpha=MIX_RATE)
        dead = self.mix_counts < 0.05 / k  # an emptied cluster restarts at a second-moment draw
        if dead.any():
            new = moment_draws(self.second_moment, int(dead.sum()))
            self.mix_counts[dead] = 1.0 / k
            self.mix_sums[dead] = new * 0.5 / k


class Predictor(Pilot):
    """``pred``: a predictor MLP on the query side (MoCo v3)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        d = self.model.embedding_dim
        torch.manual_seed(2000 + self.seed)
        self.predictor = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)).to(self.device)
        self.optimizer.add_param_group({"params": list(self.predictor.parameters())})

    def view_loss(self, v1, v2, negatives):
        kw = {"in_batch": self.cfg.in_batch, "hard_negative_beta": self.cfg.hard_negative_beta,
              "queue_temperature": self.cfg.queue_temperature or None}
        tau = self.cfg.temperature

        def query(v: Tensor) -> Tensor:
            return nn.functional.normalize(self.predictor(self.model(v)), dim=1)

        k2, k1 = self._keys(v2), self._keys(v1)
        return 0.5 * (nce(query(v1), k2, negatives, tau, self.weight, **kw)
                      + nce(query(v2), k1, negatives, tau, self.weight, **kw)), k2.detach()


class Synthetic(Pilot):
    """``synthetic`` / ``synthetic-grad``: negatives from public dead-leaves images."""

    tau = 0.1
    gradient = False
    bank: Tensor | None = None

    def view_loss(self, v1, v2, negatives):
        q1, q2 = self.model(v1), self.model(v2)
        idx = torch.randint(len(self.bank), (SYNTHETIC_PER_STEP,), generator=self.generator)
        views = self.augment(self.bank[idx], self.generator).to(self.device)
        with torch.set_grad_enabled(self.gradient):
            neg = self.model(views)
        return 0.5 * (nce(q1, q2, neg, self.tau, self.weight)
                      + nce(q2, q1, neg, self.tau, self.weight)), q2.detach()


class Fifo(Pilot):
    """``fifo<Q>``: negatives are the last Q online embeddings of earlier batches."""

    size = 512
    tau = 0.1

    def view_loss(self, v1, v2, negatives):
        q1, q2 = self.model(v1), self.model(v2)
        bank = getattr(self, "fifo", None)
        if bank is None:  # random unit vectors until the batches fill it (MocoSFL's start)
            g = torch.Generator().manual_seed(4000 + self.seed)
            bank = nn.functional.normalize(torch.randn(self.size, q1.shape[1], generator=g), dim=1)
        loss = 0.5 * (nce(q1, q2, bank, self.tau, self.weight) + nce(q2, q1, bank, self.tau, self.weight))
        self.fifo = torch.cat([q1.detach(), q2.detach(), bank])[: self.size]
        return loss, q2.detach()


def logit_dp_sensitivity(n: int, tau: float) -> float:
    """S of Kong, Munoz Medina & Ribero 2023 for a batch of n at temperature tau."""
    e = math.exp(2 / tau)
    return 1 / n + min(2 * e / (n + e - 1), 2)


class LogitDPProxy(Pilot):
    """``logitdp<T>``: the default loss's exact gradient plus logit-level DP's noise."""

    sigma = 0.969
    noise_std: float | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_gen = torch.Generator().manual_seed(3000 + self.seed)
        step = self.optimizer.step

        def noisy_step(*a, **kw):
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.add_(torch.randn(p.shape, generator=self.noise_gen).to(p.device)
                                    * self.noise_std)
            return step(*a, **kw)

        self.optimizer.step = noisy_step

    def train_step(self, x: Tensor):
        if self.noise_std is None:
            self.noise_std = self._calibrate(x)
        return super().train_step(x)

    def _calibrate(self, x: Tensor) -> float:
        xs = x[:8].to(self.device)
        v1, v2 = self.augment(xs, self.generator), self.augment(xs, self.generator)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norms = []
        for i in range(len(xs)):
            for j in range(len(xs)):
                s = (self.model(v1[i:i + 1]) * self.model(v2[j:j + 1])).sum()
                grads = torch.autograd.grad(s, params)
                norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
        c = float(torch.tensor(norms).median())
        tau = self.cfg.temperature
        std = self.sigma * c / tau * logit_dp_sensitivity(self.cfg.batch_size, tau)
        logging.getLogger(__name__).info("logit-DP proxy: C %.3g, std %.3g", c, std)
        return std


@dataclass(frozen=True)
class Arm:
    """What an arm name says: settings, trainer class, weight, epsilon, start."""

    name: str
    settings: dict[str, Any]
    trainer: type[Pilot]
    attrs: dict[str, Any]
    weight: float = 1.0
    epsilon: float | None = None
    random_init: bool = False


BASES: dict[str, tuple[dict[str, Any], type[Pilot], dict[str, Any]]] = {
    "default": ({}, Pilot, {}),
    "moment": (MOMENT, Pilot, {}),
    "localq": (LOCAL_QUEUE, Pilot, {}),
    "detneg": (MOMENT, DetachedNegatives, {}),
    "batchmoment": (MOMENT, BatchMoment, {"source": "moment"}),
    "batchmoment-ema": (MOMENT, BatchMoment, {"source": "moment-ema"}),
    "batchmix": (MOMENT, BatchMoment, {"source": "mix"}),
    "pred": (MOMENT, Predictor, {}),
    "synthetic": (MOMENT, Synthetic, {}),
    "synthetic-grad": (MOMENT, Synthetic, {"gradient": True}),
}
#: The bases whose loss reads no other example's un-noised data, so ``_e`` may train them
#: (``mix<K>`` keeps its clusters of the keys without noise: not among them).
PER_EXAMPLE = frozenset({"moment", "pred", "synthetic"})
PATTERN = re.compile(r"(?P<base>[a-z-]+?)(?P<num>[0-9.]+)?(?:_u(?P<u>[0-9.]+))?"
                     r"(?:_e(?P<e>[0-9.]+))?(?P<ri>_ri)?")


def parse_arm(name: str) -> Arm:
    """``detneg_u2`` -> the detached-negatives trainer, weight 2; see the module doc."""
    m = PATTERN.fullmatch(name)
    if m is None:
        raise argparse.ArgumentTypeError(f"{name!r}: an arm is BASE[_u<L>][_e<EPS>][_ri]")
    base, num = m["base"], m["num"]
    try:
        if num is None and base in BASES:
            settings, cls, attrs = BASES[base]
        elif base == "t" and num:
            settings, cls, attrs = {"temperature": float(num)}, Pilot, {}
        elif base == "logitdp" and num:
            settings, cls, attrs = {"temperature": float(num)}, LogitDPProxy, {}
        elif base == "mix" and num:
            settings, cls, attrs = MOMENT, RunningMixture, {"clusters": int(num)}
        elif base == "fifo" and num:
            settings, cls, attrs = MOMENT, Fifo, {"size": int(num)}
        elif base == "detneg-noise" and num:
            settings, cls, attrs = MOMENT, DetachedNegatives, {"noise": float(num)}
        else:
            raise ValueError
        weight = float(m["u"]) if m["u"] else 1.0
        epsilon = float(m["e"]) if m["e"] else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name!r}: unknown arm; bases: {', '.join(BASES)}, t<T>, logitdp<T>, mix<K>, "
            "fifo<Q>, detneg-noise<S>") from None
    if weight < 1 or (epsilon is not None and epsilon <= 0):
        raise argparse.ArgumentTypeError(f"{name!r}: _u needs L >= 1 and _e an epsilon > 0")
    if epsilon is not None and base not in PER_EXAMPLE:
        raise argparse.ArgumentTypeError(
            f"{name!r}: _e needs a loss that is per example under DP-SGD: "
            f"{', '.join(sorted(PER_EXAMPLE))} (the others read other examples' un-noised data)")
    if weight != 1.0 and settings.get("in_batch", FedConfig.in_batch):
        raise argparse.ArgumentTypeError(
            f"{name!r}: _u weighs a loss's detached negatives; this one's are in-batch")
    return Arm(name, dict(settings), cls, dict(attrs), weight, epsilon, bool(m["ri"]))


def private_factory(arm: Arm, cfg: FedConfig, examples: int, seed: int) -> tuple[Callable, dict]:
    """A trainer factory with DP-SGD calibrated to ``arm.epsilon`` over the run, and what
    the calibration found."""
    steps_per_epoch = math.ceil(examples / cfg.batch_size)
    plan = PrivacyPlan(rounds=1, steps_per_round=cfg.epochs * steps_per_epoch,
                       sample_rate=1 / steps_per_epoch, push_rate=0, push_noise=0, delta=1e-5,
                       target_epsilon=arm.epsilon)
    joint = calibrate_noise_multiplier(plan)
    sgd = sgd_noise_multiplier(joint)
    privacy = {"joint_noise": joint, "sgd_noise": sgd,
               "epsilon": plan.accountant(joint).epsilon(1e-5)}

    def factory(*args, **kwargs):
        dp = DPSGD(noise_multiplier=sgd, max_grad_norm=1.0, num_examples=examples,
                   batch_size=cfg.batch_size, moment_noise=MOMENT_NOISE_RATIO * sgd,
                   generator=torch.Generator().manual_seed(7000 + seed))
        return arm.trainer(*args, dp=dp, **kwargs)

    return factory, privacy


def run_arm(args: argparse.Namespace, arm: Arm, seed: int, dataset: str, examples: int,
            item_shape: tuple[int, ...]) -> dict[str, Any]:
    """One (arm, seed), reused from ``--out`` when it finished before with the same settings."""
    path = args.out / "runs" / f"{arm.name}_s{seed}.json"
    cfg = FedConfig(dataset=dataset, epochs=args.epochs, batch_size=args.batch_size,
                    width=args.width, embedding_dim=args.embedding_dim, crop_scale_min=0.3,
                    blur_p=0.0, pretrain_epochs=0 if arm.random_init else args.pretrain_epochs,
                    pretrain_images=args.pretrain_images, device="cpu", eval_every=0, seed=seed)
    cfg = replace(cfg, **arm.settings)
    settings = {"data": str(args.data), "train": args.train, "test": args.test,
                "config": {k: v for k, v in vars(cfg).items() if k != "dataset"},
                "logit_dp_sigma": args.logit_dp_sigma}
    settings = json.loads(json.dumps(settings))  # as read back from the kept file
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("settings") == settings:
            return kept
        print(f"{path.name}: kept with other settings; trained again", flush=True)
    attrs = {"weight": arm.weight, "seed": seed, **arm.attrs}
    if arm.trainer is Synthetic:
        attrs["bank"] = dead_leaves(SYNTHETIC_BANK, item_shape, seed=1)
    if arm.trainer is LogitDPProxy:
        attrs["sigma"] = args.logit_dp_sigma
    cls = type(arm.trainer.__name__, (arm.trainer,), attrs)
    factory, privacy = (cls, {})
    if arm.epsilon is not None:
        factory, privacy = private_factory(replace(arm, trainer=cls), cfg, examples, seed)
    start = time.perf_counter()
    summary = train_local(cfg, args.out / "runs" / f"{arm.name}_s{seed}", quiet=True,
                          trainer_factory=factory)
    begin = summary.get("pretrained_init", summary["random_init"])
    row = {"arm": arm.name, "seed": seed, "settings": settings, "privacy": privacy,
           "train_s": round(time.perf_counter() - start, 1),
           "trained": {k: summary["trained"][k] for k in KEYS},
           "start": {k: begin[k] for k in KEYS}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + "\n")
    gain = " / ".join(f"{row['trained'][k] - row['start'][k]:+.3f}" for k in KEYS[:3])
    print(f"{arm.name:24s} seed {seed}: over the start {gain}, uniformity "
          f"{row['trained']['uniformity_head']:.2f} ({row['train_s']:.0f} s)", flush=True)
    return row


def shares(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[float] | None:
    """The mean gain of ``rows`` over their starts as a share of ``reference``'s at the same
    seeds (None without the reference at every seed; nan where its gain is not positive)."""
    by_seed = {r["seed"]: r for r in reference}
    if not rows or any(r["seed"] not in by_seed for r in rows):
        return None
    out = []
    for k in KEYS[:3]:
        mine = statistics.mean(r["trained"][k] - r["start"][k] for r in rows)
        ref = statistics.mean(by_seed[r["seed"]]["trained"][k] - by_seed[r["seed"]]["start"][k]
                              for r in rows)
        out.append(mine / ref if ref > 0 else float("nan"))
    return out


def table_rows(results: dict[str, list[dict[str, Any]]], reference: str) -> list[list[Any]]:
    rows = []
    for name, runs in results.items():
        trained = [statistics.mean(r["trained"][k] for r in runs) for k in KEYS]
        gains = [[r["trained"][k] - r["start"][k] for r in runs] for k in KEYS[:3]]
        share = shares(runs, results.get(reference, []))
        noise = runs[0]["privacy"].get("sgd_noise")
        rows.append([
            name, ",".join(str(r["seed"]) for r in runs),
            " / ".join(f"{v:.4f}" for v in trained[:3]) + f" / {trained[3]:.2f}",
            " / ".join(f"{statistics.mean(g):+.3f}" for g in gains)
            + (" (± " + " / ".join(f"{(max(g) - min(g)) / 2:.3f}" for g in gains) + ")"
               if len(runs) > 1 else ""),
            "–" if share is None else " / ".join("–" if math.isnan(s) else f"{100 * s:.0f}%"
                                                  for s in share),
            "–" if noise is None else f"{noise:.3f}",
        ])
    return rows


def plot(results: dict[str, list[dict[str, Any]]], path: Path, sampling_error: float) -> None:
    """Each arm's gain over the start per figure: the mean as a bar, every seed as a dot,
    one accuracy's sampling error as a grey band around 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(max(8.0, 1.0 + 0.9 * len(names)) * 1.5, 3.6),
                             sharey=False)
    for ax, key, label in zip(axes, KEYS[:3], ("linear probe", "kNN", "retrieval"), strict=True):
        for i, name in enumerate(names):
            gains = [r["trained"][key] - r["start"][key] for r in results[name]]
            ax.bar(i, statistics.mean(gains), color="tab:blue" if statistics.mean(gains) >= 0
                   else "tab:red", alpha=0.7)
            ax.scatter([i] * len(gains), gains, color="black", s=8, zorder=3)
        ax.axhspan(-sampling_error, sampling_error, color="grey", alpha=0.2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{label}: gain over the start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", type=parse_arm, nargs="+", required=True,
                        help="arms to run (see the module doc)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", default=str(CIFAR_DATA),
                        help="a .npz file (the CIFAR-10 benchmark file by default) or 'digits'")
    parser.add_argument("--train", type=int, default=5000,
                        help="training images of the client (a stratified slice of a .npz file)")
    parser.add_argument("--test", type=int, default=5000, help="held-out images")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the client's images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--pretrain-images", type=int, default=20_000)
    parser.add_argument("--reference", default="default",
                        help="the arm whose gain the shares are of (when among --arms)")
    parser.add_argument("--logit-dp-sigma", type=float, default=0.969,
                        help="noise multiplier of the logitdp<T> arms")
    parser.add_argument("--out", type=Path, default=Path("runs/objective-pilots"),
                        help="run directories and one JSON file per finished (arm, seed)")
    parser.add_argument("--name", default="objective_pilots", help="result name in bench/results/")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    dataset = args.data
    try:
        if Path(args.data).suffix == ".npz":  # a stratified slice, written once
            dataset = str(args.out / f"slice-{Path(args.data).stem}-{args.train}-{args.test}.npz")
            if not Path(dataset).is_file():  # whole or not at all: another command may read it
                partial = Path(dataset).with_suffix(f".{os.getpid()}.npz")
                write_slice(Path(args.data), args.train, args.test, partial)
                partial.replace(dataset)
        data = load_dataset(dataset)
    except DatasetError as exc:
        raise SystemExit(str(exc)) from exc
    examples, item_shape = len(data.x_train), tuple(data.x_train.shape[1:])
    # One pretraining per seed, kept in --out (unless the caller's environment names a
    # cache); the environment is left as it was found.
    cache = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = cache or str(args.out / "pretrained")
    logging.disable(logging.WARNING)  # the library's progress lines; this prints its own
    try:
        results = {arm.name: [run_arm(args, arm, seed, dataset, examples, item_shape)
                              for seed in args.seeds] for arm in args.arms}
    finally:
        logging.disable(logging.NOTSET)
        if cache is None:
            del os.environ[CACHE_ENV]
    headers = ["arm", "seeds", "trained: probe / kNN / retrieval / uniformity",
               "over the start (± half range)", f"share of {args.reference}'s gain",
               "DP-SGD noise"]
    sampling_error = math.sqrt(0.25 / len(data.x_test))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS_DIR / f"{args.name}.png", sampling_error)
    write_result(args.name, headers, table_rows(results, args.reference),
                 summary={"train_images": examples, "test_images": len(data.x_test),
                          "sampling_error_one_accuracy": round(sampling_error, 4)},
                 details={"per_seed": {name: [{k: r[k] for k in ("seed", "trained", "start",
                                                                 "privacy", "train_s")}
                                              for r in runs] for name, runs in results.items()}},
                 notes=(f"One client of {examples} images, {args.epochs} epochs of batch "
                        f"{args.batch_size}, Adam 1e-3 cosine-decayed, width {args.width}, "
                        f"embedding dimension {args.embedding_dim}, crop scale from 0.3, no blur; "
                        f"each run starts from the encoder pretrained {args.pretrain_epochs} epochs "
                        f"on {args.pretrain_images} dead-leaves images (one per seed) unless _ri. "
                        "Gains are over that start: linear probe / kNN (backbone) / retrieval (head)."))


if __name__ == "__main__":
    main()
