"""The ServerApp's grid, with replies collected as they arrive.

Flower's grid for a deployment (``HttpGrid.send_and_receive``, the one ``fedcontrast
server`` runs the ServerApp with) pulls replies every 3 s, so a round waits 1.5 s on
average, and up to 3 s, after its last reply. :func:`prompt_grid` wraps that grid in
:class:`PromptGrid`, which pulls every :data:`PULL_INTERVAL_S`, the interval of
Flower's in-memory grid; the in-memory grid the simulation engine gives the ServerApp,
and any other, is used as it is. Everything but ``send_and_receive`` is the wrapped
grid's.

Replies come back in arrival order, as Flower's do; the round driver screens them
into digest order (:meth:`server.rounds.RoundDriver.screen`), so how often replies
are pulled changes no result.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import HttpGrid

#: Seconds between two pulls: Flower's in-memory grid's interval, ten cheap calls a second.
PULL_INTERVAL_S = 0.1


class PromptGrid:
    """``grid`` with :meth:`send_and_receive` pulling every :data:`PULL_INTERVAL_S`."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Push ``messages``; their replies, pulled until every one is in or ``timeout`` s
        have passed (``None``: no limit)."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pause = PULL_INTERVAL_S if deadline is None else min(PULL_INTERVAL_S,
                                                                 deadline - time.monotonic())
            if pause <= 0:
                break
            time.sleep(pause)
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
        return replies


def prompt_grid(grid: Grid) -> Grid | PromptGrid:
    """``grid`` in a :class:`PromptGrid` when it is Flower's deployment grid, which pulls
    every 3 s; any other grid as it is."""
    return PromptGrid(grid) if isinstance(grid, HttpGrid) else grid
