"""A node's data kept per process: loaded once, never another run's (client.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client import data as client_data
from client.data import local_images
from client.settings import NodeSettings
from common.config import FedConfig


@pytest.fixture(autouse=True)
def empty_cache():
    client_data._dataset.cache_clear()
    client_data._split.cache_clear()
    yield
    client_data._dataset.cache_clear()
    client_data._split.cache_clear()


@pytest.fixture
def loads(monkeypatch):
    """Counts the datasets actually loaded."""
    calls: list[str] = []
    real = client_data.load_dataset

    def counting(spec: str, *, seed: int = 0):
        calls.append(spec)
        return real(spec, seed=seed)

    monkeypatch.setattr(client_data, "load_dataset", counting)
    return calls


def share(pid: int, parts: int = 4) -> NodeSettings:
    return NodeSettings(client_id=f"partition-{pid}", state_dir=Path("unused"), partition_id=pid,
                        num_partitions=parts)


def uncached(cfg: FedConfig, node: NodeSettings) -> torch.Tensor:
    data = client_data.load_dataset(cfg.dataset, seed=cfg.seed)
    parts = client_data.partition_indices(cfg, data.y_train, node.num_partitions)
    return data.x_train[torch.as_tensor(parts[node.partition_id], dtype=torch.long)]


def test_every_share_of_a_run_is_the_uncached_share_from_one_load(loads) -> None:
    cfg = FedConfig(dataset="digits", partitioner="dirichlet", dirichlet_alpha=0.5, seed=7)
    shares = [local_images(cfg, share(i)) for i in range(4)]
    assert loads == ["digits"]
    for i, x in enumerate(shares):
        assert torch.equal(x, uncached(cfg, share(i)))


def test_a_share_is_a_tensor_of_its_own(loads) -> None:
    cfg = FedConfig(dataset="digits", seed=1)
    first = local_images(cfg, share(0))
    first.zero_()
    assert not torch.equal(local_images(cfg, share(0)), first)


@pytest.mark.parametrize("change", [{"seed": 8}, {"partitioner": "iid"}, {"dirichlet_alpha": 5.0}])
def test_another_run_gets_its_own_split(change) -> None:
    base = FedConfig(dataset="digits", partitioner="dirichlet", dirichlet_alpha=0.5, seed=7)
    other = FedConfig(**{**base.__dict__, **change})
    local_images(base, share(0))
    assert torch.equal(local_images(other, share(0)), uncached(other, share(0)))
    assert torch.equal(local_images(other, share(0, parts=3)), uncached(other, share(0, parts=3)))


def test_a_rewritten_npz_is_read_again(tmp_path: Path, loads) -> None:
    path = tmp_path / "site.npz"
    node = NodeSettings(client_id="c0", state_dir=tmp_path, data_path=str(path))
    rng = np.random.default_rng(0)
    for n in (40, 48):  # another size: another run's file at the same path
        x = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
        y = rng.integers(0, 3, size=n)
        np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
        assert local_images(FedConfig(), node).shape[0] == n
        assert local_images(FedConfig(), node).shape[0] == n
    assert len(loads) == 2
