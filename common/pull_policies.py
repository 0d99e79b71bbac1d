"""Pull policies: how the negative queue samples a pull among its eligible rows.

The one registry of them (:data:`POLICIES`). Each policy is one small object holding
its name, its ``SamplePolicy`` value in ``proto/negatives.proto``, whether a seeded pull
can repeat it, and its sampling over the queue's rows. The configuration
(``--pull-policy``), the client stub, the gRPC service and the queue all take their
policies from here, and the rule that a seeded pull cannot use an order only arrival
makes is written once (:func:`seeded_refusal`).

- ``uniform``: uniform without replacement among the eligible rows.
- ``recent``: the most recently pushed eligible rows (MoCo's FIFO view of a queue, He et
  al. 2020, arXiv:1911.05722).
- ``stratified``: equal shares for every age present among the eligible rows
  (:func:`stratified_shares`, newest age first), uniform without replacement within an
  age, so rare ages are not drowned by common ones.

torch and the generated proto module are imported where they are used: the
configuration imports this module, and ``fedcontrast --help`` should not load them.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    def occupied(self) -> torch.Tensor:
        """Slots of the occupied rows, oldest insertion first."""

    def eligible(self, which: Eligibility, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Mask of the eligible rows among ``slots`` (``None``: slots 0 .. size - 1)."""

    def eligible_slots(self, which: Eligibility) -> torch.Tensor:
        """Slots of the eligible rows: ascending, or in the canonical order."""


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


class PullPolicy:
    """One way to sample a pull.

    Attributes:
        name: the policy's name in the configuration and the Python APIs.
        wire: its ``SamplePolicy`` enum name in ``proto/negatives.proto``.
        unrepeatable: why a seeded pull cannot repeat it (``None``: it can).
    """

    name: str
    wire: str
    unrepeatable: str | None = None

    def choose(self, store: RowStore, n: int, which: Eligibility,
               generator: torch.Generator | None) -> torch.Tensor:
        """Slots of at most ``n`` eligible rows of ``store``."""
        raise NotImplementedError


class Uniform(PullPolicy):
    name, wire = "uniform", "SAMPLE_POLICY_UNIFORM"

    def choose(self, store: RowStore, n: int, which: Eligibility,
               generator: torch.Generator | None) -> torch.Tensor:
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


class Recent(PullPolicy):
    name, wire = "recent", "SAMPLE_POLICY_RECENT"
    unrepeatable = "takes the rows that arrived last, an arrival order no seeded pull can repeat"

    def choose(self, store: RowStore, n: int, which: Eligibility,
               generator: torch.Generator | None) -> torch.Tensor:
        slots = store.occupied()  # oldest insertion first
        slots = slots.masked_select(store.eligible(which, slots))
        return slots[slots.numel() - min(n, slots.numel()) :]


class Stratified(PullPolicy):
    name, wire = "stratified", "SAMPLE_POLICY_STRATIFIED"

    def choose(self, store: RowStore, n: int, which: Eligibility,
               generator: torch.Generator | None) -> torch.Tensor:
        import torch

        slots = store.eligible_slots(which)  # m
        versions = store.versions.index_select(0, slots)  # m
        present, sizes = torch.unique(versions, return_counts=True)  # ascending versions
        newest_first = present.flip(0).tolist()
        parts = []
        for version, share in zip(newest_first, stratified_shares(sizes.flip(0).tolist(), n),
                                  strict=True):
            members = slots.masked_select(versions == version)
            pick = torch.randperm(members.numel(), generator=generator, device=store.device)
            parts.append(members.index_select(0, pick.narrow(0, 0, share)))
        return torch.cat(parts) if parts else slots


#: Every pull policy by name; the first is the default.
POLICIES: dict[str, PullPolicy] = {p.name: p for p in (Uniform(), Recent(), Stratified())}
#: The policies' names, in the registry's order (the choices of ``--pull-policy``).
PULL_POLICIES = tuple(POLICIES)


def pull_policy(name: str) -> PullPolicy:
    """The policy called ``name``; ValueError naming the policies for any other name."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(PULL_POLICIES)}, got {name!r}")
    return POLICIES[name]


def seeded_refusal(name: str) -> str | None:
    """Why a seeded pull cannot use policy ``name``: it would not repeat (None: it can)."""
    policy = POLICIES.get(name)
    if policy is None or policy.unrepeatable is None:
        return None
    return f"{name!r} {policy.unrepeatable}"


def check_seeded(name: str) -> None:
    """ValueError when a seeded pull cannot use policy ``name`` (:func:`seeded_refusal`)."""
    reason = seeded_refusal(name)
    if reason is not None:
        raise ValueError(f"policy {reason}")


def repeatable_names() -> list[str]:
    """The policies a seeded pull can use."""
    return [p.name for p in POLICIES.values() if p.unrepeatable is None]


def to_wire(name: str) -> int:
    """``PullRequest.policy`` for policy ``name`` (ValueError for an unknown name)."""
    from proto import negatives_pb2 as pb

    return pb.SamplePolicy.Value(pull_policy(name).wire)


def from_wire(value: int) -> PullPolicy | None:
    """The policy ``PullRequest.policy`` names (unspecified: the default); None if unknown."""
    from proto import negatives_pb2 as pb

    if value == pb.SAMPLE_POLICY_UNSPECIFIED:
        return next(iter(POLICIES.values()))
    return next((p for p in POLICIES.values() if pb.SamplePolicy.Value(p.wire) == value), None)
