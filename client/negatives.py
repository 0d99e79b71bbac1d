"""Sources of negatives for the local trainer.

The trainer asks each source for a bank of negatives before a step and shows it
the step's keys afterwards. A source returns detached, unit-norm rows (constants
for the loss), or ``None`` when it has nothing this step. The global gRPC queue
(:class:`client.stub.GlobalNegatives`) and the local FIFO queue below implement
the same protocol, so the trainer does not know where negatives come from.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class NegativeSource(Protocol):
    def negatives(self, step: int, device: torch.device) -> Tensor | None:
        """Return a detached ``(K, D)`` float32 bank of unit-norm rows on ``device``, or None."""

    def observe(self, keys: Tensor) -> None:
        """See the ``(N, D)`` keys of the step just taken (detached)."""


class LocalQueue:
    """A MoCo-style FIFO of this client's own past keys (He et al. 2020, arXiv:1911.05722).

    Args:
        size: rows kept (K). The oldest are overwritten first.
        dim: embedding dimension (D).

    Rows enter only through :meth:`observe` and leave as detached constants. Under
    differential privacy these are un-noised rows of the client's own data, so the
    trainer refuses this source when DP is on.
    """

    def __init__(self, size: int, dim: int) -> None:
        if size <= 0 or dim <= 0:
            raise ValueError(f"LocalQueue needs positive size and dim, got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self._rows = torch.zeros(size, dim)  # K x D
        self._ptr = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def negatives(self, step: int, device: torch.device) -> Tensor | None:
        if self._filled == 0:
            return None
        return self._rows[: self._filled].to(device)

    @torch.no_grad()
    def observe(self, keys: Tensor) -> None:
        keys = keys.detach().float().cpu()
        if keys.shape[-1] != self.dim:
            raise ValueError(f"LocalQueue of dim {self.dim} got keys of shape {tuple(keys.shape)}")
        keys = keys[-self.size :]  # a batch larger than the queue keeps its newest rows
        n = keys.shape[0]
        end = self._ptr + n
        if end <= self.size:
            self._rows[self._ptr : end] = keys
        else:
            first = self.size - self._ptr
            self._rows[self._ptr :] = keys[:first]
            self._rows[: n - first] = keys[first:]
        self._ptr = end % self.size
        self._filled = min(self.size, self._filled + n)
