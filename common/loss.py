"""InfoNCE, per example, with queue negatives and optional in-batch negatives.

References:
    Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding"
    (InfoNCE). He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning" (MoCo: positives against a queue of negatives). Chen et al. 2020, "A Simple
    Framework for Contrastive Learning of Visual Representations" (SimCLR: NT-Xent with
    in-batch negatives).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

REDUCTIONS = ("mean", "none")


def _check_temperature(temperature: float) -> None:
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 0.2,
    in_batch: bool = False,
) -> Tensor:
    """Per-example InfoNCE loss.

    For row i with query q_i, positive key k_i and temperature T, the logits are

    - the positive ``<q_i, k_i> / T``;
    - one per queue negative n_j: ``<q_i, n_j> / T`` (MoCo);
    - with ``in_batch=True``, also ``<q_i, k_j> / T`` and ``<q_i, q_j> / T`` for every
      j != i: the 2N - 2 other views of the batch, as in SimCLR's NT-Xent with q_i as
      anchor. The symmetric SimCLR loss is the mean of ``info_nce(q, k)`` and
      ``info_nce(k, q)``.

    and ``loss_i = -pos_i + logsumexp(logits_i)`` = ``-log(exp(pos_i) / sum exp(logits_i))``.

    With ``in_batch=False`` and ``positive_key`` and ``negatives`` detached, loss_i depends
    on query_i alone, which DP-SGD's per-example clipping requires; in-batch negatives
    couple the examples.

    Inputs are expected L2-normalised along D (as :class:`common.encoders.ContrastiveModel`
    returns them); they are not renormalised here, so T is the temperature of cosine
    similarities only if the caller normalised.

    Args:
        query: (N, D) queries.
        positive_key: (N, D) positive keys, row i pairs with query i.
        negatives: (K, D) negatives shared by all rows, or ``None`` / K = 0 for none.
        temperature: T > 0.
        in_batch: add the batch's other keys and queries as negatives.

    Below T of about 0.023 (logits spanning more than 87) float32 ``exp(x - max)`` yields
    subnormals, which x86 CPUs compute slowly: the result stays exact and finite but the
    step can be several times slower (``bench/loss_bench.py``).

    Returns:
        (N,) per-example losses.

    Raises:
        ValueError: T not finite or <= 0, mismatched shapes, or no negatives at all
            (no queue rows and ``in_batch=False``, or ``in_batch=True`` with N = 1).
    """
    _check_temperature(temperature)
    if query.ndim != 2 or positive_key.shape != query.shape:
        raise ValueError(
            f"query and positive_key must both be (N, D); got {tuple(query.shape)} and "
            f"{tuple(positive_key.shape)}"
        )
    n, d = query.shape
    has_queue = negatives is not None and negatives.shape[0] > 0
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != d):
        raise ValueError(
            f"negatives must be (K, {d}) to match query (N, {d}); got {tuple(negatives.shape)}"
        )
    if not has_queue and not (in_batch and n > 1):
        raise ValueError(
            "no negatives: pass a non-empty negatives tensor (K, D), or in_batch=True with a batch of N >= 2"
        )

    pos = (query * positive_key).sum(dim=1) / temperature  # N
    logits = [pos.unsqueeze(1)]  # N x 1
    if has_queue:
        logits.append(query @ negatives.T / temperature)  # N x K
    if in_batch:
        # -inf, not subtraction of exp(diag), keeps the diagonal out exactly and stably:
        # for k it is the positive (already counted), for q it is q_i with itself.
        diag = torch.eye(n, dtype=torch.bool, device=query.device)
        logits.append((query @ positive_key.T / temperature).masked_fill(diag, -math.inf))  # N x N
        logits.append((query @ query.T / temperature).masked_fill(diag, -math.inf))  # N x N
    all_logits = torch.cat(logits, dim=1)  # N x (1 + K [+ 2N])
    return torch.logsumexp(all_logits, dim=1) - pos  # N


class InfoNCELoss(nn.Module):
    """InfoNCE (Oord et al. 2018) against queue negatives as in MoCo (He et al. 2020),
    optionally with SimCLR's in-batch negatives; see :func:`info_nce` for the exact logits.

    Attributes:
        temperature: T > 0 dividing the similarities.
        in_batch: add the batch's other keys and queries as negatives.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (the (N,) per-example losses that
            DP-SGD clips one by one).

    Raises:
        ValueError: at construction, for T not finite or <= 0 or an unknown reduction.

    Examples:
        >>> loss_fn = InfoNCELoss(temperature=0.2)
        >>> q = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)       # N x D
        >>> k = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)       # N x D
        >>> queue = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)  # K x D
        >>> loss = loss_fn(q, k.detach(), queue)
    """

    def __init__(
        self, temperature: float = 0.2, in_batch: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"unknown reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}"
            )
        self.temperature = temperature
        self.in_batch = in_batch
        self.reduction = reduction

    def forward(
        self, query: Tensor, positive_key: Tensor, negatives: Tensor | None = None
    ) -> Tensor:
        """(N, D), (N, D), (K, D) or None -> scalar, or (N,) with ``reduction="none"``."""
        loss = info_nce(query, positive_key, negatives, self.temperature, in_batch=self.in_batch)
        return loss.mean() if self.reduction == "mean" else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, in_batch={self.in_batch}, reduction={self.reduction!r}"
