"""Push quotas: the rows each contributor may push per encoder version.

A quota keeps one client from flushing the queue with its own rows. Use is recorded
per (contributor slot, version) and forgotten with the versions the queue evicts.
Not thread-safe: :class:`server.queue.NegativeQueue` calls it under its lock.
"""

from __future__ import annotations

import torch


class Quotas:
    """Rows pushed per (contributor, version), against at most ``per_version`` each.

    Args:
        per_version: most rows one contributor may push per version (``None``: no quota).
    """

    def __init__(self, per_version: int | None) -> None:
        self.per_version = per_version
        self._used: dict[tuple[int, int], int] = {}  # (contributor, version) -> rows

    def refusal(self, contributor: int, version: int, n: int) -> str | None:
        """Why ``contributor`` may not push ``n`` more rows at ``version``; None if it may."""
        used = self._used.get((contributor, version), 0)
        if self.per_version is not None and used + n > self.per_version:
            return (f"contributor quota is {self.per_version} rows per version; "
                    f"{used} already pushed at version {version}, this push has {n}")
        return None

    def add(self, contributor: int, version: int, n: int) -> None:
        """Record ``n`` rows pushed by ``contributor`` at ``version``."""
        key = (contributor, version)
        self._used[key] = self._used.get(key, 0) + n

    def remaining(self, contributor: int, version: int) -> int | None:
        """Rows ``contributor`` may still push at ``version`` (``None``: no quota)."""
        if self.per_version is None:
            return None
        return max(0, self.per_version - self._used.get((contributor, version), 0))

    def within(self, contributors: torch.Tensor, versions: torch.Tensor) -> torch.Tensor:
        """Mask of the rows (oldest first, with these contributors and versions) that fit in
        the quota: for each (contributor, version), its first ``per_version`` rows."""
        counts: dict[tuple[int, int], int] = {}
        keep = []
        for key in zip(contributors.tolist(), versions.tolist(), strict=True):
            counts[key] = counts.get(key, 0) + 1
            keep.append(self.per_version is None or counts[key] <= self.per_version)
        return torch.tensor(keep, dtype=torch.bool)

    def forget_before(self, oldest: int) -> None:
        """Drop the records of versions before ``oldest``."""
        self._used = {k: v for k, v in self._used.items() if k[1] >= oldest}

    def to_tensor(self) -> torch.Tensor:
        """(m, 3) int64 rows of (contributor, version, rows pushed): the snapshot's form."""
        return torch.tensor(
            [[c, v, n] for (c, v), n in self._used.items()], dtype=torch.int64
        ).reshape(-1, 3)

    def load(self, used: torch.Tensor) -> None:
        """Replace the records with those of :meth:`to_tensor`'s form (use over the
        quota, from a snapshot of a queue with a larger one, counts as the quota)."""
        cap = self.per_version
        self._used = {(int(c), int(v)): int(k) if cap is None else min(int(k), cap)
                      for c, v, k in used.tolist()}
