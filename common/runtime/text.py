"""Text from untrusted input, made safe to log or send back: one short line.

A client's request, a snapshot file or a node's reply can carry text of any length (a
shape with millions of entries, an exception message quoting its input). Error
details travel as gRPC metadata, limited to 8 KiB by default, and a log line should
stay readable, so every such text passes through :func:`brief` first.
"""

from __future__ import annotations

#: Most characters :func:`brief` keeps, the ellipsis included.
BRIEF_LIMIT = 200


def brief(text: str, limit: int = BRIEF_LIMIT) -> str:
    """``text`` on one line and at most ``limit`` characters (cut with ``...``)."""
    if len(text) > 4 * limit:  # look at a bounded prefix, however long the text is
        text = text[: 4 * limit]
        cut = True
    else:
        cut = False
    line = " ".join(text.split())
    if cut or len(line) > limit:
        return line[: limit - 3] + "..."
    return line
