"""The run's encoder, built from its config: the one place a config becomes a model.

``fedcontrast train-local``, the ServerApp, the ClientApp and the in-process comparisons
all build their :class:`~common.encoders.ContrastiveModel` here, so a run's settings
(``--encoder``, ``--embedding-dim``, ``--norm``, ``--width``,
``--weight-standardization``, ``--seed``, ``--pretrain-epochs``) mean the same
model everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import encoder_spec
from common.config import FedConfig, TrainConfig
from common.datasets import Dataset
from common.encoders import ContrastiveModel, ProjectionHead, build_encoder, with_head_norm

#: BYOL's projector and predictor normalise their hidden layer by the batch, as in Grill et
#: al. 2020: with no normalisation or GroupNorm there, BYOL's projection collapsed on digits
#: (docs/experiments.md). BYOL refuses --dp, so batch statistics are allowed.
BYOL_HEAD_NORM = "batch"


def model_spec(cfg: TrainConfig, in_channels: int) -> dict[str, Any]:
    """The checkpoint spec (:func:`common.checkpoint.encoder_spec`) of the run's encoder."""
    spec = encoder_spec(cfg.encoder, in_channels, cfg.embedding_dim, cfg.norm, cfg.width,
                        cfg.weight_standardization)
    if _byol(cfg):
        spec["head_norm"] = BYOL_HEAD_NORM
    return spec


def _byol(cfg: TrainConfig) -> bool:
    return isinstance(cfg, FedConfig) and cfg.objective == "byol"


def build_model(cfg: TrainConfig, in_channels: int,
                state: Mapping[str, torch.Tensor] | None = None) -> ContrastiveModel:
    """The run's encoder for ``in_channels``-channel items.

    Without ``state`` it is initialised from ``cfg.seed`` (torch's global generator is
    seeded with it first), so every process builds the same initial model. With
    ``state`` (a node's received global weights) it holds those weights; its random
    initialisation is overwritten, so the global generator is not reseeded.

    With ``--objective byol`` the model also has BYOL's predictor (Grill et al. 2020), an
    MLP D -> F -> D on the projection (the paper's 256 -> 4096 -> 256, scaled to the
    encoder), built after the encoder so the encoder's initialisation is the same; its
    projector and predictor normalise their hidden layer by BatchNorm, as the paper's do
    (:data:`BYOL_HEAD_NORM`: without it the projection collapses, docs/experiments.md).

    Raises:
        ValueError: ``state`` does not fit the encoder the config asks for.
    """
    if state is None:
        torch.manual_seed(cfg.seed)
    model = build_encoder(cfg.encoder, in_channels=in_channels, embedding_dim=cfg.embedding_dim,
                          norm=cfg.norm, width=cfg.width,
                          weight_standardization=cfg.weight_standardization)
    if _byol(cfg):
        with_head_norm(model, BYOL_HEAD_NORM)
        model.predictor = ProjectionHead(model.embedding_dim, model.feature_dim, model.embedding_dim,
                                         norm=BYOL_HEAD_NORM)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"the server's weights do not fit this node's {cfg.encoder} encoder for "
                f"{in_channels}-channel items: {exc}"
            ) from exc
    return model


def initial_model(cfg: TrainConfig, data: Dataset, device: torch.device | None = None,
                  cache_dir: Path | None = None) -> ContrastiveModel:
    """The encoder a run starts from: :func:`build_model`'s random init, pretrained on
    synthetic dead-leaves images first when ``cfg.pretrain_epochs`` > 0
    (:func:`common.synthetic.pretrain`, which keeps the weights in ``cache_dir``; no data
    of ``data`` is read, only its item shape).
    """
    model = build_model(cfg, data.in_channels)
    if cfg.pretrain_epochs:
        from common.synthetic import pretrain

        pretrain(model, cfg, tuple(data.x_train.shape[1:]), device, cache_dir)
    return model
