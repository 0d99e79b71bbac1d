"""How the negative queue samples a pull among its eligible rows: uniformly, without
replacement (:func:`uniform_pull`), over what :class:`Eligibility` lets through.

A pull is ``SAMPLE_POLICY_UNIFORM`` in ``proto/negatives.proto`` (or unspecified, the
same); the policies ``recent`` and ``stratified`` were removed (docs/queue.md, "Removed
options") and the service refuses their wire values.

torch is imported where it is used, so that importing this module stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Eligibility:
    """What makes a row eligible for a pull.

    Attributes:
        oldest: the oldest encoder version a row may carry.
        max_version: the newest encoder version a row may carry (``None``: any).
        exclude: leave out this contributor's rows (``None``: nobody's).
        only: only this contributor's rows (``None``: everyone's).
        canonical: sample from the rows in their canonical order (a seeded pull).
    """

    oldest: int
    max_version: int | None
    exclude: int | None
    only: int | None
    canonical: bool


class RowStore(Protocol):
    """What a policy sees of the queue's rows (held under the queue's lock)."""

    device: torch.device
    versions: torch.Tensor  # K, int64: each slot's encoder version

    @property
    def size(self) -> int: ...

    def eligible(self, which: Eligibility, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Mask of the eligible rows among ``slots`` (``None``: slots 0 .. size - 1)."""

    def eligible_slots(self, which: Eligibility) -> torch.Tensor:
        """Slots of the eligible rows: ascending, or in the canonical order."""


def uniform_pull(store: RowStore, n: int, which: Eligibility,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Slots of at most ``n`` eligible rows of ``store``, uniform without replacement."""
    import torch

    if not which.canonical:
        eligible = store.eligible(which)
        count = int(eligible.sum())
        # int32 indices: a faster permutation and gather than int64 ones.
        pick = torch.randperm(count, generator=generator, device=store.device,
                              dtype=torch.int32).narrow(0, 0, min(n, count))
        if count == store.size:  # all eligible (the usual case): the pick is the slots
            return pick
        return eligible.nonzero().squeeze(1).index_select(0, pick)
    slots = store.eligible_slots(which)
    count = slots.numel()
    pick = torch.randperm(count, generator=generator, device=store.device)
    return slots.index_select(0, pick.narrow(0, 0, min(n, count)))
