"""The server-averaged momentum key encoder: arrays that travel with the weights.

With ``--key-mode ema`` a node's key encoder is a momentum copy of its query encoder
(MoCo, He et al. 2020, CVPR): ``k <- m k + (1 - m) q`` after every step, ``m`` =
``--key-momentum``. By default (``--key-sync local``) every round starts it afresh as a
copy of the global weights, so each node's keys and pushed rows come from its own short
momentum path, and those of different nodes drift apart. MonAcoSFL (ECML PKDD 2024)
finds that momentum models which are not averaged drift apart at every
synchronisation, and averages them at the server with the weights (see also MocoSFL,
Li et al., ICLR 2023).

With ``--key-sync server`` the key encoder persists across rounds in the round's
``ArrayRecord``, under keys that start with :data:`PREFIX` (``key.<state_dict key>``:
parameters and buffers, after the weights and the optimiser state). A node loads it,
updates it by momentum every step (buffers too: floating ones by the same average,
counters copied from the query encoder), pushes the rows of the key encoder it
received (one encoder for every node of a round) and sends it back; the server
aggregates it exactly as it aggregates the weights. Round 1's key encoder is a copy of
the initial model. Under DP-SGD the key encoder is a function of the noised weights
only, so sending it is post-processing and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

PREFIX = "key."


def enabled(cfg: object) -> bool:
    """Whether ``cfg`` keeps the key encoder at the server (``--key-sync server``)."""
    return getattr(cfg, "key_sync", "local") == "server"


def export_arrays(key_model: nn.Module) -> dict[str, Tensor]:
    """``key_model``'s state dict, on the CPU, under :data:`PREFIX`."""
    return {PREFIX + k: v.detach().cpu().clone() for k, v in key_model.state_dict().items()}


def initial_arrays(model: nn.Module, cfg: object) -> dict[str, Tensor]:
    """Round 1's key encoder, a copy of ``model`` (empty unless :func:`enabled`)."""
    return export_arrays(model) if enabled(cfg) else {}


def split(arrays: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(everything else, the key encoder's state dict with :data:`PREFIX` removed)."""
    rest = {k: v for k, v in arrays.items() if not k.startswith(PREFIX)}
    key = {k[len(PREFIX):]: v for k, v in arrays.items() if k.startswith(PREFIX)}
    return rest, key


@torch.no_grad()
def momentum_step(key_model: nn.Module, model: nn.Module, momentum: float, *,
                  buffers: bool) -> None:
    """MoCo's update ``k <- m k + (1 - m) q`` of every parameter; with ``buffers`` also of
    every floating buffer (BatchNorm's running statistics), other buffers copied."""
    for pk, pq in zip(key_model.parameters(), model.parameters(), strict=True):
        pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)
    if not buffers:
        return
    for bk, bq in zip(key_model.buffers(), model.buffers(), strict=True):
        if bk.is_floating_point():
            bk.mul_(momentum).add_(bq.detach(), alpha=1.0 - momentum)
        else:
            bk.copy_(bq)
