"""Partitioners: every index exactly once, deterministic, skewed as asked, and refusing the impossible."""

from __future__ import annotations

import numpy as np
import pytest

from common.partition import dirichlet, iid, partition, shards

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class
METHODS = [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"classes_per_partition": 2})]


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean Shannon entropy (nats) of the label distribution inside each partition."""
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        entropies.append(float(-(freq * np.log(freq)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize(("method", "kw"), METHODS, ids=[m for m, _ in METHODS])
def test_every_index_lands_in_exactly_one_partition(method: str, kw: dict) -> None:
    parts = partition(LABELS, 7, method, seed=0, **kw)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize(("method", "kw"), METHODS, ids=[m for m, _ in METHODS])
def test_same_seed_same_split_and_another_seed_another(method: str, kw: dict) -> None:
    a, b, c = (partition(LABELS, 5, method, seed=s, **kw) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid(1003, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_far_more_skewed_than_iid() -> None:
    skewed = dirichlet(LABELS, 10, alpha=0.1, seed=0)
    uniform = iid(len(LABELS), 10, seed=0)
    assert mean_label_entropy(LABELS, skewed) < 0.5 * mean_label_entropy(LABELS, uniform)


def test_dirichlet_redraws_until_min_size_is_met() -> None:
    first_draw = dirichlet(LABELS, 10, alpha=0.1, seed=3, min_size=0)
    assert min(len(p) for p in first_draw) < 30  # so the constraint below forces redraws
    parts = dirichlet(LABELS, 10, alpha=0.1, seed=3, min_size=30)
    assert min(len(p) for p in parts) >= 30


def test_dirichlet_gives_up_when_min_size_cannot_be_met() -> None:
    with pytest.raises(ValueError, match="lower min_size"):
        dirichlet(LABELS, 10, alpha=0.01, seed=0, min_size=95, max_retries=3)
    with pytest.raises(ValueError, match="exceeds the 1000 samples"):
        dirichlet(LABELS, 10, alpha=1.0, seed=0, min_size=101)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_hold_exactly_k_classes(k: int) -> None:
    parts = shards(LABELS, 10, k, seed=0)
    assert all(len(np.unique(LABELS[p])) == k for p in parts)


@pytest.mark.parametrize(
    ("args", "kw", "message"),
    [
        ((LABELS, 10, "kmeans"), {}, "iid, dirichlet, shards"),
        ((LABELS, 1001, "iid"), {}, "num_partitions must be in 1..1000"),
        ((LABELS, 0, "iid"), {}, "num_partitions"),
        ((LABELS, 10, "dirichlet"), {"alpha": 0.0}, "alpha must be"),
        ((LABELS, 10, "dirichlet"), {"alpha": float("nan")}, "alpha must be"),
        ((LABELS, 10, "dirichlet"), {}, "missing: alpha"),
        ((LABELS, 10, "iid"), {"alpha": 0.1}, "unexpected: alpha"),
        (
            (LABELS, 10, "shards"),
            {"classes_per_partition": 11},
            "classes_per_partition must be in 1..10",
        ),
        ((LABELS, 3, "shards"), {"classes_per_partition": 2}, "cannot cover 10 classes"),
        ((LABELS.astype(float), 10, "iid"), {}, "integer"),
    ],
    ids=[
        "unknown-method",
        "too-many-partitions",
        "zero-partitions",
        "alpha-zero",
        "alpha-nan",
        "missing-arg",
        "unexpected-arg",
        "k-too-large",
        "k-too-small",
        "float-labels",
    ],
)
def test_bad_arguments_are_refused(args: tuple, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(*args, seed=0, **kw)
