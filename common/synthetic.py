"""Synthetic images that hold no one's data: the dead-leaves model.

A dead-leaves image is a stack of opaque shapes (discs and rectangles) of random colour,
dropped one over another until the canvas is covered; shape sizes follow p(r) ~ r^-3,
which gives the scale-invariant statistics of natural images (the model of Matheron 1968;
Lee, Mumford and Huang 2001, "Occlusion Models for Natural Images"). Baradad, Wulff, Wang,
Isola and Torralba 2021 ("Learning to See by Looking at Noise", NeurIPS 2021) showed that
contrastive encoders trained on such images alone learn usable features.

Here they initialise the encoder (``--pretrain-epochs``, :func:`pretrain`): before any
data is seen, the encoder trains on them with the default loss (SimCLR's, in-batch
negatives, one network for both views) in the run's own views. The images come from a
fixed seed and the data's item shape only, so the initial weights hold no one's data and
cost no privacy: under ``--dp true`` they are where DP-SGD starts, as public pretraining
is in private learning (Tang, Panda, Sehwag and Mittal 2023, "Differentially Private Image
Classification by Learning Priors from Random Processes", NeurIPS 2023; Yu et al. 2023,
"ViP: A Differentially Private Foundation Model for Computer Vision", ICML 2023, pretrain
on synthetic images before their private training).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from common.config import ViewSettings
from common.loss import info_nce
from common.plugins import make_views, views_for
from common.schedule import cosine_lr

if TYPE_CHECKING:
    from common.config import TrainConfig
    from common.encoders import ContrastiveModel

logger = logging.getLogger(__name__)

#: Seed of the images: fixed, so every process and client makes the same public images.
IMAGE_SEED = 0
#: The pretraining's own optimiser settings (Adam, cosine-decayed), independent of the
#: run's, which may be DP-SGD's: the default loss's recipe of ``train-local``.
PRETRAIN_LR = 1e-3
PRETRAIN_TEMPERATURE = 0.1
#: Shapes per image at most; the canvas is nearly always covered before.
_MAX_SHAPES = 400


def dead_leaves(n: int, shape: tuple[int, int, int], seed: int = IMAGE_SEED) -> Tensor:
    """``n`` dead-leaves images of ``shape`` (C, H, W), values in [0, 1], float32.

    Radii run from ``max(1, min(H, W) / 10)`` to ``0.75 * max(H, W)``; half the shapes are
    discs, half rectangles of random aspect ratio. Each pixel takes the colour (C values,
    uniform in [0, 1]) of the first shape that covers it, so later shapes lie underneath;
    pixels left uncovered after ``_MAX_SHAPES`` shapes keep the mean grey 0.5.
    """
    if n < 0 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"dead_leaves needs n >= 0 and a (C, H, W) shape, got n={n}, {shape}")
    c, h, w = (int(v) for v in shape)
    rng = np.random.default_rng(seed)
    rmin, rmax = max(1.0, min(h, w) / 10), 0.75 * max(h, w)
    out = np.full((n, c, h, w), 0.5, np.float32)
    covered = np.zeros((n, h, w), bool)
    yy = np.arange(h, dtype=np.float32)[None, :, None]
    xx = np.arange(w, dtype=np.float32)[None, None, :]
    for _ in range(_MAX_SHAPES):  # shape j of every image not yet covered, front to back
        live = np.flatnonzero(~covered.reshape(n, -1).all(axis=1))
        if live.size == 0:
            break
        m = live.size
        u = rng.random(m)  # inverse CDF of p(r) ~ r^-3 on [rmin, rmax]
        r = (1.0 / np.sqrt(u * (rmin ** -2 - rmax ** -2) + rmax ** -2)).astype(np.float32)
        cy = rng.uniform(-r, h + r).astype(np.float32)[:, None, None]
        cx = rng.uniform(-r, w + r).astype(np.float32)[:, None, None]
        colour = rng.random((m, c)).astype(np.float32)
        disc = rng.random(m) < 0.5
        ry = (np.where(disc, 1.0, rng.uniform(0.3, 1.0, m)) * r).astype(np.float32)
        r, ry, disc = r[:, None, None], ry[:, None, None], disc[:, None, None]
        mask = np.where(disc, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r,
                        (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= r))
        mask &= ~covered[live]
        k, y, x = np.nonzero(mask)  # (image among the live, y, x) of the pixels it takes
        out[live[k], :, y, x] = colour[k]
        covered[live[k], y, x] = True
    return torch.from_numpy(out)


#: Pretrained weights already computed in this process, by the settings they depend on.
_PRETRAINED: dict[str, dict[str, Tensor]] = {}
#: A directory where pretrained weights are kept for other processes: ``compare`` and
#: ``privacy`` set it for the runs they start (``OUT/pretrained``), so one set of settings
#: is pretrained once, not once per run.
CACHE_ENV = "FEDCONTRAST_PRETRAINED_DIR"
#: Part of every weights' key: raised when the images or the recipe change, so weights
#: kept by older code are not taken for today's.
RECIPE_VERSION = 1


def pretrain_key(cfg: TrainConfig, shape: tuple[int, ...]) -> str:
    """What the pretrained weights depend on: the encoder, the seed, the views (``auto``
    resolved, :func:`common.plugins.views_for`), the batch size, the weight decay, the
    pretraining's own settings and the item shape; not which data file the run reads."""
    from common.model import model_spec  # common.model imports this module

    views = {f.name: getattr(cfg, f.name) for f in fields(ViewSettings)}
    views["views"] = views_for(cfg)
    return json.dumps({"recipe": RECIPE_VERSION,
                       "spec": model_spec(cfg, int(shape[0])), "shape": list(shape),
                       "seed": cfg.seed, "views": views,
                       "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
                       "epochs": cfg.pretrain_epochs, "images": cfg.pretrain_images},
                      sort_keys=True, default=str)


def _kept(key: str, cache_dir: Path | None) -> dict[str, Tensor] | None:
    if key in _PRETRAINED:
        return _PRETRAINED[key]
    if cache_dir is None:
        return None
    path = cache_dir / _file_name(key)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a torn or foreign file: pretrain again, it is overwritten
        logger.warning("pretrained weights in %s unreadable (%s): pretraining again", path, exc)
        return None
    if payload.get("key") != key:  # another setting's weights under a colliding name
        return None
    logger.info("pretrained encoder read from %s", path)
    return payload["state_dict"]


def _file_name(key: str) -> str:
    return f"pretrained-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def pretrain(model: ContrastiveModel, cfg: TrainConfig, shape: tuple[int, ...],
             device: torch.device | None = None, cache_dir: Path | None = None,
             ) -> ContrastiveModel:
    """Train ``model`` in place for ``cfg.pretrain_epochs`` passes over
    ``cfg.pretrain_images`` dead-leaves images of item shape ``shape`` (C, H, W) and return it.

    The loss is the default one (symmetric InfoNCE with in-batch negatives, one network
    for both views) at :data:`PRETRAIN_TEMPERATURE`, Adam at :data:`PRETRAIN_LR`
    (cosine-decayed; the run's weight decay), batches of ``cfg.batch_size`` in an order
    and views drawn from ``cfg.seed``: the same settings give the same weights, which this
    process keeps (a second call copies them), and so does ``cache_dir`` (default: the
    directory named by :data:`CACHE_ENV`, if set) for other processes.

    Raises:
        ValueError: ``shape`` is not an image's (C, H, W).
    """
    if len(shape) != 3:
        raise ValueError(
            f"--pretrain-epochs {cfg.pretrain_epochs}: pretraining draws synthetic images, but "
            f"this dataset's items have shape {tuple(shape)}, not (channels, height, width); "
            "set --pretrain-epochs 0")
    key = pretrain_key(cfg, shape)
    if cache_dir is None and os.environ.get(CACHE_ENV):
        cache_dir = Path(os.environ[CACHE_ENV])
    kept = _kept(key, cache_dir)
    if kept is not None:
        model.load_state_dict(kept)
        _PRETRAINED[key] = kept
        return model
    device = device or torch.device("cpu")
    x = dead_leaves(cfg.pretrain_images, tuple(int(v) for v in shape))
    generator = torch.Generator().manual_seed(cfg.seed)
    views = make_views(cfg)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=PRETRAIN_LR, weight_decay=cfg.weight_decay)
    bs = cfg.batch_size
    steps_per_epoch = max(1, len(x) // bs)
    schedule = cosine_lr(PRETRAIN_LR, cfg.pretrain_epochs * steps_per_epoch)
    start, step = time.monotonic(), 0
    for epoch in range(1, cfg.pretrain_epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(steps_per_epoch):
            batch = x[order[i * bs:(i + 1) * bs]]
            v1 = views(batch, generator).to(device)
            v2 = views(batch, generator).to(device)
            q1, q2 = model(v1), model(v2)
            loss = 0.5 * (info_nce(q1, q2, None, PRETRAIN_TEMPERATURE, in_batch=True)
                          + info_nce(q2, q1, None, PRETRAIN_TEMPERATURE, in_batch=True)).mean()
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            step += 1
        logger.info("pretraining on %d dead-leaves images: epoch %d/%d, loss %.3f, %.0f s",
                    len(x), epoch, cfg.pretrain_epochs, total / steps_per_epoch,
                    time.monotonic() - start)
    state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    _PRETRAINED[key] = state
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / _file_name(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"key": key, "state_dict": state}, tmp)
        os.replace(tmp, path)  # whole or absent, also beside a process reading it
    return model
