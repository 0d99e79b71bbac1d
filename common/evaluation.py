"""Evaluate an encoder on held-out data: what contrastive training optimises, and probes.

Two layers are measured: ``backbone`` (the features a downstream user keeps) and
``head`` (the unit-norm projection the loss sees). On each layer:

- instance retrieval: top-1 accuracy of finding an item's second view among 256
  candidates;
- alignment and uniformity (Wang & Isola 2020) on those two views;
- kNN accuracy (cosine, weighted vote) and, on request, linear-probe accuracy, with
  the training split as the labelled bank.

Views are the run's own (``--views``, see :mod:`common.plugins`), drawn from a fixed
seed so that a trained and a random-init encoder are compared on the very same pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.nn import functional as F

from common.datasets import Dataset
from common.encoders import ContrastiveModel
from common.metrics import (
    alignment,
    embed,
    instance_retrieval,
    knn_accuracy,
    linear_probe_accuracy,
    uniformity,
)
from common.plugins import ViewFn

logger = logging.getLogger(__name__)

LAYERS = ("backbone", "head")


def _layer_fn(model: ContrastiveModel, layer: str) -> Callable[[Tensor], Tensor]:
    if layer == "backbone":
        return model.features
    if layer == "head":
        return model
    raise ValueError(f"unknown layer {layer!r}; choose from {', '.join(LAYERS)}")


def paired_views(
    x: Tensor, views: ViewFn, seed: int, max_items: int = 2048
) -> tuple[Tensor, Tensor]:
    """Two views, each (min(N, max_items), C, ...), of the first items of ``x``, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    x = x[:max_items]
    return views(x, g), views(x, g)


@torch.no_grad()
def evaluate_encoder(
    model: ContrastiveModel,
    data: Dataset,
    *,
    device: torch.device,
    views: ViewFn,
    seed: int = 0,
    layers: Iterable[str] = LAYERS,
    linear_probe: bool = False,
    knn_k: int = 20,
    batch_size: int = 512,
) -> dict[str, float]:
    """Return ``{f"{metric}_{layer}": value}`` for every requested layer.

    ``views`` draws the pairs of retrieval, alignment and uniformity: the run's view
    function (:func:`common.plugins.make_views`).
    """
    v1, v2 = paired_views(data.x_test, views, seed)
    layers = tuple(layers)
    logger.info("evaluating the %s on %d held-out items (%d view pairs, a kNN bank of %d "
                "training items)", " and ".join(layers), len(data.x_test), len(v1),
                len(data.x_train))
    out: dict[str, float] = {}
    for layer in layers:
        fn = _layer_fn(model, layer)
        run = lambda x, fn=fn: embed(fn, x, batch_size=batch_size, device=device)  # noqa: E731
        z1, z2 = F.normalize(run(v1), dim=1), F.normalize(run(v2), dim=1)
        out[f"retrieval_{layer}"] = instance_retrieval(z1, z2, candidates=256, seed=seed)
        out[f"alignment_{layer}"] = alignment(z1, z2)
        out[f"uniformity_{layer}"] = uniformity(z1)
        train_f, test_f = run(data.x_train), run(data.x_test)
        out[f"knn_{layer}"] = knn_accuracy(train_f, data.y_train, test_f, data.y_test, k=knn_k)
        if linear_probe:
            logger.info("linear probe on the %s: fitting %d features of %d training items, "
                        "testing on %d", layer, train_f.shape[1], len(train_f), len(test_f))
            out[f"linear_probe_{layer}"] = linear_probe_accuracy(
                train_f, data.y_train, test_f, data.y_test, seed=seed
            )
    return out


def raw_pixel_knn(data: Dataset, k: int = 20) -> float:
    """kNN accuracy on the flattened raw items (pixels, one-hot bases): what any encoder
    must beat to be worth its cost."""
    return knn_accuracy(
        data.x_train.flatten(1), data.y_train, data.x_test.flatten(1), data.y_test, k=k
    )
