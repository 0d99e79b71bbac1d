"""Prototypes of the queue's rows: spherical k-means centroids every node of a round shares.

Orchestra (Lubana et al., "Orchestra: Unsupervised Federated Learning via Globally
Consistent Clustering", ICML 2022, arXiv 2205.11506) clusters the clients'
representations into global centroids that every client contrasts against. Here the
server clusters the global queue's rows at the start of a round (``--prototypes K``) and
sends the centroids with the round's message; the loss that uses them is
:func:`common.loss.prototype_loss`.

The clustering is Lloyd's algorithm on the unit sphere (Dhillon & Modha 2001): a row
belongs to the centroid of highest cosine, a centroid is the normalised sum of its rows.
A fixed number of iterations from centroids drawn by a seeded generator, on rows in an
order that does not depend on their arrival (:meth:`server.queue.NegativeQueue.rows`),
makes the prototypes a function of the rows and the seed, so a run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["KMEANS_ITERATIONS", "RECORD", "checked_prototypes", "prototype_seed", "round_prototypes",
           "spherical_kmeans"]

#: Name of the TRAIN message's record holding the round's prototypes, and of its one
#: array (``server/contract.py``).
RECORD = "prototypes"

#: Lloyd iterations per clustering: fixed, so the cost is known and the result repeatable.
KMEANS_ITERATIONS = 10


def prototype_seed(base_seed: int, server_round: int) -> int:
    """Seed of round ``server_round``'s clustering, drawn from the run's ``--seed``."""
    return (base_seed * 1_000_003 + 0x70726F74 * 7919 + server_round) % 2**63


def spherical_kmeans(rows: Tensor, k: int, *, seed: int,
                     iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """(k, D) unit-norm centroids of ``rows`` (M, D), M >= k, by spherical k-means.

    The first centroids are k distinct rows drawn by a generator seeded with ``seed``;
    each iteration assigns every row to its centroid of highest cosine and moves each
    centroid to the normalised sum of its rows; a centroid left without rows stays where
    it was. Computed in float64, returned in float32.

    Raises:
        ValueError: ``rows`` is not (M, D) with M >= k >= 1, or ``iterations`` < 1.
    """
    if k < 1 or iterations < 1:
        raise ValueError(f"spherical_kmeans needs k >= 1 and iterations >= 1, got {k} and {iterations}")
    if rows.ndim != 2 or rows.shape[0] < k:
        raise ValueError(f"spherical_kmeans needs an (M, D) tensor of at least k = {k} rows, "
                         f"got shape {tuple(rows.shape)}")
    x = torch.nn.functional.normalize(rows.detach().to("cpu", torch.float64), dim=1)  # M x D
    generator = torch.Generator().manual_seed(seed)
    centroids = x.index_select(0, torch.randperm(x.shape[0], generator=generator)[:k])  # k x D
    for _ in range(iterations):
        assigned = (x @ centroids.T).argmax(dim=1)  # M
        sums = torch.zeros_like(centroids).index_add_(0, assigned, x)  # k x D
        norms = sums.norm(dim=1, keepdim=True)  # k x 1
        centroids = torch.where(norms > 0, sums / norms.clamp(min=1e-12), centroids)
    return centroids.to(torch.float32)


def round_prototypes(rows: Tensor, k: int, base_seed: int, server_round: int) -> Tensor | None:
    """Round ``server_round``'s (k, D) prototypes of the queue's ``rows`` (M, D), or ``None``
    when there are none to make: ``k`` is 0 (``--prototypes`` off) or M < k (round 1, or a
    queue not yet full enough)."""
    if k == 0 or rows.shape[0] < k:
        return None
    return spherical_kmeans(rows, k, seed=prototype_seed(base_seed, server_round))


def checked_prototypes(arrays: Mapping[str, Tensor], k: int, dim: int) -> Tensor:
    """The (k, dim) prototypes of a message's :data:`RECORD` record (name -> tensor), checked.

    Raises:
        ValueError: another array name, shape or dtype than ``--prototypes`` and
            ``--embedding-dim`` give, a non-finite value, or a row that is not unit norm.
    """
    if set(arrays) != {RECORD} or arrays[RECORD].dtype != torch.float32 \
            or tuple(arrays[RECORD].shape) != (k, dim):
        shapes = {name: (str(t.dtype), tuple(t.shape)) for name, t in arrays.items()}
        raise ValueError(f"the message's prototypes are {shapes}, expected one float32 array "
                         f"{RECORD!r} of shape ({k}, {dim}) (--prototypes, --embedding-dim)")
    prototypes = arrays[RECORD]
    if not torch.isfinite(prototypes).all() or not torch.allclose(
            prototypes.norm(dim=1), torch.ones(k), atol=1e-3):
        raise ValueError("the message's prototypes hold a non-finite value or a row that is not unit norm")
    return prototypes
