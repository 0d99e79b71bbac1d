"""NegativeQueue: the ring buffer, ages, exclusion, quotas, validation, snapshots, threads."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from server.queue import InvalidPush, NegativeQueue, QueueError, QuotaExceeded

DIM = 8


def unit(n: int, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


def contents(queue: NegativeQueue) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row the queue holds and its version, oldest insertion first, read from its ring
    buffer (a pull samples the rows; it does not list them in order)."""
    slots = queue._ring.occupied()
    return queue._ring.rows.index_select(0, slots), queue._ring.versions.index_select(0, slots)


def test_push_then_pull_returns_the_rows_unit_norm():
    queue = NegativeQueue(16, DIM)
    rows = unit(5)
    assert queue.push(0, rows, version=0) == 5
    pulled, versions = contents(queue)
    assert torch.allclose(pulled, rows)
    sampled, _ = queue.pull(10)
    assert sampled.shape == (5, DIM) and torch.cdist(sampled, rows).min(dim=1).values.max() < 1e-6
    assert versions.tolist() == [0] * 5
    assert queue.stats()["size"] == 5


def test_pull_never_returns_more_than_asked():
    queue = NegativeQueue(16, DIM)
    queue.push(0, unit(10), version=0)
    assert queue.pull(3)[0].shape == (3, DIM)
    assert queue.pull(0)[0].shape == (0, DIM)
    assert queue.pull(100)[0].shape == (10, DIM)


def test_pull_of_an_empty_queue_is_empty():
    rows, versions = NegativeQueue(4, DIM).pull(3)
    assert rows.shape == (0, DIM) and versions.shape == (0,)


def test_ring_buffer_overwrites_the_oldest_rows():
    queue = NegativeQueue(4, DIM)
    rows = unit(6)
    queue.push(0, rows[:3], version=0)
    queue.push(0, rows[3:], version=0)
    pulled, _ = contents(queue)
    assert torch.allclose(pulled, rows[2:])
    stats = queue.stats()
    assert stats["size"] == 4 and stats["counters"]["overwritten_rows"] == 2


def test_push_ahead_of_the_queue_version_is_refused():
    queue = NegativeQueue(8, DIM)
    with pytest.raises(InvalidPush, match="ahead"):
        queue.push(0, unit(1), version=1)


def test_push_older_than_max_age_is_refused_but_a_late_push_within_it_is_kept():
    queue = NegativeQueue(8, DIM, max_age=1)
    queue.advance(3)
    assert queue.push(0, unit(1), version=2) == 1
    with pytest.raises(InvalidPush, match="older"):
        queue.push(0, unit(1), version=1)


def test_advance_evicts_rows_older_than_max_age():
    queue = NegativeQueue(16, DIM, max_age=1)
    for version in range(3):
        queue.advance(version)
        queue.push(0, unit(2, seed=version), version=version)
    assert queue.stats()["age_histogram"] == [2, 2]
    assert queue.advance(3) == 2
    _, versions = contents(queue)
    assert versions.tolist() == [2, 2]
    stats = queue.stats()
    assert stats["age_histogram"] == [0, 2]
    assert stats["counters"]["evicted_rows"] == 4


def test_eviction_after_wrap_around_keeps_insertion_order():
    queue = NegativeQueue(4, DIM, max_age=1)
    queue.push(0, unit(3, seed=0), version=0)
    queue.advance(1)
    second = unit(3, seed=1)
    queue.push(0, second, version=1)  # wraps, overwrites two rows of version 0
    queue.advance(2)  # evicts the last row of version 0
    third = unit(2, seed=2)
    queue.push(0, third, version=2)  # overwrites the oldest row of version 1
    rows, versions = contents(queue)
    assert torch.allclose(rows, torch.cat([second[1:], third]))
    assert versions.tolist() == [1, 1, 2, 2]


def test_advance_cannot_go_back():
    queue = NegativeQueue(4, DIM)
    queue.advance(2)
    with pytest.raises(ValueError, match="go back"):
        queue.advance(1)


def test_pull_honours_the_requested_max_age():
    queue = NegativeQueue(16, DIM, max_age=3)
    for version in range(4):
        queue.advance(version)
        queue.push(0, unit(2, seed=version), version=version)
    for age in range(4):
        _, versions = queue.pull(16, max_age=age)
        assert len(versions) == 2 * (age + 1)
        assert bool((queue.version - versions <= age).all())


def test_pull_excludes_the_callers_own_rows():
    queue = NegativeQueue(16, DIM)
    mine, theirs = unit(4, seed=1), unit(3, seed=2)
    queue.push(7, mine, version=0)
    queue.push(8, theirs, version=0)
    for _ in range(20):
        rows, _ = queue.pull(16, exclude=7)
        assert rows.shape == (3, DIM)
        assert torch.cdist(rows, mine).min() > 1e-4


def test_uniform_policy_samples_every_row_about_equally():
    queue = NegativeQueue(8, DIM)
    rows = unit(4)
    queue.push(0, rows, version=0)
    generator = torch.Generator().manual_seed(0)
    hits = torch.zeros(4)
    for _ in range(2000):
        pulled, _ = queue.pull(1, generator=generator)
        hits[torch.cdist(pulled, rows).argmin()] += 1
    assert bool(((hits - 500).abs() < 100).all()), hits


def test_uniform_pull_draws_from_exactly_the_live_rows_after_wrap_and_eviction():
    queue = NegativeQueue(8, DIM, max_age=1)
    for version in range(3):  # 5 rows per version into 8 slots: the ring wraps, advance evicts
        queue.advance(version)
        queue.push(version, unit(5, seed=version), version=version)
    for _ in range(2):
        live, live_versions = contents(queue)
        for exclude in (None, 2):
            expected = live if exclude is None else live[live_versions != 2]
            for _ in range(20):
                rows, _ = queue.pull(8, exclude=exclude)
                assert rows.shape == expected.shape
                if len(expected):  # the same set of rows
                    assert torch.cdist(rows, expected).min(dim=1).values.max() < 1e-6
                    assert torch.cdist(expected, rows).min(dim=1).values.max() < 1e-6
        queue.advance(3)  # drops the version-1 rows that survived the wrap
    assert len(queue) == 5


def test_pull_rejects_bad_arguments():
    queue = NegativeQueue(4, DIM)
    with pytest.raises(ValueError):
        queue.pull(-1)
    with pytest.raises(ValueError):
        queue.pull(1, max_age=-1)


def test_quota_is_per_contributor_and_per_version():
    queue = NegativeQueue(64, DIM, quota_per_version=5)
    assert queue.push(0, unit(3), version=0) == 3
    with pytest.raises(QuotaExceeded, match="quota is 5"):
        queue.push(0, unit(3), version=0)
    assert queue.quota_remaining(0, 0) == 2
    assert queue.push(1, unit(5), version=0) == 5
    queue.advance(1)
    assert queue.push(0, unit(5), version=1) == 5


def test_quota_refusal_leaves_the_queue_unchanged():
    queue = NegativeQueue(64, DIM, quota_per_version=4)
    queue.push(0, unit(4), version=0)
    before = (queue.stats(), contents(queue)[0])
    with pytest.raises(QueueError):
        queue.push(0, unit(1), version=0)
    assert queue.stats()["size"] == before[0]["size"]
    assert torch.equal(contents(queue)[0], before[1])


def _scaled(factor: float) -> torch.Tensor:
    return unit(2) * factor


BAD_PUSHES = {
    "wrong dim": unit(2, DIM + 1),
    "one-dimensional": unit(1)[0],
    "no rows": torch.empty(0, DIM),
    "more rows than capacity": unit(17),
    "float64": unit(2).double(),
    "integer": torch.ones(2, DIM, dtype=torch.int32),
    "NaN": torch.cat([unit(1), torch.full((1, DIM), float("nan"))]),
    "Inf": torch.cat([unit(1), torch.full((1, DIM), float("inf"))]),
    "zero vector": torch.cat([unit(1), torch.zeros(1, DIM)]),
    "norm 2": _scaled(2.0),
    "norm 0.5": _scaled(0.5),
}


@pytest.mark.parametrize("embeddings", BAD_PUSHES.values(), ids=BAD_PUSHES.keys())
def test_invalid_push_is_refused_whole_and_changes_nothing(embeddings):
    queue = NegativeQueue(16, DIM)
    queue.push(3, unit(4, seed=9), version=0)
    before_stats, before_rows = queue.stats(), contents(queue)[0]
    with pytest.raises(InvalidPush):
        queue.push(0, embeddings, version=0)
    assert queue.stats() == before_stats
    assert torch.equal(contents(queue)[0], before_rows)


def test_rows_within_tolerance_are_renormalised():
    queue = NegativeQueue(16, DIM, norm_tolerance=0.01)
    queue.push(0, unit(3) * 1.005, version=0)
    rows, _ = queue.pull(3)
    assert torch.allclose(rows.norm(dim=1), torch.ones(3), atol=1e-6)


def test_float16_rounded_unit_rows_are_accepted_and_kept_unit_norm():
    # What a client sends by default: rows normalised in float32, then rounded to float16
    # (their norms are 1 only to float16 precision, which the queue's check must allow).
    rounded = F.normalize(unit(32) + 0.5 * torch.randn(32, DIM), dim=1).half()
    assert (rounded.float().norm(dim=1) - 1).abs().max() > 0  # not exactly unit any more
    queue = NegativeQueue(64, DIM)
    assert queue.push(0, rounded, version=0) == 32
    rows, _ = contents(queue)
    assert torch.allclose(rows.float().norm(dim=1), torch.ones(32), atol=1e-3)
    assert torch.allclose(rows.float(), rounded.float(), atol=1e-3)


def test_float16_storage_keeps_rows_to_float16_precision(tmp_path):
    queue = NegativeQueue(8, DIM, storage_dtype=torch.float16)
    queue.push(0, unit(3), version=0)
    rows, _ = contents(queue)
    assert rows.dtype == torch.float16 and queue.pull(3)[0].dtype == torch.float16
    assert torch.allclose(rows.float(), unit(3), atol=1e-3)
    exact = NegativeQueue(8, DIM)
    exact.restore(queue.snapshot(tmp_path / "q.pt"))
    assert torch.equal(contents(exact)[0], rows.float())


def test_constructor_rejects_bad_configuration():
    for kwargs in (
        {"capacity": 0, "dim": 4},
        {"capacity": 4, "dim": 0},
        {"capacity": 4, "dim": 4, "max_age": -1},
        {"capacity": 4, "dim": 4, "quota_per_version": 0},
        {"capacity": 4, "dim": 4, "norm_tolerance": 1.0},
        {"capacity": 4, "dim": 4, "storage_dtype": torch.float64},
    ):
        with pytest.raises(ValueError):
            NegativeQueue(**kwargs)


def test_snapshot_restore_round_trip(tmp_path):
    queue = NegativeQueue(16, DIM, max_age=2, quota_per_version=10)
    queue.push(0, unit(3, seed=1), version=0)
    queue.advance(1)
    queue.push(1, unit(4, seed=2), version=1)
    path = queue.snapshot(tmp_path / "queue.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["queue.pt"]

    restored = NegativeQueue(16, DIM, max_age=2, quota_per_version=10)
    restored.restore(path)
    assert restored.version == 1
    assert restored.stats() == queue.stats()
    for a, b in zip(contents(restored), contents(queue), strict=True):
        assert torch.equal(a, b)
    assert restored.pull(16, exclude=1)[0].shape == (3, DIM)
    assert restored.quota_remaining(1, 1) == 6


def test_restore_keeps_the_newest_rows_and_applies_its_own_max_age(tmp_path):
    queue = NegativeQueue(16, DIM, max_age=3)
    queue.push(0, unit(6, seed=1), version=0)
    queue.advance(2)
    newest = unit(4, seed=2)
    queue.push(0, newest, version=2)
    path = queue.snapshot(tmp_path / "queue.pt")

    small = NegativeQueue(4, DIM, max_age=3)
    small.restore(path)
    assert torch.allclose(contents(small)[0], newest)

    strict = NegativeQueue(16, DIM, max_age=1)
    strict.restore(path)
    assert contents(strict)[1].tolist() == [2] * 4


def test_restore_refuses_another_dimension_or_a_foreign_file(tmp_path):
    path = NegativeQueue(4, DIM).snapshot(tmp_path / "queue.pt")
    with pytest.raises(ValueError, match="dim"):
        NegativeQueue(4, DIM + 1).restore(path)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a queue snapshot"):
        NegativeQueue(4, DIM).restore(tmp_path / "other.pt")


def test_snapshot_replaces_an_existing_file_atomically(tmp_path):
    queue = NegativeQueue(8, DIM)
    path = tmp_path / "queue.pt"
    queue.snapshot(path)
    queue.push(0, unit(2), version=0)
    queue.snapshot(path)
    restored = NegativeQueue(8, DIM)
    restored.restore(path)
    assert len(restored) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["queue.pt"]


@pytest.mark.timeout(30)
def test_concurrent_pushes_and_pulls_add_up():
    queue = NegativeQueue(4096, DIM)
    errors: list[BaseException] = []
    per_thread, threads = 50, 8

    def work(contributor: int) -> None:
        try:
            for i in range(per_thread):
                queue.push(contributor, unit(3, seed=i), version=0)
                rows, _ = queue.pull(5, exclude=contributor)
                assert rows.shape[0] <= 5
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(c,)) for c in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=20)
    assert not errors
    stats = queue.stats()
    assert stats["size"] == stats["counters"]["pushed_rows"] == threads * per_thread * 3
    assert stats["counters"]["pull_calls"] == threads * per_thread


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_queue_on_cuda_round_trip(tmp_path):
    queue = NegativeQueue(16, DIM, device="cuda")
    queue.push(0, unit(3), version=0)
    rows, versions = contents(queue)
    assert queue.pull(3)[0].is_cuda
    assert rows.is_cuda and torch.allclose(rows.cpu(), unit(3))
    restored = NegativeQueue(16, DIM, device="cuda")
    restored.restore(queue.snapshot(tmp_path / "q.pt"))
    assert len(restored) == 3


def test_only_returns_the_contributors_own_rows_and_never_with_exclude():
    queue = NegativeQueue(64, 4, max_age=3)
    mine = torch.nn.functional.normalize(torch.ones(5, 4), dim=1)
    theirs = torch.nn.functional.normalize(-torch.ones(7, 4), dim=1)
    queue.push(1, mine, 0)
    queue.push(2, theirs, 0)
    for seed in (None, 0):
        rows, _ = queue.pull(100, only=1, seed=seed)
        assert rows.shape[0] == 5 and bool((rows.float() @ mine[0] > 0.99).all())
    with pytest.raises(ValueError, match="cannot be combined"):
        queue.pull(3, exclude=1, only=1)


def _filled(arrivals: list[tuple[int, int, int]], *, capacity: int = 64, storage=torch.float32,
            wrap: int = 0) -> NegativeQueue:
    """A queue holding, for each (contributor, version, seed) in arrival order, the 6 rows
    ``unit(6, seed=seed)``, all young enough to pull. ``wrap`` rows of version 0 pushed
    first, then overwritten or evicted, put the survivors in other slots."""
    queue = NegativeQueue(capacity, DIM, max_age=2, storage_dtype=storage)
    if wrap:
        queue.push(9, unit(wrap, seed=99), version=0)
    queue.advance(1)
    for contributor, version, seed in sorted(arrivals, key=lambda a: a[1]):
        if version == 2 and queue.version < 2:
            queue.advance(2)
        queue.push(contributor, unit(6, seed=seed), version=version)
    queue.advance(2)
    if wrap:
        queue.advance(3)  # the version-0 rows go, the survivors are compacted; ages 1 and 2
    return queue


ARRIVALS = [(0, 1, 10), (1, 1, 11), (2, 1, 12), (0, 2, 20), (1, 2, 21), (2, 2, 22)]
# The same rows pushed by other slots in another order (within each version).
REORDERED = [(5, 1, 12), (3, 1, 10), (4, 1, 11), (4, 2, 21), (5, 2, 22), (3, 2, 20)]


@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_a_seeded_pull_ignores_the_order_and_slots_the_rows_arrived_in(storage):
    first = _filled(ARRIVALS, storage=storage)
    other = _filled(REORDERED, storage=storage)
    assert not torch.equal(contents(first)[0], contents(other)[0])  # laid out differently
    for seed in range(5):
        a = first.pull(10, seed=seed)
        b = other.pull(10, seed=seed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(first.pull(10, seed=seed)[0], a[0])  # and repeats
    draws = {tuple(first.pull(10, seed=seed)[0][:, 0].tolist()) for seed in range(5)}
    assert len(draws) == 5  # another seed, another sample


def test_a_seeded_pull_ignores_where_compaction_left_the_rows():
    first = _filled(ARRIVALS)
    compacted = _filled(REORDERED, capacity=40, wrap=7)  # the ring wrapped, then compacted
    for seed in range(3):
        assert torch.equal(first.pull(12, seed=seed)[0], compacted.pull(12, seed=seed)[0])


def test_a_seeded_pull_excludes_or_keeps_the_callers_rows_as_an_unseeded_one_does():
    queue = _filled(ARRIVALS)
    rows, versions = queue.pull(100, exclude=1, seed=3)
    assert rows.shape == (24, DIM)
    own = torch.cat([unit(6, seed=11), unit(6, seed=21)])
    assert torch.cdist(rows, own).min() > 1e-3
    rows, _ = queue.pull(100, only=1, seed=3)
    assert torch.cdist(rows, own).min(dim=1).values.max() < 1e-6 and rows.shape == (12, DIM)


def test_max_version_leaves_out_newer_rows():
    queue = _filled(ARRIVALS)
    assert queue.pull(100, max_version=1)[1].tolist() == [1] * 18
    assert queue.pull(100, max_version=1, seed=0)[1].tolist() == [1] * 18
    assert queue.pull(100, max_version=0)[0].shape == (0, DIM)
    assert queue.pull(100, max_version=2)[0].shape == (36, DIM)


def test_a_seeded_pull_refuses_a_generator():
    queue = _filled(ARRIVALS)
    with pytest.raises(ValueError, match="seed or a generator"):
        queue.pull(4, seed=1, generator=torch.Generator())


def test_a_restored_queue_serves_the_same_seeded_pulls(tmp_path):
    queue = _filled(ARRIVALS, storage=torch.float16)
    restored = NegativeQueue(64, DIM, max_age=2, storage_dtype=torch.float16)
    restored.restore(queue.snapshot(tmp_path / "queue.pt"))
    for seed in range(3):
        assert torch.equal(queue.pull(10, seed=seed)[0], restored.pull(10, seed=seed)[0])
