"""The ServerApp's grid, with replies collected as they arrive.

Flower's grid (``HttpGrid.send_and_receive``) pulls replies every 3 s, so a round
waits 1.5 s on average, and up to 3 s, after its last reply; on a 10-client round of
a few seconds that is a third of its time. :class:`PromptGrid` wraps the grid and
pulls after 50 ms, then at intervals growing by half up to 0.5 s: a few dozen cheap
pulls a minute. Everything else is the wrapped grid's.

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

#: Seconds before the first pull, and the most between two.
FIRST_PULL_S = 0.05
MAX_PULL_INTERVAL_S = 0.5


class PromptGrid:
    """``grid`` with :meth:`send_and_receive` pulling early and often (see module doc)."""

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
        interval = FIRST_PULL_S
        replies: list[Message] = []
        while waiting:
            pause = interval if deadline is None else min(interval, deadline - time.monotonic())
            if pause <= 0:
                break
            time.sleep(pause)
            interval = min(MAX_PULL_INTERVAL_S, interval * 1.5)
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
        return replies
