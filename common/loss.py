"""InfoNCE, per example, with queue negatives and optional in-batch negatives, and the
options that change how each query treats its negatives (all off by default); and
BYOL's regression loss (:func:`byol_loss`), per example by construction.

References:
    Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding"
    (InfoNCE). He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning" (MoCo: positives against a queue of negatives). Chen et al. 2020, "A Simple
    Framework for Contrastive Learning of Visual Representations" (SimCLR: NT-Xent with
    in-batch negatives). Huynh et al. 2022, "Boosting Contrastive Self-Supervised Learning
    with False Negative Cancellation" (WACV; false negatives dropped or attracted).
    Chuang et al. 2020, "Debiased Contrastive Learning" (NeurIPS; tau+). Robinson et al.
    2021, "Contrastive Learning with Hard Negative Samples" (ICLR; beta). Grill et al.
    2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
    (NeurIPS; BYOL). Caron et al. 2020, "Unsupervised Learning of Visual Features by
    Contrasting Cluster Assignments" (NeurIPS; SwAV: swapped prediction). Lubana et al.
    2022, "Orchestra: Unsupervised Federated Learning via Globally Consistent Clustering"
    (ICML; global prototypes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from common.negative_options import NegativeOptions

__all__ = ["PROTOTYPE_TARGET_TEMPERATURE", "InfoNCELoss", "NegativeOptions", "byol_loss", "info_nce",
           "neighbour_info_nce", "prototype_loss", "staleness_log_weights"]

REDUCTIONS = ("mean", "none")
#: Temperature of :func:`prototype_loss`'s targets: sharper than the prediction's, so an
#: example's target puts most of its mass on its nearest prototypes (SwAV's Sinkhorn
#: targets are near one-hot; DINO sharpens its teacher at 0.04 to 0.07 against 0.1).
PROTOTYPE_TARGET_TEMPERATURE = 0.05


def staleness_log_weights(ages: Tensor, gamma: float) -> Tensor:
    """``log(gamma ** age)`` per negative: a row of age a enters the softmax with weight gamma^a.

    Args:
        ages: (K,) ages in rounds (queue version - row version), >= 0.
        gamma: in (0, 1]; 1 weighs every row alike (plain InfoNCE).

    Returns:
        (K,) float log-weights ``age * log(gamma)``, for ``info_nce(negative_log_weights=)``.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if ages.ndim != 1 or (ages.numel() and int(ages.min()) < 0):
        raise ValueError(f"ages must be a (K,) tensor of values >= 0, got shape {tuple(ages.shape)}")
    return ages.to(torch.get_default_dtype()) * math.log(gamma)


def _check_temperature(temperature: float) -> None:
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 0.2,
    in_batch: bool = False,
    *,
    negative_log_weights: Tensor | None = None,
    options: NegativeOptions | None = None,
    queue_temperature: float | None = None,
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

    The options change this per query i, over its M_i negatives j (queue and in-batch):

    - ``negative_log_weights`` l_j (queue negatives; in-batch ones have 0): negative j
      enters the denominator with weight w_j = e^{l_j}, i.e. its logit becomes s_ij + l_j.
      Staleness weighting passes ``a_j log gamma`` (:func:`staleness_log_weights`).
    - false negatives F_i (:class:`NegativeOptions`; chosen on the cosine <q_i, n_j>,
      without gradient): ``drop`` removes them from the denominator; ``positive`` makes
      them positives, ``loss_i = logsumexp(logits_i) - (p_i + sum_{f in F_i} (s_if + l_f))
      / (1 + |F_i|)`` over the same logits (Huynh et al. 2022, attraction; SupCon's form).
    - debiasing and hard negatives replace the negatives' sum by an estimator
      (Chuang et al. 2020's debiased objective, Robinson et al. 2021's hard-negative
      objective, as their reference code computes them):
      with hard-negative weights h_ij = M_i e^{beta s_ij} / sum_k e^{beta s_ik} (mean 1
      over the query's negatives; 1 when beta = 0),
      ``S_i = sum_j w_j h_ij e^{s_ij}``, ``W_i = sum_j w_j`` (= M_i without staleness),
      ``Ng_i = max((S_i - tau+ W_i e^{p_i}) / (1 - tau+), sum_j w_j e^{-1/T_j})`` (the
      clamp at the smallest value the sum can take, T_j the negative's temperature), and
      ``loss_i = -log(e^{p_i} / (e^{p_i} + Ng_i))``.
      Gradients flow through h as in Robinson et al.'s code. ``drop`` may precede it;
      a query left without negatives has loss 0.

    Every option is computed per query from that query, its key and the negatives, so
    with ``in_batch=False`` and ``positive_key`` and ``negatives`` detached, loss_i still
    depends on query_i alone, which DP-SGD's per-example clipping requires; in-batch
    negatives couple the examples.

    Inputs are expected L2-normalised along D (as :class:`common.encoders.ContrastiveModel`
    returns them); they are not renormalised here, so T is the temperature of cosine
    similarities (and the threshold a cosine) only if the caller normalised.

    Args:
        query: (N, D) queries.
        positive_key: (N, D) positive keys, row i pairs with query i.
        negatives: (K, D) negatives shared by all rows, or ``None`` / K = 0 for none.
        temperature: T > 0.
        in_batch: add the batch's other keys and queries as negatives.
        negative_log_weights: (K,) finite log-weights of the queue negatives, or ``None``
            (all 0).
        options: false-negative cancellation, debiasing, hard negatives (``None``: off).
        queue_temperature: T_q > 0 for the queue negatives' logits only (``None``: T). A
            softer T_q than T weighs queue rows less sharply than the batch's own.

    Below T of about 0.023 (logits spanning more than 87) float32 ``exp(x - max)`` yields
    subnormals, which x86 CPUs compute slowly: the result stays exact and finite but the
    step can be several times slower (``bench/loss_bench.py``).

    Returns:
        (N,) per-example losses. With no option and no weights, exactly the plain loss.

    Raises:
        ValueError: T or T_q not finite or <= 0, mismatched shapes, or no negatives at all
            (no queue rows and ``in_batch=False``, or ``in_batch=True`` with N = 1).
    """
    queue_t = _check_inputs(query, positive_key, negatives, temperature, in_batch,
                            negative_log_weights, queue_temperature)
    pos = (query * positive_key).sum(dim=1) / temperature  # N
    cosines, temps = _similarities(query, positive_key, negatives, in_batch, temperature, queue_t)
    parts = [c / t for c, t in zip(cosines, temps, strict=True)]  # N x K, N x N, N x N
    opts = options or NegativeOptions()
    if negative_log_weights is None and not opts.active:
        all_logits = torch.cat([pos.unsqueeze(1), *parts], dim=1)  # N x (1 + K [+ 2N])
        return torch.logsumexp(all_logits, dim=1) - pos  # N
    return _optioned_loss(pos, cosines, parts, temps, negative_log_weights, opts)


def neighbour_info_nce(
    query: Tensor,
    positive_key: Tensor,
    rows: Tensor,
    temperature: float = 0.2,
    in_batch: bool = False,
    *,
    negative_log_weights: Tensor | None = None,
    options: NegativeOptions | None = None,
    queue_temperature: float | None = None,
) -> Tensor:
    """Per-example InfoNCE in which each query's positive is its positive key's nearest
    queue row(s): neighbourhood matching across clients.

    Wu et al. 2022 ("Decentralized Unsupervised Learning of Visual Representations",
    IJCAI, arXiv 2111.10763) match each local feature to its nearest remote features;
    NNCLR (Dwibedi et al. 2021) takes the nearest neighbour of one view in a support set
    as the positive of the other view. Here the support set is the queue ``rows`` (other
    clients' embeddings) and, for query i, the neighbours N_i are chosen on the cosines
    ``<k_i, r_j>`` of its positive key (the other view), without gradient:

    - the single nearest row (``options`` off);
    - with a false-negative mode in ``options``, its suspects instead
      (``false_negative_top_k`` and/or ``false_negative_threshold``, see :func:`info_nce`):
      the rows that machinery would not treat as plain negatives are the neighbours. A
      query with none has loss 0.

    With s_ij = <q_i, r_j> / T_q + l_j for the rows that are not neighbours, the
    neighbours' logits ``p_in = <q_i, r_n> / T + l_n`` (a positive's temperature T), and the
    in-batch negatives of :func:`info_nce` when ``in_batch`` (the other keys and queries;
    k_i itself is not in this term)::

        loss_i = logsumexp(p_iN_i, s_i, in-batch_i) - mean_{n in N_i} p_in

    the row is the positive against the same negatives; with several neighbours the
    SupCon form of :func:`info_nce`'s ``positive`` mode. The debiasing and hard-negative
    options do not apply to this term. ``rows`` are detached here: the gradient reaches
    the query (and, with ``in_batch``, the batch's keys and queries), never a row. Each
    loss_i depends on query_i, key_i and the rows alone when ``in_batch=False``, so the
    term keeps DP-SGD's per-example clipping valid.

    Args:
        query: (N, D) queries, unit norm.
        positive_key: (N, D) keys of the other view; their neighbours are looked up.
        rows: (K, D) unit-norm queue rows, K >= 1.
        temperature, in_batch, negative_log_weights, queue_temperature: as :func:`info_nce`
            (the log-weights are the rows').
        options: only its false-negative selection is used (``None``: the nearest row).

    Returns:
        (N,) per-example losses.

    Raises:
        ValueError: as :func:`info_nce`, or no rows.
    """
    if rows is None or rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError("neighbour_info_nce needs a non-empty (K, D) tensor of queue rows")
    rows = rows.detach()
    queue_t = _check_inputs(query, positive_key, rows, temperature, in_batch,
                            negative_log_weights, queue_temperature)
    with torch.no_grad():
        nearest = _neighbours(positive_key.detach() @ rows.T, options)  # N x K
    cosines, temps = _similarities(query, positive_key, rows, in_batch, temperature, queue_t)
    log_w = 0.0 if negative_log_weights is None else negative_log_weights.to(cosines[0])  # K
    queue = torch.where(nearest, cosines[0] / temperature, cosines[0] / queue_t) + log_w  # N x K
    logits = torch.cat([queue, *(c / t for c, t in zip(cosines[1:], temps[1:], strict=True))], dim=1)
    count = nearest.sum(dim=1)  # N, |N_i|
    matched = torch.where(nearest, queue, 0.0).sum(dim=1) / count.clamp(min=1)  # N
    return torch.where(count > 0, torch.logsumexp(logits, dim=1) - matched, 0.0)


def prototype_loss(
    query: Tensor,
    positive_key: Tensor,
    prototypes: Tensor,
    temperature: float = 0.2,
    target_temperature: float = PROTOTYPE_TARGET_TEMPERATURE,
) -> Tensor:
    """Per-example swapped prediction of the other view's assignment to shared prototypes.

    Orchestra (Lubana et al. 2022, "Orchestra: Unsupervised Federated Learning via Globally
    Consistent Clustering", ICML, arXiv 2205.11506) clusters the clients' representations
    into global centroids and trains each client to predict one view's cluster assignment
    from the other view, SwAV's swapped prediction (Caron et al. 2020, "Unsupervised
    Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS, arXiv
    2006.09882). With the prototypes C (K, D) and, for example i, its query q_i and its
    positive key k_i (the other view)::

        t_i = softmax(<k_i, C> / T_t)          (without gradient: the target)
        loss_i = - sum_c t_ic log_softmax(<q_i, C> / T)_c

    SwAV and Orchestra balance the targets over the batch (Sinkhorn-Knopp); that couples
    the examples of a batch, so here each target is the key's own sharpened assignment
    (``target_temperature`` below ``temperature``) and loss_i depends on q_i, k_i and the
    prototypes alone: the term keeps DP-SGD's per-example clipping valid. ``prototypes``
    and ``positive_key`` are detached here: the gradient reaches the query alone.

    Args:
        query: (N, D) queries, unit norm.
        positive_key: (N, D) keys of the other view, unit norm.
        prototypes: (K, D) unit-norm prototypes, K >= 1.
        temperature: the prediction's temperature T (the loss's ``--temperature``).
        target_temperature: the target's temperature T_t.

    Returns:
        (N,) per-example losses.

    Raises:
        ValueError: temperatures not positive, or shapes that do not fit.
    """
    _check_temperature(temperature)
    _check_temperature(target_temperature)
    if query.ndim != 2 or query.shape != positive_key.shape:
        raise ValueError(f"query and positive_key must both be (N, D); got {tuple(query.shape)} "
                         f"and {tuple(positive_key.shape)}")
    if prototypes.ndim != 2 or prototypes.shape[0] == 0 or prototypes.shape[1] != query.shape[1]:
        raise ValueError(f"prototypes must be a non-empty (K, {query.shape[1]}) tensor; got "
                         f"{tuple(prototypes.shape)}")
    prototypes = prototypes.detach().to(query)
    with torch.no_grad():
        target = torch.softmax(positive_key.detach() @ prototypes.T / target_temperature, dim=1)  # N x K
    log_prediction = torch.log_softmax(query @ prototypes.T / temperature, dim=1)  # N x K
    return -(target * log_prediction).sum(dim=1)


def _neighbours(cosines: Tensor, options: NegativeOptions | None) -> Tensor:
    """(N, K) mask of each positive key's neighbours among the rows: the nearest one, or the
    false-negative suspects of ``options`` when it has a mode."""
    if options is not None and options.false_negative_mode != "off":
        return _false_negatives(cosines, torch.ones_like(cosines, dtype=torch.bool), options)
    return torch.zeros_like(cosines, dtype=torch.bool).scatter_(1, cosines.argmax(dim=1, keepdim=True), True)


def _check_inputs(query: Tensor, positive_key: Tensor, negatives: Tensor | None,
                  temperature: float, in_batch: bool, negative_log_weights: Tensor | None,
                  queue_temperature: float | None) -> float:
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
    k = negatives.shape[0] if has_queue else 0
    if negative_log_weights is not None and (
        negative_log_weights.shape != (k,) or not torch.isfinite(negative_log_weights).all()
    ):
        raise ValueError(
            f"negative_log_weights must be ({k},) finite values, one per queue negative; got "
            f"{tuple(negative_log_weights.shape)}"
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


def _optioned_loss(pos: Tensor, cosines: list[Tensor], parts: list[Tensor], temps: list[float],
                   negative_log_weights: Tensor | None, opts: NegativeOptions) -> Tensor:
    """(N,) losses with staleness weights and the :class:`NegativeOptions` of :func:`info_nce`."""
    logits = torch.cat(parts, dim=1)  # N x M
    log_w = torch.zeros(1, logits.shape[1], dtype=logits.dtype, device=logits.device)  # 1 x M
    if negative_log_weights is not None:
        log_w[0, :negative_log_weights.shape[0]] = negative_log_weights.to(logits)
    present = torch.isfinite(logits)  # N x M
    suspects = (
        _false_negatives(torch.cat(cosines, dim=1).detach(), present, opts)
        if opts.false_negative_mode != "off" else None
    )  # N x M
    if opts.false_negative_mode == "drop":
        present = present & ~suspects
    if opts.reweights:
        floor = torch.cat([torch.full((1, p.shape[1]), -1.0 / t, dtype=logits.dtype, device=logits.device)
                           for p, t in zip(parts, temps, strict=True)], dim=1)  # 1 x M, -1/T_j
        return _estimator_loss(pos, logits, log_w, present, floor, opts)
    weighted = (logits + log_w).masked_fill(~present, -math.inf)  # N x M, log(w_j e^{s_ij})
    log_z = torch.logsumexp(torch.cat([pos.unsqueeze(1), weighted], dim=1), dim=1)  # N
    if opts.false_negative_mode != "positive":
        return log_z - pos
    extra = torch.where(suspects, weighted, 0.0).sum(dim=1)  # N: sum of the extra positives
    return log_z - (pos + extra) / (1 + suspects.sum(dim=1))


def _false_negatives(cosines: Tensor, present: Tensor, opts: NegativeOptions) -> Tensor:
    """(N, M) mask of each query's suspected false negatives among its present negatives."""
    chosen = present.clone()
    if opts.false_negative_threshold < 1.0:
        chosen &= cosines > opts.false_negative_threshold
    if opts.false_negative_top_k > 0:
        k = min(opts.false_negative_top_k, cosines.shape[1])
        top = cosines.masked_fill(~chosen, -math.inf).topk(k, dim=1).indices  # N x k
        chosen &= torch.zeros_like(chosen).scatter_(1, top, True)
    return chosen


def _row_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """log sum_{j: mask_ij} e^{x_ij} per row (N,); 0 for a row with no entry (callers discard
    it), so that no gradient meets an all -inf row (whose softmax is NaN)."""
    empty = ~mask.any(dim=1, keepdim=True)  # N x 1
    return torch.logsumexp(x.masked_fill(~mask, -math.inf).masked_fill(empty, 0.0), dim=1)


def _estimator_loss(pos: Tensor, logits: Tensor, log_w: Tensor, present: Tensor,
                    floor: Tensor, opts: NegativeOptions) -> Tensor:
    """-log(e^p / (e^p + Ng)) with the debiased / hard-negative Ng of :func:`info_nce`; (N,).
    ``floor`` (1, M) is -1/T_j per negative: the least logit a unit-norm pair can have."""
    s = logits.masked_fill(~present, 0.0)  # N x M, finite: absent entries are masked below
    count = present.sum(dim=1)  # N, M_i
    log_terms = log_w + s  # N x M, log(w_j e^{s_ij})
    beta = opts.hard_negative_beta
    if beta > 0:
        # log h_ij = log M_i + beta s_ij - log sum_k e^{beta s_ik}: weights of mean 1
        log_terms = (log_terms + beta * s - _row_logsumexp(beta * s, present).unsqueeze(1)
                     + count.clamp(min=1).to(s).log().unsqueeze(1))
    log_s = _row_logsumexp(log_terms, present)  # N, log S_i
    log_mass = _row_logsumexp(log_w.expand_as(s), present)  # N, log W_i
    tau = opts.debias_tau_plus
    if tau == 0:
        debiased = log_s
    else:
        # log(S - tau+ W e^p), defined where S > tau+ W e^p: log S + log(1 - e^{gap}), gap < 0.
        gap = math.log(tau) + log_mass + pos - log_s  # N
        debiased = log_s + torch.log(-torch.expm1(gap.clamp(max=-1e-30))) - math.log1p(-tau)
        debiased = torch.where(gap < 0, debiased, -math.inf)
    log_least = _row_logsumexp((log_w + floor).expand_as(s), present)  # N, log sum_j w_j e^{-1/T_j}
    log_ng = torch.maximum(debiased, log_least)  # the clamp
    loss = torch.logaddexp(pos, log_ng) - pos
    return torch.where(count > 0, loss, 0.0)


class InfoNCELoss(nn.Module):
    """InfoNCE (Oord et al. 2018) against queue negatives as in MoCo (He et al. 2020),
    optionally with SimCLR's in-batch negatives; see :func:`info_nce` for the exact logits.

    Attributes:
        temperature: T > 0 dividing the similarities.
        in_batch: add the batch's other keys and queries as negatives.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (the (N,) per-example losses that
            DP-SGD clips one by one).
        options: false-negative cancellation, debiasing, hard negatives
            (:class:`NegativeOptions`, validated at its construction; ``None``: off).
        queue_temperature: T_q > 0 for the queue negatives alone (``None``: T).

    Raises:
        ValueError: at construction, for T or T_q not finite or <= 0 or an unknown reduction.

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
        options: NegativeOptions | None = None,
        queue_temperature: float | None = None,
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        if queue_temperature is not None:
            _check_temperature(queue_temperature)
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"unknown reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}"
            )
        self.temperature = temperature
        self.in_batch = in_batch
        self.reduction = reduction
        self.options = options or NegativeOptions()
        self.queue_temperature = queue_temperature

    def forward(
        self,
        query: Tensor,
        positive_key: Tensor,
        negatives: Tensor | None = None,
        negative_log_weights: Tensor | None = None,
    ) -> Tensor:
        """(N, D), (N, D), (K, D) or None[, (K,)] -> scalar, or (N,) with ``reduction="none"``."""
        loss = info_nce(query, positive_key, negatives, self.temperature, in_batch=self.in_batch,
                        negative_log_weights=negative_log_weights, options=self.options,
                        queue_temperature=self.queue_temperature)
        return loss.mean() if self.reduction == "mean" else loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, queue_temperature={self.queue_temperature}, "
                f"in_batch={self.in_batch}, reduction={self.reduction!r}, options={self.options}")


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
