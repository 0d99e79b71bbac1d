"""The negative queue's storage: a ring buffer of rows with their versions and contributors.

Layout: the occupied rows are the ``size`` slots before ``ptr`` (mod capacity), oldest
insertion first. A write goes at ``ptr`` and, when the buffer is full, overwrites the
oldest insertions, as in MoCo's ``_dequeue_and_enqueue`` (He et al. 2020,
arXiv:1911.05722). Dropping old rows compacts the survivors to the front so the
invariant holds. The ring only wraps once it is full, so as a set the occupied slots
are always ``0 .. size - 1``: a uniform pull samples from them without ordering them.

Canonical order (for seeded pulls): by version and then by a content key, each row's
dot product with a fixed direction. Which slot a row holds and when it arrived do not
enter, so two buffers holding the same rows order them alike.

Not thread-safe: :class:`server.queue.NegativeQueue` calls it under its lock. It is the
:class:`common.pull_policies.RowStore` a pull samples from.
"""

from __future__ import annotations

import torch

from common.pull_policies import Eligibility

#: Seed of the fixed direction whose dot product with a row is the row's content key,
#: the tie-break of the canonical order that seeded pulls sample from.
_KEY_SEED = 0x5EED


class RingBuffer:
    """``capacity`` rows of dimension ``dim`` in ``storage_dtype`` on ``device``."""

    def __init__(self, capacity: int, dim: int, storage_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.capacity = capacity
        self.dim = dim
        self.device = device
        self.rows = torch.zeros(capacity, dim, dtype=storage_dtype, device=device)  # K x D
        self.versions = torch.zeros(capacity, dtype=torch.int64, device=device)  # K
        self.contributors = torch.zeros(capacity, dtype=torch.int64, device=device)  # K
        # Content keys are each stored row's dot product with this fixed direction.
        self._probe = torch.randn(
            dim, generator=torch.Generator().manual_seed(_KEY_SEED), dtype=torch.float64
        ).to(device)  # D
        self._canonical: torch.Tensor | None = None  # cached canonical order of the slots
        self.ptr = 0
        self._size = 0

    @property
    def size(self) -> int:
        """Occupied rows."""
        return self._size

    def occupied(self) -> torch.Tensor:
        """Slots of the occupied rows, oldest insertion first."""
        start = self.ptr - self._size
        return torch.arange(start, self.ptr, device=self.device) % self.capacity

    def write(self, rows: torch.Tensor, version: int, contributor: int) -> int:
        """Add ``rows`` (n <= capacity) at the pointer; returns how many rows they overwrote."""
        n = rows.shape[0]
        first = min(n, self.capacity - self.ptr)  # rows before the end of the buffer
        parts = [(self.ptr, rows)]
        if first < n:  # wraps around the end
            parts = [(self.ptr, rows.narrow(0, 0, first)), (0, rows.narrow(0, first, n - first))]
        # narrow rather than tensor[a:b]: it skips torch's Python indexing machinery.
        for start, part in parts:
            k = part.shape[0]
            self.rows.narrow(0, start, k).copy_(part)  # casts to the storage dtype
            self.versions.narrow(0, start, k).fill_(version)
            self.contributors.narrow(0, start, k).fill_(contributor)
        self._canonical = None
        overwritten = max(0, self._size + n - self.capacity)
        self._size = min(self.capacity, self._size + n)
        self.ptr = (self.ptr + n) % self.capacity
        return overwritten

    def drop_older_than(self, oldest: int) -> int:
        """Drop rows of versions before ``oldest``, compacting the survivors; returns how many."""
        order = self.occupied()
        keep = order[self.versions[order] >= oldest]
        dropped = self._size - keep.numel()
        if dropped:
            self.load(self.rows[keep], self.versions[keep], self.contributors[keep])
        return dropped

    def reset(self, rows: torch.Tensor, versions: torch.Tensor, contributors: torch.Tensor) -> None:
        """Empty the buffer, then :meth:`load` ``rows``."""
        self.rows.zero_()
        self.load(rows, versions, contributors)

    def load(self, rows: torch.Tensor, versions: torch.Tensor, contributors: torch.Tensor) -> None:
        """Replace the contents with ``rows`` (n <= capacity), oldest insertion first."""
        n = rows.shape[0]
        self.rows[:n] = rows.to(self.device, self.rows.dtype)
        self.versions[:n] = versions.to(self.device)
        self.contributors[:n] = contributors.to(self.device)
        self._canonical = None
        self._size = n
        self.ptr = n % self.capacity

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows, versions and contributors of the occupied slots, oldest insertion first, on CPU."""
        slots = self.occupied()
        return self.rows[slots].cpu(), self.versions[slots].cpu(), self.contributors[slots].cpu()

    def eligible(self, which: Eligibility, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Mask of the rows a pull may return, among ``slots`` (``None``: 0 .. size - 1)."""
        if slots is None:
            # As a set, the occupied slots are 0 .. size-1 (see the module's docstring).
            versions = self.versions.narrow(0, 0, self._size)
            contributors = self.contributors.narrow(0, 0, self._size)
        else:
            versions = self.versions.index_select(0, slots)
            contributors = None
        eligible = versions >= which.oldest
        if which.max_version is not None:
            eligible &= versions <= which.max_version
        if which.exclude is not None or which.only is not None:
            if contributors is None:
                contributors = self.contributors.index_select(0, slots)
            if which.exclude is not None:
                eligible &= contributors != which.exclude
            if which.only is not None:
                eligible &= contributors == which.only
        return eligible

    def eligible_slots(self, which: Eligibility) -> torch.Tensor:
        """Slots of the eligible rows: ascending, or in the canonical order."""
        eligible = self.eligible(which)
        if not which.canonical:
            return eligible.nonzero().squeeze(1)
        order = self.canonical()
        return order.masked_select(eligible.index_select(0, order))

    def canonical(self) -> torch.Tensor:
        """Slots 0 .. size - 1 ordered by version, then by content: the stored row's dot
        product with a fixed direction, in float64.

        The order depends on the rows alone, not on when they arrived or where they
        sit; rows with equal keys have equal contents (up to a float64 coincidence), so
        their order cannot change a reply. Computed for the first seeded pull after the
        rows change (writes pay nothing), then cached.
        """
        if self._canonical is None:
            size = self._size
            keys = self.rows.narrow(0, 0, size).to(torch.float64) @ self._probe  # size
            order = torch.argsort(keys, stable=True)
            by_version = torch.argsort(self.versions.index_select(0, order), stable=True)
            self._canonical = order.index_select(0, by_version)
        return self._canonical
