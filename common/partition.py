"""Split a labelled dataset across federated clients: IID, Dirichlet label skew, class shards.

Pure numpy and deterministic under ``seed``. Every function returns one sorted int64
index array per partition, and every sample index appears in exactly one partition.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _check_count(num_partitions: int, num_samples: int) -> None:
    if not 1 <= num_partitions <= num_samples:
        raise ValueError(
            f"num_partitions must be in 1..{num_samples} (the number of samples), got {num_partitions}"
        )


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-d integer array, got {labels.dtype} of shape {labels.shape}"
        )
    return labels


def _sorted(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(p).astype(np.int64) for p in parts]


def iid(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """A uniformly random split into partitions whose sizes differ by at most one.

    Raises:
        ValueError: ``num_partitions`` not in 1..num_samples.
    """
    _check_count(num_partitions, num_samples)
    rng = np.random.default_rng(seed)
    return _sorted(np.array_split(rng.permutation(num_samples), num_partitions))


def dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is split across partitions in proportions p ~ Dir(alpha 1_K).

    The scheme of Hsu, Qi & Brown 2019 ("Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification"). Small alpha (0.1) gives each
    partition a few dominant classes; large alpha approaches IID. The draw is repeated,
    from the same seeded generator, until every partition holds at least ``min_size``
    samples.

    Args:
        labels: (N,) integer class labels.
        num_partitions: K.
        alpha: Dirichlet concentration, > 0.
        seed: seeds the generator.
        min_size: the smallest acceptable partition.
        max_retries: how many draws to try.

    Raises:
        ValueError: bad arguments, ``min_size * K > N``, or no draw within ``max_retries``
            met ``min_size`` (lower ``min_size`` or raise ``alpha``).
    """
    labels = _check_labels(labels)
    n = len(labels)
    _check_count(num_partitions, n)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if min_size < 0 or max_retries < 1:
        raise ValueError(
            f"min_size must be >= 0 and max_retries >= 1, got {min_size}, {max_retries}"
        )
    if min_size * num_partitions > n:
        raise ValueError(
            f"min_size {min_size} x {num_partitions} partitions exceeds the {n} samples; lower min_size"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for attempt in range(1, max_retries + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        smallest = min(len(p) for p in merged)
        if smallest >= min_size:
            logger.debug(
                "dirichlet(alpha=%g): accepted draw %d, smallest partition %d",
                alpha,
                attempt,
                smallest,
            )
            return _sorted(merged)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} samples into {num_partitions} partitions gave every "
        f"partition >= {min_size} samples in {max_retries} draws (last smallest: {smallest}); "
        "lower min_size, raise alpha or use fewer partitions"
    )


def shards(
    labels: np.ndarray, num_partitions: int, classes_per_partition: int, seed: int
) -> list[np.ndarray]:
    """Pathological label skew: every partition holds samples of ``classes_per_partition`` classes.

    In the spirit of McMahan et al. 2017's shards ("Communication-Efficient Learning of
    Deep Networks from Decentralized Data"), but exact: classes are listed in random
    order and partition p takes the k consecutive classes starting at p * k (cyclically),
    so it gets k distinct classes and every class is taken by ceil or floor of K k / C
    partitions; each class's samples are then shuffled and split evenly among the
    partitions that took it.

    Raises:
        ValueError: k not in 1..C, K * k < C (some class would be left out), or a
            partition would be empty.
    """
    labels = _check_labels(labels)
    _check_count(num_partitions, len(labels))
    classes = np.unique(labels)
    k = classes_per_partition
    if not 1 <= k <= len(classes):
        raise ValueError(
            f"classes_per_partition must be in 1..{len(classes)} (the classes present), got {k}"
        )
    if num_partitions * k < len(classes):
        raise ValueError(
            f"{num_partitions} partitions x {k} classes cannot cover {len(classes)} classes; "
            "raise classes_per_partition or num_partitions"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for p in range(num_partitions):
        for s in range(k):
            holders[int(order[(p * k + s) % len(classes)])].append(p)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        for p, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[p].append(chunk)
    merged = [np.concatenate(p) for p in parts]
    empty = [i for i, p in enumerate(merged) if len(p) == 0]
    if empty:
        raise ValueError(
            f"partitions {empty} would be empty: classes are too small for {num_partitions} partitions"
        )
    return _sorted(merged)


# method -> (function, required keyword arguments, optional keyword arguments)
_METHODS: dict[str, tuple[Callable[..., list[np.ndarray]], tuple[str, ...], tuple[str, ...]]] = {
    "iid": (iid, (), ()),
    "dirichlet": (dirichlet, ("alpha",), ("min_size", "max_retries")),
    "shards": (shards, ("classes_per_partition",), ()),
}


def partition(
    labels: np.ndarray, num_partitions: int, method: str, seed: int, **kw: Any
) -> list[np.ndarray]:
    """Dispatch to :func:`iid`, :func:`dirichlet` or :func:`shards` by name.

    Args:
        labels: (N,) integer labels (``iid`` uses only their count).
        num_partitions: K.
        method: ``"iid"``, ``"dirichlet"`` (needs ``alpha``) or ``"shards"`` (needs
            ``classes_per_partition``).
        seed: seeds the split.
        **kw: the method's own arguments.

    Raises:
        ValueError: unknown method, missing or unexpected arguments, or the method's own
            validation.
    """
    if method not in _METHODS:
        raise ValueError(
            f"unknown partition method {method!r}: choose one of {', '.join(_METHODS)}"
        )
    fn, required, optional = _METHODS[method]
    missing = [a for a in required if a not in kw]
    unexpected = sorted(set(kw) - set(required) - set(optional))
    if missing or unexpected:
        raise ValueError(
            f"partition method {method!r} needs {', '.join(required) or 'no arguments'}"
            + (f" and accepts {', '.join(optional)}" if optional else "")
            + f"; missing: {', '.join(missing) or 'none'}, unexpected: {', '.join(unexpected) or 'none'}"
        )
    labels = _check_labels(labels)
    if method == "iid":
        return iid(len(labels), num_partitions, seed)
    return fn(labels, num_partitions, seed=seed, **kw)
