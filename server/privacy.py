"""The run's privacy as the server reports it: the largest epsilon, what it covers, the budget.

Privacy in the round rows (``--dp true``): ``epsilon`` is the largest epsilon a client
reported this round, ``epsilon_max`` the largest over every client seen so far in the
run (a resumed run continues from its rows), ``pushes_private`` is 0 when pushed rows
are not noised and so not covered by any epsilon. Statistics that DP clients withhold
(:data:`common.accounting.WITHHELD_UNDER_DP`) are left out of the rows. With
``--epsilon-budget``, the round whose ``epsilon_max`` reaches it is the last. The
accounting itself is the clients' (:mod:`common.accounting`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from common.accounting import ADJACENCY, WITHHELD_UNDER_DP
from common.config import FedConfig

logger = logging.getLogger(__name__)


def pushes_private(cfg: FedConfig) -> bool:
    """Whether every pushed row is covered by the clients' epsilon: DP with noised pushes, or none."""
    return cfg.dp and (cfg.push_noise > 0 or cfg.push_fraction == 0)


class RunPrivacy:
    """The privacy columns of the round rows and the privacy part of ``summary.json``.

    Args:
        cfg: the run's settings (dp, delta, push noise and fraction, epsilon budget).
        rows: the round rows already written (a resumed run continues their maximum).
    """

    def __init__(self, cfg: FedConfig, rows: Iterable[Mapping[str, Any]]) -> None:
        self.cfg = cfg
        # Clients' epsilons only grow, so the largest ever reported is the largest now.
        self.epsilon_max = max((float(r.get("epsilon_max", r.get("epsilon", -1.0)))
                                for r in rows), default=-1.0)
        if cfg.dp and cfg.push_fraction > 0 and cfg.push_noise == 0:
            logger.warning("--dp true with --push-noise 0: pushed rows are un-noised embeddings of "
                           "the clients' data and are NOT covered by the reported epsilon")

    def released(self, metrics: dict[str, float | int]) -> dict[str, float | int]:
        """``metrics`` without the statistics DP clients withhold (all of them without DP)."""
        if self.cfg.dp:
            return {k: v for k, v in metrics.items() if k not in WITHHELD_UNDER_DP}
        return metrics

    def update(self, rnd: int, row: dict[str, Any], metrics: Mapping[str, float | int]) -> str | None:
        """Running maximum epsilon and the pushes flag into ``row``; the reason to stop
        when the budget is reached (None otherwise)."""
        if "epsilon" in metrics:
            self.epsilon_max = max(self.epsilon_max, float(metrics["epsilon"]))
        row["epsilon_max"] = self.epsilon_max
        row["pushes_private"] = int(pushes_private(self.cfg))
        budget = self.cfg.epsilon_budget
        if budget > 0 and self.epsilon_max >= budget:
            reason = (f"privacy budget reached at round {rnd}: epsilon "
                      f"{self.epsilon_max:.4g} >= --epsilon-budget {budget:g}")
            logger.warning("round %d: %s; stopping", rnd, reason)
            return reason
        return None

    def summary(self) -> dict[str, Any]:
        """The run's privacy for ``summary.json``.

        ``dp``; ``delta`` of the epsilons (None without DP); ``adjacency``, the datasets
        the epsilons tell apart (None without DP); ``epsilon_max``, the largest
        epsilon any client reported in the run (-1: nothing accounted);
        ``pushes_private``, whether pushed rows are covered by it; ``epsilon_budget``
        (0: no limit); ``note``, in plain words what the epsilon does not cover (None when
        it covers every release).
        """
        private = pushes_private(self.cfg)
        if not self.cfg.dp:
            note = ("no differential privacy (--dp false): nothing is accounted, and the "
                    "weights and any pushed rows are released without noise")
        elif not private:
            note = ("pushed rows are un-noised embeddings of the clients' data and are NOT "
                    "covered by epsilon_max, which accounts the DP-SGD steps only "
                    "(--push-noise > 0 noises the pushes and accounts them)")
        else:
            note = None
        return {"dp": self.cfg.dp, "delta": self.cfg.delta if self.cfg.dp else None,
                "adjacency": ADJACENCY if self.cfg.dp else None,
                "epsilon_max": self.epsilon_max, "pushes_private": private,
                "epsilon_budget": self.cfg.epsilon_budget, "note": note}
