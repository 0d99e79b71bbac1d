"""The global queue of negative embeddings: a version-tagged ring buffer behind one lock.

Rows are unit-norm embeddings of dimension ``dim``. Each row carries the encoder
version (round) that computed it and an opaque contributor slot, used for quotas
and for leaving a caller's own rows out of a pull, and never returned by
:meth:`NegativeQueue.pull`.

Ages and versions:

- ``age = queue.version - row.version``. :meth:`NegativeQueue.advance` moves the
  queue to a new version and evicts rows older than ``max_age``.
- A push at a version ahead of the queue's is refused (the encoder that made it
  does not exist yet); so is a push older than ``max_age`` (it would be evicted
  already), and one at a negative version (versions start at 0: at version 0 the
  age bound alone would let versions that never existed take quota). A push at the previous version after an advance is accepted, so a
  client that finishes its round late still contributes.

The queue validates pushes and pulls and keeps the counters; its parts are rooms of
their own: the storage (:mod:`server.ring_buffer`), push quotas (:mod:`server.quotas`),
how a pull samples (:mod:`common.pull_policies`: uniformly) and the snapshot file
(:mod:`server.snapshot`).

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
import threading
from pathlib import Path
from typing import Any

import torch

from common.pull_policies import Eligibility, uniform_pull
from server.quotas import Quotas
from server.ring_buffer import RingBuffer
from server.snapshot import SNAPSHOT_FORMAT, SnapshotError, read_snapshot, write_snapshot

logger = logging.getLogger(__name__)

#: Rows whose norm is below this are zero vectors, whatever the tolerance.
_ZERO_NORM = 1e-6


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
        self._ring = RingBuffer(capacity, dim, storage_dtype, self.device)
        self._quotas = Quotas(quota_per_version)
        self._version = 0
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
        return self._ring.size

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
        self._quotas.forget_before(oldest)
        evicted = self._ring.drop_older_than(oldest)
        self._counters["evicted_rows"] += evicted
        return evicted

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
            refusal = self._quotas.refusal(contributor, version, n)
            if refusal is not None:
                raise QuotaExceeded(refusal)
            self._counters["overwritten_rows"] += self._ring.write(rows, version, contributor)
            self._quotas.add(contributor, version, n)
            self._counters["push_calls"] += 1
            self._counters["pushed_rows"] += n
        return n

    def quota_remaining(self, contributor: int, version: int) -> int | None:
        """Rows ``contributor`` may still push at ``version`` (``None``: no quota)."""
        with self._lock:
            return self._quotas.remaining(contributor, version)

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
        if version < 0:
            raise InvalidPush(f"version {version} is negative; versions start at 0")
        if version < self._version - self.max_age:
            raise InvalidPush(
                f"version {version} is older than the queue accepts "
                f"(queue at {self._version}, max_age {self.max_age})"
            )

    # -------------------------------------------------------------------- pull

    def pull(
        self,
        n: int,
        max_age: int | None = None,
        exclude: int | None = None,
        generator: torch.Generator | None = None,
        only: int | None = None,
        *,
        max_version: int | None = None,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample at most ``n`` rows no older than ``max_age``, uniformly without replacement.

        Args:
            n: most rows returned (fewer when fewer are eligible).
            max_age: age bound (``None``: the queue's ``max_age``).
            exclude: leave out this contributor's rows.
            only: return only this contributor's rows (not together with ``exclude``).
            generator: RNG of the sampling (on the queue's device).
            max_version: only rows computed at this encoder version or before (``None``:
                any version). A puller that names the last finished round sees no row
                whose presence depends on how fast the other clients of its round are.
            seed: a reproducible pull (not with ``generator``): the eligible
                rows are put in a canonical order, by version and then by their contents,
                and sampled by a generator seeded with ``seed``. The same rows and the same
                seed give the same reply, whatever order the rows arrived in and whichever
                slots they hold.

        Returns:
            ``(rows, versions)``: (m, dim) copies in the storage dtype and their
            (m,) versions, m <= n, on the queue's device.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if max_age is not None and max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        if exclude is not None and only is not None:
            raise ValueError("exclude and only cannot be combined")
        canonical = seed is not None
        if canonical:
            if generator is not None:
                raise ValueError("a pull takes a seed or a generator, not both")
            generator = torch.Generator(device=self.device).manual_seed(seed)
        age_bound = self.max_age if max_age is None else max_age
        # index_select / masked_select / narrow rather than tensor[index]: several times
        # faster on CPU, and a pull of thousands of rows is the service's hot path.
        with self._lock:
            which = Eligibility(self._version - age_bound, max_version, exclude, only, canonical)
            chosen = uniform_pull(self._ring, n, which, generator)
            rows = self._ring.rows.index_select(0, chosen)
            versions = self._ring.versions.index_select(0, chosen)
            self._counters["pull_calls"] += 1
            self._counters["pulled_rows"] += chosen.numel()
        return rows, versions

    # ------------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Size, capacity, dim, version, max_age, quota, age histogram and counters.

        ``age_histogram[a]`` is the number of rows of age ``a`` for ``a`` in
        ``0..max_age``.
        """
        with self._lock:
            ages = self._version - self._ring.versions[self._ring.occupied()]
            histogram = torch.bincount(ages.clamp(0, self.max_age), minlength=self.max_age + 1)
            return {
                "size": self._ring.size,
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
        """Save rows, versions, contributors, quota use and counters to ``path``
        (:func:`server.snapshot.write_snapshot`: a crash leaves the old file or the new)."""
        with self._lock:
            rows, versions, contributors = self._ring.ordered()
            state = {
                "dim": self.dim,
                "version": self._version,
                "rows": rows,
                "versions": versions,
                "contributors": contributors,
                "quota_used": self._quotas.to_tensor(),
                "counters": dict(self._counters),
            }
        path = write_snapshot(state, path)
        logger.info(
            "queue snapshot: %d rows at version %d -> %s", rows.shape[0], state["version"], path
        )
        return path

    def restore(self, path: str | os.PathLike) -> None:
        """Replace the contents with a snapshot written by :meth:`snapshot`.

        The configuration (capacity, max_age, quota, device, dtype, tolerance) stays this
        queue's own; rows, versions, quota use and counters come from the file, which is
        validated as a push would be: its structure and checksum
        (:func:`server.snapshot.read_snapshot`), then every row (finite, unit norm within
        the tolerance). If the snapshot holds more rows than ``capacity``, the newest
        are kept; rows over today's quota for their contributor and version are dropped,
        with a warning; rows older than ``max_age`` are evicted.

        Raises:
            SnapshotError: the file is no valid queue snapshot for this queue; the queue
                is unchanged.
        """
        state = read_snapshot(path, self.dim)
        rows, versions, contributors = state["rows"], state["versions"], state["contributors"]
        n = rows.shape[0]
        if n > self.capacity:
            logger.warning(
                "snapshot has %d rows, capacity is %d: keeping the newest", n, self.capacity
            )
            rows, versions, contributors = (
                rows[-self.capacity :],
                versions[-self.capacity :],
                contributors[-self.capacity :],
            )
        if rows.shape[0]:
            try:  # checked, not renormalised: a restored queue holds the bytes it saved
                self._validated(rows)
            except InvalidPush as exc:
                raise SnapshotError(path, f"holds an invalid row: {exc}") from None
        if state["checksum"] is None:
            logger.warning("%s has no checksum (written before format %d); its rows passed "
                           "validation", path, SNAPSHOT_FORMAT)
        keep = self._quotas.within(contributors, versions)
        if not bool(keep.all()):
            logger.warning("snapshot %s: dropped %d rows over today's quota of %s rows per "
                           "contributor and version", path, int((~keep).sum()),
                           self.quota_per_version)
            rows, versions, contributors = rows[keep], versions[keep], contributors[keep]
        with self._lock:
            self._ring.reset(rows, versions, contributors)
            self._version = state["version"]
            self._quotas.load(state["quota_used"])
            self._counters.update(
                {k: v for k, v in state["counters"].items() if k in self._counters}
            )
            self._evict_locked()
        logger.info(
            "queue restored: %d rows at version %d from %s", self._ring.size, self._version, path
        )
