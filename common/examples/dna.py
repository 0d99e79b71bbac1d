"""DNA sequences, the second modality: synthetic genomes, a 1-D CNN, strand-aware views.

Two views of one read are alike when they are overlapping pieces of it or when one is
the other's reverse complement (the same double-stranded DNA read from the other
strand). The three plug-ins here follow :mod:`common.plugins` and are registered as
built-ins, but they use nothing that a plug-in of your own could not:

- ``--dataset dna[:KEY=VALUE,...]`` (:func:`genomes`): one-hot sequences (N, 4, L) of
  random background in which copies of their family's motifs are planted, mutated, on
  either strand. The family is the label (kNN and linear probe); nothing is downloaded.
- ``--encoder cnn1d`` (:func:`encoder`): :class:`SequenceCNN` plus the projection head.
- ``--views dna`` (:func:`views`): a random window of the read (the rest masked as
  unknown bases) and, with probability 1/2, the reverse complement.

Channel order is A, C, G, T, so the complement is the reversed channel order and the
reverse complement of a batch is ``x.flip((1, 2))``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.datasets import Dataset, DatasetError
from common.encoders import ContrastiveModel, make_norm, with_projection_head
from common.metrics import embed

if TYPE_CHECKING:
    from common.config import TrainConfig

logger = logging.getLogger(__name__)

ALPHABET = "ACGT"
#: Motifs depend only on the generator's shape settings, never on the run's seed, so
#: that every client and the server agree on what a family is.
MOTIF_SEED = 20260807


@dataclass(frozen=True)
class GenomeSpec:
    """The generator's settings, written ``dna:train=2000,mutation=0.2`` on the command line.

    Attributes:
        train: training sequences.
        test: held-out sequences.
        length: L, bases per sequence.
        families: classes; each owns ``motifs`` motifs of ``motif_length`` bases.
        motifs: motifs per family.
        motif_length: bases per motif.
        copies: motif instances planted per sequence, one in each of ``copies`` equal
            segments (so that any long enough window holds one).
        mutation: probability that a planted base is replaced by a random one.
        gc_spread: each sequence's GC content is drawn from 0.5 +- gc_spread: a
            nuisance that differs between reads and says nothing about the family.
    """

    train: int = 1200
    test: int = 400
    length: int = 128
    families: int = 8
    motifs: int = 2
    motif_length: int = 12
    copies: int = 4
    mutation: float = 0.1
    gc_spread: float = 0.1

    def __post_init__(self) -> None:
        for name in ("train", "test", "families", "motifs", "motif_length", "copies"):
            if getattr(self, name) < 1:
                raise DatasetError(f"dna: {name} must be at least 1, got {getattr(self, name)}")
        if self.length < self.copies * self.motif_length:
            raise DatasetError(f"dna: length {self.length} cannot hold {self.copies} copies of "
                               f"a {self.motif_length}-base motif")
        if not 0 <= self.mutation <= 1 or not 0 <= self.gc_spread <= 0.5:
            raise DatasetError(f"dna: mutation must be in [0, 1] and gc_spread in [0, 0.5], got "
                               f"{self.mutation} and {self.gc_spread}")

    @classmethod
    def parse(cls, arg: str) -> GenomeSpec:
        """``"train=600,length=128"`` -> GenomeSpec; ``""`` gives the defaults."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, int | float] = {}
        for item in filter(None, (part.strip() for part in arg.split(","))):
            key, sep, text = item.partition("=")
            if not sep or key not in types:
                raise DatasetError(f"dna:{arg}: {item!r} is not KEY=VALUE with KEY one of "
                                   f"{', '.join(types)}")
            try:
                values[key] = float(text) if types[key] == "float" else int(text)
            except ValueError as exc:
                raise DatasetError(f"dna:{arg}: {key} must be a {types[key]}, got {text!r}") from exc
        return cls(**values)


def motifs(spec: GenomeSpec) -> np.ndarray:
    """The families' motifs, (families, motifs, motif_length) base indices 0..3."""
    rng = np.random.default_rng(MOTIF_SEED)
    return rng.integers(0, 4, (spec.families, spec.motifs, spec.motif_length))


def _draw(spec: GenomeSpec, table: np.ndarray, n: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """n sequences (n, L) of base indices and their families (n,)."""
    y = np.arange(n) % spec.families
    rng.shuffle(y)
    gc = 0.5 + rng.uniform(-spec.gc_spread, spec.gc_spread, (n, 1))  # n x 1
    # Bases A, C, G, T: a G or C with probability gc, each strand-symmetric.
    probs = np.concatenate([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2], axis=1)  # n x 4
    u = rng.random((n, spec.length))
    seq = (u[:, :, None] > np.cumsum(probs, axis=1)[:, None, :3]).sum(axis=2)  # n x L
    m = spec.motif_length
    segment = spec.length // spec.copies
    for c in range(spec.copies):
        which = rng.integers(0, spec.motifs, n)
        planted = table[y, which].copy()  # n x m
        flip = rng.random(n) < 0.5  # the motif on the other strand
        planted[flip] = 3 - planted[flip, ::-1]
        mutate = rng.random((n, m)) < spec.mutation
        planted[mutate] = rng.integers(0, 4, int(mutate.sum()))
        start = c * segment + rng.integers(0, segment - m + 1, n)
        seq[np.arange(n)[:, None], start[:, None] + np.arange(m)] = planted
    return seq, y.astype(np.int64)


def one_hot(seq: np.ndarray) -> Tensor:
    """(N, L) base indices 0..3 -> (N, 4, L) float32 one-hot, channels A, C, G, T."""
    return torch.from_numpy(np.eye(4, dtype=np.float32)[seq].transpose(0, 2, 1).copy())


def reverse_complement(x: Tensor) -> Tensor:
    """(N, 4, L) one-hot -> the reverse complement, (N, 4, L): A<->T, C<->G, read backwards."""
    return x.flip((1, 2))


def genomes(arg: str, *, seed: int) -> Dataset:
    """The ``dna`` dataset (a :class:`~common.plugins.DatasetFactory`).

    Args:
        arg: ``KEY=VALUE`` pairs of :class:`GenomeSpec`, comma-separated (``""``: defaults).
        seed: draws the sequences; the motifs are fixed by the spec alone.

    Returns:
        x (N, 4, L) float32 one-hot, y (N,) int64 family, class names ``family-0`` ...
    """
    spec = GenomeSpec.parse(arg)
    table = motifs(spec)
    rng = np.random.default_rng(seed)
    x_train, y_train = _draw(spec, table, spec.train, rng)
    x_test, y_test = _draw(spec, table, spec.test, rng)
    logger.info("dna: %d + %d sequences of %d bases, %d families", spec.train, spec.test,
                spec.length, spec.families)
    return Dataset(
        name="dna", x_train=one_hot(x_train), y_train=torch.from_numpy(y_train),
        x_test=one_hot(x_test), y_test=torch.from_numpy(y_test),
        class_names=tuple(f"family-{i}" for i in range(spec.families)),
    )


class SequenceCNN(nn.Module):
    """Three conv-norm-ReLU blocks over (N, C, L), widths (w, 2w, 4w) and kernels (9, 5, 3),
    halved by max pooling after the first two; then global max and mean pooling.

    The first kernel spans a motif; max pooling over positions reports whether a pattern
    occurs anywhere, mean pooling how often; both are concatenated.

    Args:
        in_channels: C (4 for one-hot DNA).
        width: channels of the first block.
        norm: see :func:`common.encoders.make_norm` (GroupNorm by default: DP-compatible).

    Attributes:
        feature_dim: F = 8 * width.
    """

    def __init__(self, in_channels: int = 4, width: int = 32, norm: str = "group") -> None:
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        chans = (in_channels, width, 2 * width, 4 * width)
        # No conv bias (the norm shifts); ReLU not in place (Opacus' hooks).
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(chans[i], chans[i + 1], k, padding=k // 2, bias=False),
                          make_norm(norm, chans[i + 1], dims=1), nn.ReLU())
            for i, k in enumerate((9, 5, 3))
        )
        self.in_channels = in_channels
        self.feature_dim = 2 * chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, L) -> (N, F)."""
        if x.ndim != 3:
            raise ValueError(f"SequenceCNN takes sequences (N, C, L), got {tuple(x.shape)}")
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < 2 and x.shape[-1] >= 4:
                x = F.max_pool1d(x, 2)
        return torch.cat((x.amax(dim=2), x.mean(dim=2)), dim=1)  # N x F


def encoder(
    in_channels: int, *, embedding_dim: int, norm: str = "group", width: int | None = None
) -> ContrastiveModel:
    """The ``cnn1d`` encoder (an :class:`~common.plugins.EncoderFactory`)."""
    backbone = SequenceCNN(in_channels, norm=norm, **({} if width is None else {"width": width}))
    return with_projection_head(backbone, embedding_dim)


@dataclass(frozen=True)
class SequenceViews:
    """One random view per sequence (a :class:`~common.plugins.ViewFn`).

    A window of a fraction drawn from [min_crop, 1] of the read is kept where it is and
    the rest masked to zeros (unknown bases, N); then, with probability ``rc_p``, the
    view is reverse-complemented. Draws come from the CPU generator.

    Attributes:
        min_crop: smallest fraction of the bases a window keeps, in (0, 1].
        rc_p: probability of the reverse complement.
    """

    min_crop: float = 0.5
    rc_p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_crop <= 1 or not 0 <= self.rc_p <= 1:
            raise ValueError(f"min_crop must be in (0, 1] and rc_p in [0, 1], got "
                             f"{self.min_crop} and {self.rc_p}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (N, C, L) -> a view (N, C, L), same dtype and device."""
        if x.ndim != 3:
            raise ValueError(f"dna views take sequences (N, C, L), got {tuple(x.shape)} "
                             "(for images choose --views images)")
        n, _c, length = x.shape
        keep = torch.ceil(length * (self.min_crop + (1 - self.min_crop)
                                    * torch.rand(n, generator=generator)))  # N
        start = torch.floor((length - keep + 1) * torch.rand(n, generator=generator))  # N
        flip = torch.rand(n, generator=generator) < self.rc_p
        pos = torch.arange(length)
        mask = (pos >= start[:, None]) & (pos < (start + keep)[:, None])  # N x L
        view = x * mask.to(x.device, x.dtype).unsqueeze(1)
        return torch.where(flip.to(x.device).view(n, 1, 1), reverse_complement(view), view)


def views(cfg: TrainConfig) -> SequenceViews:
    """The ``dna`` views (a :class:`~common.plugins.ViewFactory`): windows of at least
    ``crop_scale_min`` of the read, reverse complement with probability 1/2."""
    return SequenceViews(min_crop=cfg.crop_scale_min or 0.5)


@torch.no_grad()
def strand_gap(fn: Callable[[Tensor], Tensor], x: Tensor, *, seed: int = 0,
               device: str | torch.device = "cpu") -> float:
    """How much closer ``fn`` puts a read to its reverse complement than to another read.

    mean cos(f(x_i), f(rc(x_i))) - mean cos(f(x_i), f(x_j)), with j a random other read:
    0 when the strand is no better than a stranger, up to 2; a strand-invariant
    encoder that separates reads scores near 1 - (mean cosine of random pairs).

    Args:
        fn: a layer of an encoder (``model.features`` or ``model``), (B, 4, L) -> (B, F).
        x: (N, 4, L) one-hot reads, N >= 2.
        seed: draws the random pairing.
        device: where ``fn`` runs.
    """
    if x.shape[0] < 2:
        raise ValueError(f"strand_gap needs at least 2 reads, got {x.shape[0]}")
    z = F.normalize(embed(fn, x, device=device), dim=1)  # N x F
    z_rc = F.normalize(embed(fn, reverse_complement(x), device=device), dim=1)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    other = (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n  # never i itself
    return float((z * z_rc).sum(1).mean() - (z * z[other]).sum(1).mean())
