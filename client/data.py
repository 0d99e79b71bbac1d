"""This node's training data: its own data set, or its share of the run's dataset.

Every node computes the run's split (:func:`partition_indices`) on its own, from the
config alone; the in-process comparisons (:mod:`simulations.compare`) use the same
split, so their clients see the items a federated node would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from client.settings import NodeSettings
from common import plugins
from common.config import FedConfig
from common.datasets import load_dataset
from common.partition import partition


def local_images(cfg: FedConfig, node: NodeSettings) -> torch.Tensor:
    """This node's training items (N, C, ...): its own data, or its partition of the dataset."""
    if node.data_path is not None:
        if not node.data_path.endswith(".npz") and plugins.parse("dataset", node.data_path) is None:
            raise ValueError(f"node config data-path {node.data_path!r} must be an .npz file or "
                             "a dataset plug-in package.module:name[:ARG]")
        return load_dataset(node.data_path, seed=cfg.seed).x_train
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    try:
        parts = partition_indices(cfg, data.y_train, node.num_partitions)
    except ValueError as exc:
        raise ValueError(
            f"partition {node.partition_id} of {node.num_partitions} of --dataset {cfg.dataset} "
            f"({len(data.y_train)} training items, --partitioner {cfg.partitioner}): {exc}; start "
            "this client with a --num-partitions the data can give, or run the server with "
            "other partition settings") from exc
    return data.x_train[torch.as_tensor(parts[node.partition_id], dtype=torch.long)]


def partition_indices(cfg: FedConfig, labels: torch.Tensor, num_partitions: int) -> list[np.ndarray]:
    """The run's split of a dataset's (N,) training ``labels`` into ``num_partitions`` index
    arrays, with ``--partitioner`` and its parameters and ``--seed``: every node computes
    the same split on its own."""
    kw: dict[str, Any] = {}
    if cfg.partitioner == "dirichlet":
        kw["alpha"] = cfg.dirichlet_alpha
    elif cfg.partitioner == "shards":
        kw["classes_per_partition"] = cfg.classes_per_client
    return partition(labels.numpy(), num_partitions, cfg.partitioner, cfg.seed, **kw)
