"""Metrics on frozen features: kNN, linear probe, alignment, uniformity, instance retrieval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.metrics import (
    alignment,
    embed,
    instance_retrieval,
    knn_accuracy,
    linear_probe_accuracy,
    uniformity,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clusters(
    n_per_class: int, num_classes: int, dim: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around one random unit centre per class, and their labels."""
    g = gen(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_embed_batches_without_grad_and_restores_train_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    x = torch.randn(10, 4, generator=gen())
    seen_training = []
    model.register_forward_hook(lambda m, i, o: seen_training.append(m.training))
    out = embed(model, x, batch_size=4)
    assert out.shape == (10, 3) and not out.requires_grad
    assert seen_training == [False, False, False]  # 3 batches, all in eval mode
    assert model.training and not model[1].training
    torch.testing.assert_close(out, model.eval()(x).detach())


def test_embed_accepts_a_bound_method() -> None:
    model = nn.Linear(4, 2).train()
    out = embed(model.forward, torch.randn(5, 4, generator=gen()))
    assert out.shape == (5, 2) and model.training


def test_knn_is_perfect_on_separable_clusters() -> None:
    f, y = clusters(30, 5, 16, spread=0.05, seed=0)
    ft, yt = clusters(10, 5, 16, spread=0.05, seed=0)
    assert knn_accuracy(f, y, ft, yt, k=5) == 1.0


def test_knn_is_near_chance_on_random_labels() -> None:
    g = gen(1)
    f, ft = torch.randn(2000, 16, generator=g), torch.randn(1000, 16, generator=g)
    y, yt = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    assert abs(knn_accuracy(f, y, ft, yt, k=20) - 0.1) < 0.04


def test_linear_probe_is_perfect_on_linearly_separable_data() -> None:
    g = gen(2)
    w = torch.randn(3, 20, generator=g)
    x, xt = torch.randn(600, 20, generator=g), torch.randn(200, 20, generator=g)
    y, yt = (x @ w.T).argmax(dim=1), (xt @ w.T).argmax(dim=1)
    # Margins of test points can be tiny; demand perfection on points clear of the boundary.
    top2 = (xt @ w.T).topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    acc = linear_probe_accuracy(x, y, xt[clear], yt[clear], weight_decay=0.0)
    assert acc == 1.0


def test_linear_probe_is_deterministic() -> None:
    f, y = clusters(20, 4, 8, spread=0.8, seed=3)
    ft, yt = clusters(10, 4, 8, spread=0.8, seed=4)
    assert linear_probe_accuracy(f, y, ft, yt, seed=5) == linear_probe_accuracy(
        f, y, ft, yt, seed=5
    )


def test_alignment_is_zero_for_identical_views_and_4_for_antipodal() -> None:
    z = F.normalize(torch.randn(50, 8, generator=gen()), dim=1)
    assert alignment(z, z) == 0.0
    assert alignment(z, -z) == pytest.approx(4.0)


def test_uniformity_is_zero_when_collapsed_and_negative_when_spread() -> None:
    collapsed = F.normalize(torch.ones(100, 8), dim=1)
    spread = F.normalize(torch.randn(500, 8, generator=gen()), dim=1)
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert uniformity(spread) < -2.0 < uniformity(collapsed)


def test_uniformity_subsamples_large_sets_deterministically() -> None:
    z = F.normalize(torch.randn(5000, 8, generator=gen()), dim=1)
    assert uniformity(z) == uniformity(z)
    assert uniformity(z) == pytest.approx(uniformity(z, max_points=5000), abs=0.05)


def test_retrieval_is_perfect_for_identical_views() -> None:
    z = torch.randn(300, 16, generator=gen())
    assert instance_retrieval(z, z, candidates=64) == 1.0


def test_retrieval_is_near_one_over_candidates_for_random_views() -> None:
    g = gen(3)
    z1, z2 = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    assert instance_retrieval(z1, z2, candidates=10) == pytest.approx(0.1, abs=0.03)


def test_retrieval_scores_a_collapsed_embedding_zero() -> None:
    z = torch.ones(50, 4)
    assert instance_retrieval(z, z, candidates=8) == 0.0


def test_shape_errors_are_explained() -> None:
    with pytest.raises(ValueError, match="same F"):
        knn_accuracy(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="matching the features"):
        linear_probe_accuracy(torch.randn(4, 3), torch.zeros(3), torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="N >= 2"):
        uniformity(torch.randn(1, 3))
    with pytest.raises(ValueError, match="candidates"):
        instance_retrieval(torch.randn(4, 3), torch.randn(4, 3), candidates=1)
