"""Save and load trained encoders.

A checkpoint is a ``torch.save`` of plain data (no pickled classes): the encoder's
construction arguments and its ``state_dict``, so :func:`load_encoder` can rebuild
it with ``weights_only=True`` loading. A federated run's checkpoint also holds the
round, the next free contributor slot, each identified client's slot
(``client_slots``) and the aggregated optimiser state
(``optimizer_state``, :mod:`common.optim_state`), which ``--resume`` reads back.

Downstream use::

    from common.checkpoint import load_encoder
    model = load_encoder("runs/digits/encoder.pt")   # ContrastiveModel, eval mode
    features = model.features(images)                 # (N, F) backbone features
    z = model(images)                                 # (N, D) unit-norm embeddings
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from common.encoders import ContrastiveModel, build_encoder, with_head_norm

FORMAT = "fedcontrast-encoder/1"
#: State-dict keys of BYOL's predictor (see :class:`common.encoders.ContrastiveModel`).
PREDICTOR_PREFIX = "predictor."


def encoder_spec(
    encoder: str, in_channels: int, embedding_dim: int, norm: str, width: int,
    weight_standardization: bool = False,
) -> dict[str, Any]:
    return {"encoder": encoder, "in_channels": in_channels, "embedding_dim": embedding_dim,
            "norm": norm, "width": width, "weight_standardization": weight_standardization}


def save_encoder(
    model: ContrastiveModel, spec: dict[str, Any], path: str | Path, **extra: Any
) -> Path:
    """Write ``model`` atomically (temp file + rename) with its spec and ``extra`` fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "spec": dict(spec), "state_dict": model.state_dict(), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.pt"
    if not path.exists():
        raise FileNotFoundError(f"no encoder checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a FedContrast encoder checkpoint ({FORMAT})")
    return payload


def encoder_from_spec(spec: dict[str, Any]) -> ContrastiveModel:
    """A freshly initialised encoder of the architecture ``spec`` records."""
    model = build_encoder(
        spec["encoder"], in_channels=spec["in_channels"], embedding_dim=spec["embedding_dim"],
        norm=spec["norm"], width=spec["width"],
        # checkpoints written before the setting existed had plain convolutions
        weight_standardization=spec.get("weight_standardization", False),
    )
    if spec.get("head_norm"):  # a BYOL run's projection head (common.model)
        with_head_norm(model, spec["head_norm"])
    return model


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> ContrastiveModel:
    """Rebuild a trained encoder from a checkpoint file or a run directory (``encoder.pt``).

    A BYOL run's checkpoint also holds the predictor (``predictor.*``, what ``--resume``
    continues from); the encoder returned is backbone and head only, without it.
    """
    payload = read_checkpoint(path)
    model = encoder_from_spec(payload["spec"])
    model.load_state_dict({k: v for k, v in payload["state_dict"].items()
                           if not k.startswith(PREDICTOR_PREFIX)})
    return model.to(device).eval()
