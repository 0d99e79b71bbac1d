"""InfoNCE, per example, with queue negatives and optional in-batch negatives, an optional
hard-negative weighting and a temperature of the queue's own; and BYOL's regression loss
(:func:`byol_loss`), per example by construction.

References:
    Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding"
    (InfoNCE). He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning" (MoCo: positives against a queue of negatives). Chen et al. 2020, "A Simple
    Framework for Contrastive Learning of Visual Representations" (SimCLR: NT-Xent with
    in-batch negatives). Robinson et al. 2021, "Contrastive Learning with Hard Negative
    Samples" (ICLR; beta). Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning" (NeurIPS; BYOL).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["InfoNCELoss", "byol_loss", "check_hard_negative_beta", "info_nce"]

REDUCTIONS = ("mean", "none")
def _check_temperature(temperature: float) -> None:
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_hard_negative_beta(beta: float) -> None:
    """ValueError unless the hard-negative concentration beta is a finite number >= 0."""
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"hard_negative_beta must be a finite number >= 0, got {beta!r}")


def check_negative_weight(weight: float, in_batch: bool) -> None:
    """ValueError unless the negative term's weight is a finite number >= 1, and 1 with
    in-batch negatives."""
    if not (math.isfinite(weight) and weight >= 1):
        raise ValueError(f"negative_weight must be a finite number >= 1, got {weight!r}")
    if weight != 1 and in_batch:
        raise ValueError("negative_weight weighs the detached negatives of a per-example loss: "
                         "it needs in_batch=False")


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 0.2,
    in_batch: bool = False,
    *,
    hard_negative_beta: float = 0.0,
    queue_temperature: float | None = None,
    negative_weight: float = 1.0,
) -> Tensor:
    """Per-example InfoNCE loss.

    For row i with query q_i, positive key k_i and temperature T, the logits are

    - the positive ``p_i = <q_i, k_i> / T``;
    - one per queue negative n_j: ``s_ij = <q_i, n_j> / T_q`` (MoCo), where the queue's
      temperature T_q is T unless ``queue_temperature`` sets it apart;
    - with ``in_batch=True``, also ``<q_i, k_j> / T`` and ``<q_i, q_j> / T`` for every
      j != i: the 2N - 2 other views of the batch, as in SimCLR's NT-Xent with q_i as
      anchor. The symmetric SimCLR loss is the mean of ``info_nce(q, k)`` and
      ``info_nce(k, q)``.

    and ``loss_i = -p_i + logsumexp(logits_i)`` = ``-log(exp(p_i) / sum exp(logits_i))``.

    With ``hard_negative_beta`` beta > 0, the negatives' sum is replaced by Robinson et al.
    2021's hard-negative estimator, as their reference code computes it: per query i over
    its M_i negatives j (queue and in-batch), with weights h_ij = M_i e^{beta s_ij} /
    sum_k e^{beta s_ik} (mean 1 over the query's negatives),
    ``Ng_i = max(sum_j h_ij e^{s_ij}, sum_j e^{-1/T_j})`` (the clamp at the smallest value
    the sum can take, T_j the negative's temperature) and
    ``loss_i = -log(e^{p_i} / (e^{p_i} + Ng_i))``. Gradients flow through h as in their code.

    With ``negative_weight`` w > 1, ``loss_i`` gains w - 1 more times the log-sum-exp of
    the query's logits against ``negatives`` alone, ``log sum_j e^{s_ij}``: InfoNCE's
    alignment term (-p_i) and its repulsion (the log-sum-exp) weighed unequally, after
    Wang & Isola 2020 (ICML), who split the contrastive loss into alignment and uniformity
    and train with a weighted sum of the two. Only for losses without in-batch negatives.

    The weighting is computed per query from that query, its key and the negatives, so
    with ``in_batch=False`` and ``positive_key`` and ``negatives`` detached, loss_i still
    depends on query_i alone, which DP-SGD's per-example clipping requires; in-batch
    negatives couple the examples.

    Inputs are expected L2-normalised along D (as :class:`common.encoders.ContrastiveModel`
    returns them); they are not renormalised here, so T is the temperature of cosine
    similarities only if the caller normalised.

    Args:
        query: (N, D) queries.
        positive_key: (N, D) positive keys, row i pairs with query i.
        negatives: (K, D) negatives shared by all rows, or ``None`` / K = 0 for none.
        temperature: T > 0.
        in_batch: add the batch's other keys and queries as negatives.
        hard_negative_beta: beta >= 0, concentration of the weights on hard negatives
            (0: plain InfoNCE).
        queue_temperature: T_q > 0 for the queue negatives' logits only (``None``: T). A
            softer T_q than T weighs queue rows less sharply than the batch's own.
        negative_weight: w >= 1, the weight of the negative term (1: plain InfoNCE).

    Below T of about 0.023 (logits spanning more than 87) float32 ``exp(x - max)`` yields
    subnormals, which x86 CPUs compute slowly: the result stays exact and finite but the
    step can be several times slower (``bench/loss_bench.py``).

    Returns:
        (N,) per-example losses. With beta = 0, exactly the plain loss.

    Raises:
        ValueError: T or T_q not finite or <= 0, beta not finite or < 0, w not finite or
            < 1 (or > 1 with ``in_batch=True``), mismatched shapes, or no negatives at all
            (no queue rows and ``in_batch=False``, or ``in_batch=True`` with N = 1).
    """
    check_hard_negative_beta(hard_negative_beta)
    check_negative_weight(negative_weight, in_batch)
    queue_t = _check_inputs(query, positive_key, negatives, temperature, in_batch,
                            queue_temperature)
    pos = (query * positive_key).sum(dim=1) / temperature  # N
    cosines, temps = _similarities(query, positive_key, negatives, in_batch, temperature, queue_t)
    parts = [c / t for c, t in zip(cosines, temps, strict=True)]  # N x K, N x N, N x N
    if hard_negative_beta == 0:
        all_logits = torch.cat([pos.unsqueeze(1), *parts], dim=1)  # N x (1 + K [+ 2N])
        loss = torch.logsumexp(all_logits, dim=1) - pos  # N
    else:
        loss = _hard_negative_loss(pos, parts, temps, hard_negative_beta)
    if negative_weight != 1:  # parts == [queue logits]: in_batch is off
        loss = loss + (negative_weight - 1) * torch.logsumexp(parts[0], dim=1)
    return loss


def _check_inputs(query: Tensor, positive_key: Tensor, negatives: Tensor | None,
                  temperature: float, in_batch: bool, queue_temperature: float | None) -> float:
    """Raise the ``ValueError`` of :func:`info_nce` for bad inputs; return T_q."""
    _check_temperature(temperature)
    queue_t = temperature if queue_temperature is None else queue_temperature
    _check_temperature(queue_t)
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
    return queue_t


def _similarities(query: Tensor, positive_key: Tensor, negatives: Tensor | None, in_batch: bool,
                  temperature: float, queue_t: float) -> tuple[list[Tensor], list[float]]:
    """The cosines of each query with its negatives, in parts (queue N x K, then in-batch keys
    and queries N x N each, -inf where a negative is absent), and each part's temperature."""
    n = query.shape[0]
    has_queue = negatives is not None and negatives.shape[0] > 0
    cosines = []
    if has_queue:
        cosines.append(query @ negatives.T)  # N x K
    if in_batch:
        # -inf, not subtraction of exp(diag), keeps the diagonal out exactly and stably:
        # for k it is the positive (already counted), for q it is q_i with itself.
        diag = torch.eye(n, dtype=torch.bool, device=query.device)
        cosines.append((query @ positive_key.T).masked_fill(diag, -math.inf))  # N x N
        cosines.append((query @ query.T).masked_fill(diag, -math.inf))  # N x N
    temps = [queue_t] * has_queue + [temperature] * (2 * in_batch)  # one per part of cosines
    return cosines, temps


def _row_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """log sum_{j: mask_ij} e^{x_ij} per row (N,); 0 for a row with no entry (callers discard
    it), so that no gradient meets an all -inf row (whose softmax is NaN)."""
    empty = ~mask.any(dim=1, keepdim=True)  # N x 1
    return torch.logsumexp(x.masked_fill(~mask, -math.inf).masked_fill(empty, 0.0), dim=1)


def _hard_negative_loss(pos: Tensor, parts: list[Tensor], temps: list[float],
                        beta: float) -> Tensor:
    """-log(e^p / (e^p + Ng)) with the hard-negative Ng of :func:`info_nce`; (N,)."""
    logits = torch.cat(parts, dim=1)  # N x M, -inf where a negative is absent
    present = torch.isfinite(logits)  # N x M
    # -1/T_j per negative: the least logit a unit-norm pair can have.
    floor = torch.cat([torch.full((1, p.shape[1]), -1.0 / t, dtype=logits.dtype, device=logits.device)
                       for p, t in zip(parts, temps, strict=True)], dim=1)  # 1 x M
    s = logits.masked_fill(~present, 0.0)  # N x M, finite: absent entries are masked below
    count = present.sum(dim=1)  # N, M_i
    # log h_ij = log M_i + beta s_ij - log sum_k e^{beta s_ik}: weights of mean 1
    log_terms = (s + beta * s - _row_logsumexp(beta * s, present).unsqueeze(1)
                 + count.clamp(min=1).to(s).log().unsqueeze(1))  # N x M
    log_s = _row_logsumexp(log_terms, present)  # N
    log_least = _row_logsumexp(floor.expand_as(s), present)  # N, log sum_j e^{-1/T_j}
    log_ng = torch.maximum(log_s, log_least)  # the clamp
    return torch.logaddexp(pos, log_ng) - pos


class InfoNCELoss(nn.Module):
    """InfoNCE (Oord et al. 2018) against queue negatives as in MoCo (He et al. 2020),
    optionally with SimCLR's in-batch negatives; see :func:`info_nce` for the exact logits.

    Attributes:
        temperature: T > 0 dividing the similarities.
        in_batch: add the batch's other keys and queries as negatives.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (the (N,) per-example losses that
            DP-SGD clips one by one).
        hard_negative_beta: beta >= 0 of the hard-negative weighting (0: off).
        queue_temperature: T_q > 0 for the queue negatives alone (``None``: T).
        negative_weight: w >= 1, the weight of the negative term (1: plain InfoNCE).

    Raises:
        ValueError: at construction, for T or T_q not finite or <= 0, beta not finite or < 0,
            w not finite or < 1 (or > 1 with ``in_batch``), or an unknown reduction.

    Examples:
        >>> loss_fn = InfoNCELoss(temperature=0.2)
        >>> q = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)       # N x D
        >>> k = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)       # N x D
        >>> queue = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)  # K x D
        >>> loss = loss_fn(q, k.detach(), queue)
    """

    def __init__(
        self,
        temperature: float = 0.2,
        in_batch: bool = False,
        reduction: str = "mean",
        hard_negative_beta: float = 0.0,
        queue_temperature: float | None = None,
        negative_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        if queue_temperature is not None:
            _check_temperature(queue_temperature)
        check_hard_negative_beta(hard_negative_beta)
        check_negative_weight(negative_weight, in_batch)
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"unknown reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}"
            )
        self.temperature = temperature
        self.in_batch = in_batch
        self.reduction = reduction
        self.hard_negative_beta = hard_negative_beta
        self.queue_temperature = queue_temperature
        self.negative_weight = negative_weight

    def forward(
        self,
        query: Tensor,
        positive_key: Tensor,
        negatives: Tensor | None = None,
    ) -> Tensor:
        """(N, D), (N, D), (K, D) or None -> scalar, or (N,) with ``reduction="none"``."""
        loss = info_nce(query, positive_key, negatives, self.temperature, in_batch=self.in_batch,
                        hard_negative_beta=self.hard_negative_beta,
                        queue_temperature=self.queue_temperature,
                        negative_weight=self.negative_weight)
        return loss.mean() if self.reduction == "mean" else loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, queue_temperature={self.queue_temperature}, "
                f"in_batch={self.in_batch}, reduction={self.reduction!r}, "
                f"hard_negative_beta={self.hard_negative_beta}, "
                f"negative_weight={self.negative_weight}")


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's loss per example, ``||p/|p| - z'/|z'|||^2 = 2 - 2 cos(p, sg(z'))``.

    Grill et al. 2020, eq. 2: the online network's prediction ``p`` of one view regresses
    the target network's projection ``z'`` of the other; no gradient reaches the target
    (it is detached here). Example i's loss depends on example i alone. BYOL's total
    loss adds the same term with the views swapped (see :class:`client.byol.BYOLTrainer`).

    Args:
        prediction: p (N, D), the online predictor's output, any norm.
        target: z' (N, D), the target projection of the other view, any norm.

    Returns:
        (N,) losses in [0, 4].
    """
    if prediction.shape != target.shape or prediction.ndim != 2:
        raise ValueError(f"prediction and target must both be (N, D), got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")
    p = nn.functional.normalize(prediction, dim=1)  # N x D
    z = nn.functional.normalize(target.detach(), dim=1)  # N x D, stop-gradient
    return 2.0 - 2.0 * (p * z).sum(dim=1)
