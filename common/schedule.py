"""Learning-rate schedules, shared by the server's rounds and a client's local steps.

Cosine decay without restarts: SGDR (Loshchilov & Hutter 2017, arXiv:1608.03983).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine_lr(base_lr: float, total_steps: int) -> Callable[[int], float]:
    """Cosine decay from ``base_lr`` to 0 over ``total_steps`` (Loshchilov & Hutter 2017)."""
    total = max(1, total_steps)
    return lambda step: base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
