"""The local FIFO queue of past keys."""

import pytest
import torch

from client.negatives import LocalQueue, NegativeSource


def test_empty_queue_gives_nothing():
    q = LocalQueue(4, 2)
    assert q.negatives(0, torch.device("cpu")) is None
    assert isinstance(q, NegativeSource)


def test_fifo_overwrites_oldest_and_wraps():
    q = LocalQueue(4, 1)
    q.observe(torch.tensor([[1.0], [2.0], [3.0]]))
    q.observe(torch.tensor([[4.0], [5.0]]))
    assert len(q) == 4
    assert sorted(q.negatives(0, torch.device("cpu")).flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]
    q.observe(torch.arange(10.0, 16.0).unsqueeze(1))  # larger than the queue: newest kept
    assert sorted(q.negatives(0, torch.device("cpu")).flatten().tolist()) == [12.0, 13.0, 14.0, 15.0]


def test_rows_are_detached_constants():
    q = LocalQueue(2, 3)
    keys = torch.randn(2, 3, requires_grad=True)
    q.observe(keys * 2)
    assert not q.negatives(0, torch.device("cpu")).requires_grad


def test_wrong_dim_is_refused():
    q = LocalQueue(2, 3)
    with pytest.raises(ValueError, match="dim 3"):
        q.observe(torch.randn(2, 4))
