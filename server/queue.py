"""The global queue of negative embeddings: a version-tagged ring buffer.

Rows are unit-norm embeddings of dimension ``dim``. Each row carries the encoder
version (round) that computed it and an opaque contributor slot, used for quotas
and for leaving a caller's own rows out of a pull, and never returned by
:meth:`NegativeQueue.pull`.

Ages and versions:

- ``age = queue.version - row.version``. :meth:`NegativeQueue.advance` moves the
  queue to a new version and evicts rows older than ``max_age``.
- A push at a version ahead of the queue's is refused (the encoder that made it
  does not exist yet); so is a push older than ``max_age`` (it would be evicted
  already). A push at the previous version after an advance is accepted, so a
  client that finishes its round late still contributes.

Layout: the occupied rows are the ``size`` slots before ``_ptr`` (mod capacity),
oldest insertion first. A push writes at ``_ptr`` and, when the buffer is full,
overwrites the oldest insertions, as in MoCo's ``_dequeue_and_enqueue``. Eviction
at ``advance`` compacts the survivors to the front so the invariant holds. The ring
only wraps once it is full, so as a set the occupied slots are always
``0 .. size - 1``: a uniform pull samples from them without ordering them.

Reproducible pulls: a pull given a ``seed`` samples the eligible rows in a canonical
order, by version and then by a content key (each row's dot product with a fixed
direction), with a generator seeded by it. Which slot a row holds
and when it arrived do not enter, so two queues holding the same rows answer alike. With
``max_version`` a puller can also leave out the rows of a round still running.

All public methods are thread-safe (one lock; pulls copy their rows under it,
pushes are validated and normalised before taking it).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.config import PULL_POLICIES

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
#: uniform, recent, stratified (by age): see :meth:`NegativeQueue.pull`.
POLICIES = PULL_POLICIES
#: Rows whose norm is below this are zero vectors, whatever the tolerance.
_ZERO_NORM = 1e-6
#: Seed of the fixed direction whose dot product with a row is the row's content key,
#: the tie-break of the canonical order that seeded pulls sample from.
_KEY_SEED = 0x5EED
#: What makes a row eligible for a pull: (oldest version, newest version or None,
#: excluded contributor or None, only contributor or None, canonical order).
_Eligibility = tuple[int, "int | None", "int | None", "int | None", bool]


def stratified_shares(sizes: Sequence[int], n: int) -> list[int]:
    """How many of ``n`` rows to take from each stratum: equal shares, capped by its size.

    A stratum with fewer rows than its share leaves the rest to the others (water-filling),
    so ``min(n, sum(sizes))`` rows are taken in all; a remainder that does not divide goes
    to the first strata in order (the queue lists the newest age first).

    Examples:
        >>> stratified_shares([10, 10, 10], 7)
        [3, 2, 2]
        >>> stratified_shares([1, 10, 10], 9)
        [1, 4, 4]
    """
    if n < 0 or any(s < 0 for s in sizes):
        raise ValueError(f"n and sizes must be >= 0, got {n} and {list(sizes)}")
    shares = [0] * len(sizes)
    remaining = min(n, sum(sizes))
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    while remaining > 0:
        share, extra = divmod(remaining, len(open_))
        for rank, i in enumerate(open_):
            got = min(share + (rank < extra), sizes[i] - shares[i])
            shares[i] += got
            remaining -= got
        open_ = [i for i in open_ if shares[i] < sizes[i]]
    return shares


class QueueError(Exception):
    """A push or pull the queue refuses; the queue is unchanged."""


class InvalidPush(QueueError, ValueError):
    """Malformed rows (shape, dtype, non-finite, norm) or an unacceptable version."""


class QuotaExceeded(QueueError):
    """The contributor has used its quota of rows for that version."""


class NegativeQueue:
    """Fixed-capacity ring buffer of unit-norm embeddings tagged with encoder versions.

    Args:
        capacity: number of rows kept (K in MoCo).
        dim: embedding dimension.
        max_age: rows with ``version - row_version > max_age`` are evicted at
            :meth:`advance`, and pushes that old are refused.
        quota_per_version: most rows one contributor may push per encoder version
            (``None``: no quota). Keeps one client from flushing the queue.
        device: where the rows live.
        storage_dtype: precision of the stored rows: float32, or float16 to halve
            memory and the cost of float16 pulls (unit-norm rows keep about three
            significant digits per component).
        norm_tolerance: rows whose L2 norm is within this of 1 are renormalised;
            others (and zero vectors) make the whole push invalid. The default
            absorbs float16 rounding and clients' renormalisation after noise.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        max_age: int = 2,
        quota_per_version: int | None = None,
        device: str | torch.device = "cpu",
        storage_dtype: torch.dtype = torch.float32,
        norm_tolerance: float = 1e-2,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        if quota_per_version is not None and quota_per_version <= 0:
            raise ValueError(f"quota_per_version must be positive or None, got {quota_per_version}")
        if storage_dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"storage_dtype must be torch.float32 or torch.float16, got {storage_dtype}"
            )
        if not 0.0 <= norm_tolerance < 1.0:
            raise ValueError(f"norm_tolerance must be in [0, 1), got {norm_tolerance}")
        self.capacity = capacity
        self.dim = dim
        self.max_age = max_age
        self.quota_per_version = quota_per_version
        self.device = torch.device(device)
        self.storage_dtype = storage_dtype
        self.norm_tolerance = norm_tolerance

        self._lock = threading.Lock()
        self._rows = torch.zeros(capacity, dim, dtype=storage_dtype, device=self.device)  # K x D
        self._versions = torch.zeros(capacity, dtype=torch.int64, device=self.device)  # K
        self._contributors = torch.zeros(capacity, dtype=torch.int64, device=self.device)  # K
        # Content keys are each stored row's dot product with this fixed direction.
        self._probe = torch.randn(
            dim, generator=torch.Generator().manual_seed(_KEY_SEED), dtype=torch.float64
        ).to(self.device)  # D
        self._canonical: torch.Tensor | None = None  # cached canonical order of the slots
        self._ptr = 0
        self._size = 0
        self._version = 0
        self._quota_used: dict[tuple[int, int], int] = {}  # (contributor, version) -> rows
        self._counters = dict.fromkeys(
            (
                "push_calls",
                "pushed_rows",
                "pull_calls",
                "pulled_rows",
                "evicted_rows",
                "overwritten_rows",
            ),
            0,
        )

    # ------------------------------------------------------------------ rounds

    @property
    def version(self) -> int:
        """The current encoder version (round)."""
        return self._version

    def __len__(self) -> int:
        return self._size

    def advance(self, version: int) -> int:
        """Move to ``version`` (>= the current one); evict rows older than ``max_age``.

        Returns the number of rows evicted.
        """
        with self._lock:
            if version < self._version:
                raise ValueError(
                    f"version cannot go back: queue is at {self._version}, got {version}"
                )
            self._version = version
            evicted = self._evict_locked()
        if evicted:
            logger.info(
                "queue at version %d: evicted %d rows older than %d rounds",
                version,
                evicted,
                self.max_age,
            )
        return evicted

    def _evict_locked(self) -> int:
        """Drop rows and quota records older than ``max_age``; compact the survivors."""
        oldest = self._version - self.max_age
        self._quota_used = {k: v for k, v in self._quota_used.items() if k[1] >= oldest}
        order = self._occupied_locked()
        keep = order[self._versions[order] >= oldest]
        evicted = self._size - keep.numel()
        if evicted:
            n = keep.numel()
            self._rows[:n] = self._rows[keep]
            self._versions[:n] = self._versions[keep]
            self._contributors[:n] = self._contributors[keep]
            self._canonical = None
            self._size = n
            self._ptr = n % self.capacity
            self._counters["evicted_rows"] += evicted
        return evicted

    def _occupied_locked(self) -> torch.Tensor:
        """Slots of the occupied rows, oldest insertion first."""
        start = self._ptr - self._size
        return torch.arange(start, self._ptr, device=self.device) % self.capacity

    # -------------------------------------------------------------------- push

    def push(self, contributor: int, embeddings: torch.Tensor, version: int) -> int:
        """Add rows from ``contributor`` computed at encoder ``version``.

        Args:
            contributor: the caller's slot (from the token map).
            embeddings: (n, dim) float16/float32, rows of norm 1 within tolerance.
            version: encoder version that computed them.

        Returns:
            The number of rows accepted (all n; a push is accepted or refused whole).

        Raises:
            InvalidPush: bad shape, dtype, non-finite value, norm, or version.
            QuotaExceeded: the push would take ``contributor`` over its quota.
        """
        rows = self._validated(embeddings)
        n = rows.shape[0]
        with self._lock:
            self._check_version_locked(version)
            key = (contributor, version)
            used = self._quota_used.get(key, 0)
            if self.quota_per_version is not None and used + n > self.quota_per_version:
                raise QuotaExceeded(
                    f"contributor quota is {self.quota_per_version} rows per version; "
                    f"{used} already pushed at version {version}, this push has {n}"
                )
            self._write_locked(rows, version, contributor)
            self._quota_used[key] = used + n
            self._counters["push_calls"] += 1
            self._counters["pushed_rows"] += n
        return n

    def quota_remaining(self, contributor: int, version: int) -> int | None:
        """Rows ``contributor`` may still push at ``version`` (``None``: no quota)."""
        if self.quota_per_version is None:
            return None
        with self._lock:
            return max(0, self.quota_per_version - self._quota_used.get((contributor, version), 0))

    def _validated(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(n, dim) renormalised float32 rows on the queue's device, or InvalidPush."""
        if not isinstance(embeddings, torch.Tensor):
            raise InvalidPush(f"embeddings must be a tensor, got {type(embeddings).__name__}")
        if embeddings.dtype not in (torch.float16, torch.float32):
            raise InvalidPush(f"embeddings dtype {embeddings.dtype} is not float16 or float32")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise InvalidPush(f"embeddings shape {list(embeddings.shape)} is not (n, {self.dim})")
        if embeddings.shape[0] == 0:
            raise InvalidPush("push has no rows")
        if embeddings.shape[0] > self.capacity:
            raise InvalidPush(
                f"push of {embeddings.shape[0]} rows exceeds capacity {self.capacity}"
            )
        # float32 first: norm and division are twice as fast on it as on float16.
        rows = embeddings.detach().to(device=self.device, dtype=torch.float32)  # n x D
        norms = torch.linalg.vector_norm(rows, dim=1)  # n
        # The extreme norms test every row at once: a NaN or Inf makes them NaN or Inf
        # (both fail the comparisons), and a zero vector is 1 away from unit norm (the
        # tolerance is below 1). Few calls matter here: each torch call costs more
        # than its arithmetic on a push of a few hundred rows.
        low, high = torch.aminmax(norms)
        tolerance = self.norm_tolerance
        if not (1.0 - tolerance <= float(low) and float(high) <= 1.0 + tolerance):
            bad = ~((norms - 1.0).abs() <= tolerance)
            raise InvalidPush(self._explain(int(bad.nonzero()[0]), float(norms[bad][0])))
        return rows / norms.unsqueeze(1)  # stored in its dtype by _write_locked

    def _explain(self, row: int, norm: float) -> str:
        if not math.isfinite(norm):
            return f"row {row} has a NaN or infinite value (or overflows float32)"
        if norm < _ZERO_NORM:
            return f"row {row} is a zero vector"
        return (
            f"row {row} has norm {norm:.4g}; rows must be unit-norm within "
            f"{self.norm_tolerance} (normalise before pushing)"
        )

    def _check_version_locked(self, version: int) -> None:
        if version > self._version:
            raise InvalidPush(f"version {version} is ahead of the queue's version {self._version}")
        if version < self._version - self.max_age:
            raise InvalidPush(
                f"version {version} is older than the queue accepts "
                f"(queue at {self._version}, max_age {self.max_age})"
            )

    def _write_locked(self, rows: torch.Tensor, version: int, contributor: int) -> None:
        n = rows.shape[0]
        first = min(n, self.capacity - self._ptr)  # rows before the end of the buffer
        parts = [(self._ptr, rows)]
        if first < n:  # wraps around the end
            parts = [(self._ptr, rows.narrow(0, 0, first)), (0, rows.narrow(0, first, n - first))]
        # narrow rather than tensor[a:b]: it skips torch's Python indexing machinery.
        for start, part in parts:
            k = part.shape[0]
            self._rows.narrow(0, start, k).copy_(part)  # casts to the storage dtype
            self._versions.narrow(0, start, k).fill_(version)
            self._contributors.narrow(0, start, k).fill_(contributor)
        self._canonical = None
        overwritten = max(0, self._size + n - self.capacity)
        self._counters["overwritten_rows"] += overwritten
        self._size = min(self.capacity, self._size + n)
        self._ptr = (self._ptr + n) % self.capacity

    # -------------------------------------------------------------------- pull

    def pull(
        self,
        n: int,
        max_age: int | None = None,
        exclude: int | None = None,
        policy: str = "uniform",
        generator: torch.Generator | None = None,
        only: int | None = None,
        *,
        max_version: int | None = None,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample at most ``n`` rows no older than ``max_age``.

        Args:
            n: most rows returned (fewer when fewer are eligible).
            max_age: age bound (``None``: the queue's ``max_age``).
            exclude: leave out this contributor's rows.
            only: return only this contributor's rows (not together with ``exclude``).
            policy: ``"uniform"`` (without replacement), ``"recent"`` (latest pushed) or
                ``"stratified"``: equal shares for every age present among the eligible
                rows (:func:`stratified_shares`, newest age first), uniform without
                replacement within an age, so rare ages are not drowned by common ones.
            generator: RNG for ``"uniform"`` and ``"stratified"`` (on the queue's device).
            max_version: only rows computed at this encoder version or before (``None``:
                any version). A puller that names the last finished round sees no row
                whose presence depends on how fast the other clients of its round are.
            seed: a reproducible pull (not with ``generator``, nor with ``"recent"``,
                which follows arrival order): the eligible rows are put in a canonical
                order, by version and then by their contents, and sampled by a generator
                seeded with ``seed``. The same rows and the same seed give the same
                reply, whatever order the rows arrived in and whichever slots they hold.

        Returns:
            ``(rows, versions)``: (m, dim) copies in the storage dtype and their
            (m,) versions, m <= n, on the queue's device.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if max_age is not None and max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if exclude is not None and only is not None:
            raise ValueError("exclude and only cannot be combined")
        canonical = seed is not None
        if canonical:
            if generator is not None:
                raise ValueError("a pull takes a seed or a generator, not both")
            if policy == "recent":
                raise ValueError(
                    "policy 'recent' picks rows by arrival order, which a seeded pull cannot repeat"
                )
            generator = torch.Generator(device=self.device).manual_seed(seed)
        age_bound = self.max_age if max_age is None else max_age
        # index_select / masked_select / narrow rather than tensor[index]: several times
        # faster on CPU, and a pull of thousands of rows is the service's hot path.
        with self._lock:
            oldest = self._version - age_bound
            if policy == "recent":
                slots = self._occupied_locked()  # oldest insertion first
                eligible = self._versions.index_select(0, slots) >= oldest
                if max_version is not None:
                    eligible &= self._versions.index_select(0, slots) <= max_version
                if exclude is not None:
                    eligible &= self._contributors.index_select(0, slots) != exclude
                if only is not None:
                    eligible &= self._contributors.index_select(0, slots) == only
                slots = slots.masked_select(eligible)
                chosen = slots[slots.numel() - min(n, slots.numel()) :]
            else:
                which = (oldest, max_version, exclude, only, canonical)
                if policy == "stratified":
                    chosen = self._stratified_locked(n, which, generator)
                else:
                    chosen = self._sample_locked(n, which, generator)
            rows = self._rows.index_select(0, chosen)
            versions = self._versions.index_select(0, chosen)
            self._counters["pull_calls"] += 1
            self._counters["pulled_rows"] += chosen.numel()
        return rows, versions

    def _sample_locked(
        self, n: int, which: _Eligibility, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Slots of at most ``n`` eligible rows, uniformly without replacement."""
        oldest, max_version, exclude, only, canonical = which
        size = self._size
        if not canonical:
            eligible = self._eligible_locked(oldest, max_version, exclude, only)
            count = int(eligible.sum())
            # int32 indices: a faster permutation and gather than int64 ones.
            pick = torch.randperm(count, generator=generator, device=self.device,
                                  dtype=torch.int32).narrow(0, 0, min(n, count))
            if count == size:  # all eligible (the usual case): the pick is the slots
                return pick
            return eligible.nonzero().squeeze(1).index_select(0, pick)
        slots = self._eligible_slots_locked(which)
        count = slots.numel()
        pick = torch.randperm(count, generator=generator, device=self.device)
        return slots.index_select(0, pick.narrow(0, 0, min(n, count)))

    def _eligible_locked(
        self, oldest: int, max_version: int | None, exclude: int | None, only: int | None
    ) -> torch.Tensor:
        """(size,) mask of the rows a pull may return, over slots 0 .. size - 1."""
        size = self._size
        # As a set, the occupied slots are 0 .. size-1 (see the module's docstring).
        versions = self._versions.narrow(0, 0, size)
        eligible = versions >= oldest
        if max_version is not None:
            eligible &= versions <= max_version
        if exclude is not None:
            eligible &= self._contributors.narrow(0, 0, size) != exclude
        if only is not None:
            eligible &= self._contributors.narrow(0, 0, size) == only
        return eligible

    def _eligible_slots_locked(self, which: _Eligibility) -> torch.Tensor:
        """Slots of the eligible rows: ascending, or in the canonical order."""
        oldest, max_version, exclude, only, canonical = which
        eligible = self._eligible_locked(oldest, max_version, exclude, only)
        if not canonical:
            return eligible.nonzero().squeeze(1)
        order = self._canonical_locked()
        return order.masked_select(eligible.index_select(0, order))

    def _canonical_locked(self) -> torch.Tensor:
        """Slots 0 .. size - 1 ordered by version, then by content: the stored row's dot
        product with a fixed direction, in float64.

        The order depends on the rows alone, not on when they arrived or where they
        sit; rows with equal keys have equal contents (up to a float64 coincidence), so
        their order cannot change a reply. Computed for the first seeded pull after the
        rows change (pushes pay nothing), then cached.
        """
        if self._canonical is None:
            size = self._size
            keys = self._rows.narrow(0, 0, size).to(torch.float64) @ self._probe  # size
            order = torch.argsort(keys, stable=True)
            by_version = torch.argsort(self._versions.index_select(0, order), stable=True)
            self._canonical = order.index_select(0, by_version)
        return self._canonical

    def _stratified_locked(
        self, n: int, which: _Eligibility, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Slots of at most ``n`` eligible rows, equal shares per version present."""
        slots = self._eligible_slots_locked(which)  # m
        versions = self._versions.index_select(0, slots)  # m
        present, sizes = torch.unique(versions, return_counts=True)  # ascending versions
        newest_first = present.flip(0).tolist()
        parts = []
        for version, share in zip(newest_first, stratified_shares(sizes.flip(0).tolist(), n),
                                  strict=True):
            members = slots.masked_select(versions == version)
            pick = torch.randperm(members.numel(), generator=generator, device=self.device)
            parts.append(members.index_select(0, pick.narrow(0, 0, share)))
        return torch.cat(parts) if parts else slots

    # ------------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Size, capacity, dim, version, max_age, quota, age histogram and counters.

        ``age_histogram[a]`` is the number of rows of age ``a`` for ``a`` in
        ``0..max_age``.
        """
        with self._lock:
            ages = self._version - self._versions[self._occupied_locked()]
            histogram = torch.bincount(ages.clamp(0, self.max_age), minlength=self.max_age + 1)
            return {
                "size": self._size,
                "capacity": self.capacity,
                "dim": self.dim,
                "version": self._version,
                "max_age": self.max_age,
                "quota_per_version": self.quota_per_version,
                "age_histogram": histogram.tolist(),
                "counters": dict(self._counters),
            }

    # ---------------------------------------------------------------- snapshot

    def snapshot(self, path: str | os.PathLike) -> Path:
        """Save rows, versions, contributors, quota use and counters to ``path``.

        Writes a temporary file next to ``path``, fsyncs it and renames it over
        ``path``, so a crash leaves either the old snapshot or the new one.
        """
        path = Path(path)
        with self._lock:
            slots = self._occupied_locked()
            state = {
                "format": SNAPSHOT_FORMAT,
                "dim": self.dim,
                "version": self._version,
                "rows": self._rows[slots].cpu(),
                "versions": self._versions[slots].cpu(),
                "contributors": self._contributors[slots].cpu(),
                "quota_used": torch.tensor(
                    [[c, v, n] for (c, v), n in self._quota_used.items()], dtype=torch.int64
                ).reshape(-1, 3),
                "counters": dict(self._counters),
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".pt.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info(
            "queue snapshot: %d rows at version %d -> %s", slots.numel(), state["version"], path
        )
        return path

    def restore(self, path: str | os.PathLike) -> None:
        """Replace the contents with a snapshot written by :meth:`snapshot`.

        The configuration (capacity, max_age, quota, device, dtype, tolerance) stays this
        queue's own; rows, versions, quota use and counters come from the file.
        If the snapshot holds more rows than ``capacity``, the newest are kept;
        rows older than ``max_age`` are evicted.

        Raises:
            ValueError: the file is not a queue snapshot or its dim differs.
        """
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a queue snapshot (format {SNAPSHOT_FORMAT})")
        if state["dim"] != self.dim:
            raise ValueError(
                f"{path} holds rows of dim {state['dim']}, this queue has dim {self.dim}"
            )
        rows, versions, contributors = state["rows"], state["versions"], state["contributors"]
        n = rows.shape[0]
        if not (
            rows.shape == (n, self.dim) and versions.shape == (n,) and contributors.shape == (n,)
        ):
            raise ValueError(f"{path} has inconsistent row, version and contributor shapes")
        if n > self.capacity:
            logger.warning(
                "snapshot has %d rows, capacity is %d: keeping the newest", n, self.capacity
            )
            rows, versions, contributors = (
                rows[-self.capacity :],
                versions[-self.capacity :],
                contributors[-self.capacity :],
            )
            n = self.capacity
        with self._lock:
            self._rows.zero_()
            self._rows[:n] = rows.to(self.device, self.storage_dtype)
            self._versions[:n] = versions.to(self.device)
            self._contributors[:n] = contributors.to(self.device)
            self._canonical = None
            self._size = n
            self._ptr = n % self.capacity
            self._version = int(state["version"])
            self._quota_used = {
                (int(c), int(v)): int(k) for c, v, k in state["quota_used"].tolist()
            }
            self._counters.update(
                {k: int(v) for k, v in state["counters"].items() if k in self._counters}
            )
            self._evict_locked()
        logger.info(
            "queue restored: %d rows at version %d from %s", self._size, self._version, path
        )
