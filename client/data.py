"""This node's training data: its own data set, or its share of the run's dataset.

Every node computes the run's split (:func:`partition_indices`) on its own, from the
config alone; the in-process comparisons (:mod:`simulations.compare`) use the same
split, so their clients see the items a federated node would.

A process keeps the datasets and splits it loaded (the last :data:`CACHED_DATASETS`
and :data:`CACHED_SPLITS`): one of the simulation engine's Ray actors answers many
virtual clients' messages, and loading and splitting the dataset for every message
cost about 0.13 s a message on digits (``python -m bench.sim_overhead_bench``). A
dataset is kept under what determines its contents: its spec and seed and, for a
file or folder, the resolved path with the size and modification time of each file,
so a rewritten ``.npz`` is read again and another run's data is never served. A
plug-in is kept under its spec and seed, the arguments its contract says fix its data.
Every call returns a tensor of its own: the items are gathered from the kept dataset.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.settings import NodeSettings
from common import plugins
from common.config import FedConfig
from common.datasets import Dataset, load_dataset
from common.partition import partition

#: Datasets and splits a process keeps (see the module doc).
CACHED_DATASETS = 2
CACHED_SPLITS = 4


def local_images(cfg: FedConfig, node: NodeSettings) -> torch.Tensor:
    """This node's training items (N, C, ...): its own data, or its partition of the dataset."""
    if node.data_path is not None:
        if not node.data_path.endswith(".npz") and plugins.parse("dataset", node.data_path) is None:
            raise ValueError(f"node config data-path {node.data_path!r} must be an .npz file or "
                             "a dataset plug-in package.module:name[:ARG]")
        return cached_dataset(node.data_path, cfg.seed).x_train.clone()
    key = dataset_key(cfg.dataset, cfg.seed)
    try:
        parts = _split(key, node.num_partitions, cfg.partitioner, _partition_kwargs(cfg))
    except ValueError as exc:
        raise ValueError(
            f"partition {node.partition_id} of {node.num_partitions} of --dataset {cfg.dataset} "
            f"({len(_dataset(key).y_train)} training items, --partitioner {cfg.partitioner}): "
            f"{exc}; start this client with a --num-partitions the data can give, or run the "
            "server with other partition settings") from exc
    return _dataset(key).x_train[torch.as_tensor(parts[node.partition_id], dtype=torch.long)]


def partition_indices(cfg: FedConfig, labels: torch.Tensor, num_partitions: int) -> list[np.ndarray]:
    """The run's split of a dataset's (N,) training ``labels`` into ``num_partitions`` index
    arrays, with ``--partitioner`` and its parameters and ``--seed``: every node computes
    the same split on its own."""
    return partition(labels.numpy(), num_partitions, cfg.partitioner, cfg.seed,
                     **dict(_partition_kwargs(cfg)))


def cached_dataset(spec: str, seed: int) -> Dataset:
    """:func:`~common.datasets.load_dataset` of ``spec`` and ``seed``, loaded once per
    process while its files are unchanged (see the module doc)."""
    return _dataset(dataset_key(spec, seed))


def dataset_key(spec: str, seed: int) -> tuple[Any, ...]:
    """What fixes the contents of ``load_dataset(spec, seed=seed)``: the spec and seed, and
    for a file or folder (the spec, or the argument of a name such as ``cifar10:FOLDER``)
    its resolved path and each file's size and modification time."""
    paths = [Path(s).expanduser() for s in (spec, spec.partition(":")[2]) if s]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        return spec, seed, ()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return spec, seed, (str(path.resolve()),
                        tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=CACHED_DATASETS)
def _dataset(key: tuple[Any, ...]) -> Dataset:
    spec, seed, _files = key
    return load_dataset(spec, seed=seed)


@functools.lru_cache(maxsize=CACHED_SPLITS)
def _split(key: tuple[Any, ...], num_partitions: int, partitioner: str,
           kwargs: tuple[tuple[str, Any], ...]) -> list[np.ndarray]:
    labels = _dataset(key).y_train.numpy()
    return partition(labels, num_partitions, partitioner, key[1], **dict(kwargs))


def _partition_kwargs(cfg: FedConfig) -> tuple[tuple[str, Any], ...]:
    """The partitioner's own parameters in ``cfg``, hashable."""
    if cfg.partitioner == "dirichlet":
        return (("alpha", cfg.dirichlet_alpha),)
    if cfg.partitioner == "shards":
        return (("classes_per_partition", cfg.classes_per_client),)
    return ()
