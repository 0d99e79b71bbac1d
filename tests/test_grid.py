"""The ServerApp's grid pulls replies as they arrive (server.grid.PromptGrid)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from server.grid import PromptGrid, prompt_grid


class SlowNodes:
    """A grid whose node ``i`` replies ``delays[i]`` seconds after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.pulls = 0
        self.pushed_at = 0.0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in sorted(ids) if now >= self.delays[int(i[1:])]]

    def get_node_ids(self):
        return [1, 2]


def test_every_reply_is_collected_soon_after_the_last_arrives() -> None:
    grid = SlowNodes([0.0, 0.1, 0.3])
    start = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(["a", "b", "c"], timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert time.monotonic() - start < 1.0  # Flower's grid would pull again only at 3 s


def test_the_timeout_returns_the_replies_in_so_far() -> None:
    grid = SlowNodes([0.0, 60.0])
    start = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(["a", "b"], timeout=0.4)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.35 < time.monotonic() - start < 1.0


def test_everything_else_is_the_wrapped_grid() -> None:
    assert PromptGrid(SlowNodes([])).get_node_ids() == [1, 2]


def test_only_the_deployment_grid_is_wrapped() -> None:
    grid = SlowNodes([])
    assert prompt_grid(grid) is grid  # the engine's in-memory grid already pulls every 0.1 s
