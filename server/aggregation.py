"""Aggregation: the Flower strategy that combines a round's weights, and its metrics.

Weights are combined by the strategy ``--aggregation`` names: FedAvg (McMahan et al.
2017, arXiv:1602.05629), FedTrimmedAvg and FedMedian (Yin et al. 2018,
arXiv:1803.01498), or Krum (Blanchard et al. 2017, NeurIPS) over the weights alone
(:class:`WeightsKrum`).

Metrics: weighted means (by ``num-examples``) from the strategy for losses and
geometry, sums for counts (:data:`SUMMED_KEYS`), the maximum for privacy spent
(:data:`MAX_KEYS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import FedConfig
from common.optim_state import PREFIX as OPTIMIZER_PREFIX
from server.contract import REPLY_METRIC_KEYS, WEIGHT_KEY

SUMMED_KEYS = ("num-examples", "global-hits", "global-misses", "pushed-rows", "push-failures")
MAX_KEYS = ("epsilon",)


def build_strategy(cfg: FedConfig) -> FedAvg:
    """The Flower strategy named by ``cfg.aggregation``.

    Its node minimums are 1: the driver waits for ``cfg.min_nodes`` itself, with a
    deadline, and hands the strategy only nodes that are online (Flower's
    ``sample_nodes`` would otherwise wait forever for its minimums).
    """
    common: dict[str, Any] = {
        # Seeded sampling happens in the driver, which hands the strategy the drawn nodes.
        "fraction_train": 1.0 if cfg.client_sampling == "seeded" else cfg.fraction_train,
        "min_train_nodes": 1, "min_available_nodes": 1,
        "min_evaluate_nodes": 1, "weighted_by_key": WEIGHT_KEY,
    }
    if cfg.aggregation == "fedavg":
        return FedAvg(**common)
    if cfg.aggregation == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if cfg.aggregation == "fedmedian":
        return FedMedian(**common)
    if cfg.aggregation == "krum":
        return WeightsKrum(**common, num_malicious_nodes=cfg.krum_f)
    raise ValueError(f"unknown aggregation {cfg.aggregation!r}")


class WeightsKrum(Krum):
    """Krum whose distances between replies count the model weights only.

    With ``--optimizer-state federated`` a reply also carries the node's optimiser state
    (``optimizer.*`` arrays, :mod:`common.optim_state`). Flower's Krum would measure
    distances over everything: Adam's step count alone differs between nodes by their
    number of local steps, and its square dwarfs the weights' distances, so Krum would
    pick the node with the median data size rather than the one nearest the others.
    Here the choice is made on the weights and, with ``--key-sync server``, the ``key.*``
    key encoder (:mod:`common.key_state`; on the weights' scale, and what every node's
    pushed rows and positive keys come from next round, so a node may not hide a poisoned
    one behind central weights); the chosen reply is then taken whole, optimiser state
    included.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        weights_only = [RecordDict({
            "arrays": ArrayRecord({k: v for k, v in c["arrays"].items()
                                   if not k.startswith(OPTIMIZER_PREFIX)}),
            "metrics": c["metrics"],
        }) for c in contents]
        chosen = select_multikrum(weights_only, num_malicious_nodes=self.num_malicious_nodes,
                                  num_nodes_to_select=self.num_nodes_to_select)
        whole = {id(w): c for w, c in zip(weights_only, contents, strict=True)}
        picked = [whole[id(w)] for w in chosen]
        return (aggregate_arrayrecords(picked, self.weighted_by_key),
                self.train_metrics_aggr_fn(picked, self.weighted_by_key))


def combine_metrics(contents: Sequence[RecordDict], means: MetricRecord | None) -> dict[str, float | int]:
    """Round metrics from valid replies: the strategy's weighted ``means``, sums, maxima."""
    out: dict[str, float] = {}
    for key in REPLY_METRIC_KEYS:
        values = [c["metrics"][key] for c in contents]
        if key in SUMMED_KEYS:
            out[key] = sum(values)
        elif key in MAX_KEYS:
            out[key] = float(max(values))
        elif means is not None and key in means:
            out[key] = float(means[key])
        else:  # a strategy that selects (Krum) still reports; fall back to the plain mean
            out[key] = float(sum(values) / len(values))
    return out
