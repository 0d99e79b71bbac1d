"""How each query of the InfoNCE loss treats its negatives: the options and their rules.

One set of rules serves both :class:`NegativeOptions` (the loss's own argument, named by
field) and the configuration (named by flag), so a combination is refused once, with the
same reason, wherever it is given. Free of torch, so that a command's ``--help`` and the
configuration stay light.

References:
    Huynh et al. 2022, "Boosting Contrastive Self-Supervised Learning with False Negative
    Cancellation" (WACV; false negatives dropped or attracted). Chuang et al. 2020,
    "Debiased Contrastive Learning" (NeurIPS; tau+). Robinson et al. 2021, "Contrastive
    Learning with Hard Negative Samples" (ICLR; beta).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

FALSE_NEGATIVE_MODES = ("off", "drop", "positive")


def problems(mode: str, top_k: int, threshold: float, tau_plus: float,
             beta: float) -> Iterator[tuple[str, str]]:
    """``(field, what is wrong)`` for each rule the options break, in the order checked.

    The field is the option's name (``false_negative_top_k``); callers prefix it as they
    name options (the loss by field, the configuration by flag).
    """
    if mode not in FALSE_NEGATIVE_MODES:
        yield "false_negative_mode", f"must be one of {', '.join(FALSE_NEGATIVE_MODES)}"
    if top_k < 0:
        yield "false_negative_top_k", "must be >= 0"
    if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        yield "false_negative_threshold", "is a cosine similarity: must be in [-1, 1]"
    selects = top_k > 0 or threshold < 1.0
    if mode != "off" and not selects:
        yield ("false_negative_mode", "needs suspects to act on (a top k > 0 and/or a threshold "
               "< 1): false-negative cancellation needs a mode (drop, positive) together with them")
    if mode == "off" and top_k != 0:
        yield ("false_negative_top_k", "is set but the false-negative mode is off: cancellation "
               "needs a mode (drop, positive), or set it to 0")
    if mode == "off" and threshold != 1.0:
        yield ("false_negative_threshold", "is set but the false-negative mode is off: "
               "cancellation needs a mode (drop, positive), or set it to 1")
    if not 0.0 <= tau_plus < 1.0:
        yield "debias_tau_plus", "must be in [0, 1)"
    if not (math.isfinite(beta) and beta >= 0):
        yield "hard_negative_beta", "must be a finite number >= 0"
    if mode == "positive" and (tau_plus > 0 or beta > 0):
        yield ("false_negative_mode", "'positive' gives a query several positives, while the "
               "debiased (tau+) and hard-negative (beta) estimators assume one positive: use "
               "mode drop with them, or turn the estimator off")


@dataclass(frozen=True)
class NegativeOptions:
    """How each query's negatives enter :func:`common.loss.info_nce`; the defaults are plain
    InfoNCE.

    Attributes:
        false_negative_mode: ``"off"``; ``"drop"``: the query's suspected false negatives
            leave its denominator; ``"positive"``: they become extra positives (Huynh et
            al. 2022, "elimination" and "attraction").
        false_negative_top_k: suspects are at most the k negatives most similar to the
            query (0: no such bound).
        false_negative_threshold: suspects have cosine similarity > this with the query
            (1.0: no such bar). With both set, a suspect is among the top k *and* above
            the threshold.
        debias_tau_plus: tau+ in [0, 1), the prior probability that a negative shares the
            query's class (Chuang et al. 2020); 0: no debiasing.
        hard_negative_beta: beta >= 0, concentration of the importance weights on hard
            negatives (Robinson et al. 2021); 0: uniform.

    Raises:
        ValueError: at construction, for a value out of range or a combination without a
            meaning (see :func:`problems`).
    """

    false_negative_mode: str = "off"
    false_negative_top_k: int = 0
    false_negative_threshold: float = 1.0
    debias_tau_plus: float = 0.0
    hard_negative_beta: float = 0.0

    def __post_init__(self) -> None:
        for name, what in problems(self.false_negative_mode, self.false_negative_top_k,
                                   self.false_negative_threshold, self.debias_tau_plus,
                                   self.hard_negative_beta):
            raise ValueError(f"{name} {what} (got {getattr(self, name)!r})")

    @property
    def reweights(self) -> bool:
        """Whether the debiased / hard-negative estimator replaces the plain denominator."""
        return self.debias_tau_plus > 0 or self.hard_negative_beta > 0

    @property
    def active(self) -> bool:
        return self.false_negative_mode != "off" or self.reweights
