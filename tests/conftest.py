"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def flower_task_identity():
    """Let tests build Flower Messages outside a Flower process.

    Flower fills a message's run id and source task from ``TaskIdentity``, which its
    own processes set at start-up.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def one_thread():
    """One torch thread for the test: on two shared cores several times faster."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
