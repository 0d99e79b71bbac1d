"""One local BYOL round of a node, without Flower: FedBYOL, FedU or FedEMA.

:func:`train_byol_round` takes the global weights into the client's own model
(:func:`client.divergence.take_global`), trains ``local_epochs`` of BYOL
(:class:`client.byol.BYOLTrainer`) and returns the weights to send (online encoder and
predictor, what the server averages), the round's metrics (the reply's keys; no queue
traffic) and what the client keeps for its next round. :func:`load_local` and
:func:`save_local` keep that in the client's state directory (``byol.pt``), for one run:
a state left by another run is another model, and the round then starts as a first one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch

from client.byol import BYOLTrainer
from client.divergence import LocalBYOL, take_global
from client.round import local_geometry, round_metrics
from client.state import StateDir
from client.trainer import make_optimizer
from common import optim_state
from common.config import FedConfig, resolve_device
from common.encoders import ContrastiveModel
from common.model import build_model

logger = logging.getLogger(__name__)

#: The file of a client's state directory that holds its :class:`LocalBYOL`.
BYOL_STATE = "byol.pt"
#: A BYOL round pulls and pushes nothing.
NO_QUEUE_TRAFFIC = {"hits": 0, "misses": 0, "rows_pushed": 0, "push_failures": 0}


def load_local(state_dir: StateDir, run_id: int) -> LocalBYOL | None:
    """The client's own BYOL model of run ``run_id``; None before its first round in it."""
    payload = state_dir.load_tensors(BYOL_STATE)
    local = None if payload is None else LocalBYOL.from_payload(payload)
    return local if local is not None and local.run_id == run_id else None


def save_local(state_dir: StateDir, local: LocalBYOL) -> None:
    state_dir.save_tensors(BYOL_STATE, local.payload())


def _target(model: ContrastiveModel, state: Mapping[str, torch.Tensor] | None) -> ContrastiveModel:
    """The target network: backbone and head of ``model`` (no predictor), holding ``state``
    when given."""
    target = copy.deepcopy(model)
    target.predictor = None
    if state is not None:
        target.load_state_dict(state)
    return target


def train_byol_round(
    cfg: FedConfig,
    x: torch.Tensor,
    global_state: Mapping[str, torch.Tensor],
    *,
    lr: float,
    seed: int,
    run_id: int,
    local: LocalBYOL | None,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float | int], LocalBYOL]:
    """Start from the global weights and ``local`` as ``cfg.byol_update`` says, train
    ``local_epochs`` of BYOL on ``x``; return (weights to send, metrics, state to keep).

    ``optimizer_state``: as :func:`client.round.train_round`'s.
    """
    if x.shape[0] < 2:
        raise ValueError(f"this node has {x.shape[0]} training example(s); BYOL needs 2 or more")
    device = resolve_device(cfg.device)
    start = take_global(cfg, global_state, local)
    model = build_model(cfg, x.shape[1], start.online)
    target = _target(model, start.target)
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optim_state.load_arrays(model, optimizer, cfg, optimizer_state)
    trainer = BYOLTrainer(model, cfg, target=target, device=device, lr_schedule=lambda _step: lr,
                          generator=torch.Generator().manual_seed(seed), optimizer=optimizer)
    epochs = [trainer.train_epoch(x) for _ in range(cfg.local_epochs)]
    metrics = round_metrics(cfg, x.shape[0], epochs, NO_QUEUE_TRAFFIC,
                             local_geometry(model, x, cfg, device), None)
    logger.info("%s round: divergence %.4g, weight on the local model %.4g, loss %.4f",
                cfg.byol_update, start.divergence, start.mu, metrics["train-loss"])
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    kept = LocalBYOL(run_id, online=weights,
                     target={k: v.detach().cpu().clone() for k, v in target.state_dict().items()},
                     fedema_lambda=start.fedema_lambda or (local.fedema_lambda if local else 0.0))
    state = dict(weights)
    if optimizer_state is not None:
        state.update(optim_state.export_arrays(model, optimizer, cfg))
    return state, metrics, kept
