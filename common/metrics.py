"""Representation metrics on frozen features: kNN, linear probe, alignment, uniformity, retrieval.

References:
    Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination" (weighted kNN monitor). Wang & Isola 2020, "Understanding Contrastive
    Representation Learning through Alignment and Uniformity on the Hypersphere".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows of test features scored against the training set at once: bounds the
# (chunk x N_train) similarity matrix to a few hundred MB for N_train = 50,000.
_CHUNK = 1024


def _module_of(fn: Callable[[Tensor], Tensor]) -> nn.Module | None:
    """The module behind ``fn``: the module itself or the owner of a bound method."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def embed(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Features of ``x`` (N, ...) computed batch by batch without gradients.

    If ``fn`` is a module or a bound method of one (``model.features``), the module runs
    in eval mode and every submodule's train/eval flag is restored afterwards.

    Args:
        fn: maps a batch (B, ...) on ``device`` to features (B, F).
        x: the inputs, on any device.
        batch_size: inputs per call of ``fn``.
        device: where ``fn`` runs.

    Returns:
        (N, F) float32 features on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    module = _module_of(fn)
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            out = [
                fn(x[i : i + batch_size].to(device)).float().cpu()
                for i in range(0, len(x), batch_size)
            ]
    finally:
        for m, training in modes:
            m.training = training
    if not out:
        raise ValueError("x is empty: nothing to embed")
    return torch.cat(out)  # N x F


def _check_pair(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor) -> None:
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(
            f"features must be (N, F) and (M, F) with the same F, got {tuple(train_f.shape)} and {tuple(test_f.shape)}"
        )
    if train_y.shape != (len(train_f),) or test_y.shape != (len(test_f),):
        raise ValueError(
            f"labels must be (N,) and (M,) matching the features, got {tuple(train_y.shape)} and {tuple(test_y.shape)}"
        )
    if len(train_f) == 0 or len(test_f) == 0:
        raise ValueError("train and test sets must both be non-empty")


def knn_accuracy(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Weighted kNN accuracy on cosine similarity (Wu et al. 2018).

    Each test point takes its k most similar training points; neighbour j votes for its
    class with weight exp(s_j / T); the class with the largest total wins.

    Args:
        train_f: (N, F) training features (normalised here).
        train_y: (N,) int labels.
        test_f: (M, F) test features.
        test_y: (M,) int labels.
        k: neighbours (capped at N).
        temperature: T > 0.

    Returns:
        Top-1 accuracy in [0, 1].
    """
    _check_pair(train_f, train_y, test_f, test_y)
    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got {k}, {temperature}")
    k = min(k, len(train_f))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_n = F.normalize(train_f.float(), dim=1)
    test_n = F.normalize(test_f.float(), dim=1)
    train_y = train_y.long().to(train_n.device)
    correct = 0
    for i in range(0, len(test_n), _CHUNK):
        sim = test_n[i : i + _CHUNK] @ train_n.T  # B x N
        top_sim, top_idx = sim.topk(k, dim=1)  # B x k
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], weights)  # B x classes
        correct += int((votes.argmax(dim=1) == test_y[i : i + _CHUNK].to(sim.device)).sum())
    return correct / len(test_n)


def linear_probe_accuracy(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Accuracy of a multinomial logistic regression trained on frozen features.

    Features are standardised with the training set's mean and standard deviation; the
    classifier is fit full-batch with L-BFGS (strong Wolfe line search), minimising the
    mean cross-entropy plus ``weight_decay / 2 * ||W||^2`` (bias not penalised). The
    problem is convex, so the result hardly depends on the starting point; ``seed``
    draws the small random initial weights, which makes the run exactly repeatable.

    Args:
        train_f: (N, F), train_y: (N,), test_f: (M, F), test_y: (M,).
        epochs: L-BFGS iterations (one full pass each, plus line-search evaluations).
        lr: L-BFGS step length.
        weight_decay: L2 penalty on the weights.
        seed: seeds the initial weights.

    Returns:
        Top-1 test accuracy in [0, 1].
    """
    _check_pair(train_f, train_y, test_f, test_y)
    if epochs < 1 or not lr > 0 or weight_decay < 0:
        raise ValueError(
            f"need epochs >= 1, lr > 0, weight_decay >= 0; got {epochs}, {lr}, {weight_decay}"
        )
    train_f, test_f = train_f.float(), test_f.float()
    mean = train_f.mean(dim=0)
    std = train_f.std(dim=0).clamp_min(1e-6)  # constant features would otherwise divide by 0
    x_train, x_test = (train_f - mean) / std, (test_f - mean) / std
    y_train = train_y.long()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(num_classes, x_train.shape[1], generator=gen)).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (
            F.cross_entropy(x_train @ weight.T + bias, y_train)
            + 0.5 * weight_decay * weight.pow(2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_test @ weight.T + bias).argmax(dim=1)
    return float((pred == test_y.long()).float().mean())


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2) -> float:
    """Wang & Isola's alignment: mean over pairs of ||z1_i - z2_i||^alpha (lower is better).

    Args:
        z1, z2: (N, D) L2-normalised embeddings of two views, row i of each a positive pair.
        alpha: exponent, > 0.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or len(z1) == 0:
        raise ValueError(
            f"z1 and z2 must be the same non-empty (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    return float((z1.float() - z2.float()).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2, *, max_points: int = 2000) -> float:
    """Wang & Isola's uniformity: log mean over pairs i < j of exp(-t ||z_i - z_j||^2).

    0 for a collapsed set (all points equal); more negative is more uniform on the sphere
    (its minimum for D-dimensional unit vectors is about -4 at t = 2 in high dimension).
    Beyond ``max_points`` rows a fixed-seed random subset is used: the pairwise term is
    quadratic in N, and the estimate is already tight at a few thousand points.

    Args:
        z: (N, D) L2-normalised embeddings, N >= 2.
        t: the kernel's scale, > 0.
        max_points: rows kept for the estimate.
    """
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"z must be (N, D) with N >= 2, got {tuple(z.shape)}")
    if len(z) > max_points:
        z = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:max_points]]
    sq = torch.pdist(z.float(), p=2).pow(2)  # N(N-1)/2 pairs i < j
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(len(sq)))


def instance_retrieval(z1: Tensor, z2: Tensor, candidates: int = 256, seed: int = 0) -> float:
    """Top-1 accuracy of finding an example's second view among distractors.

    For each i, the candidate set is z2[i] plus ``candidates - 1`` other rows of z2 drawn
    at random without replacement (fresh for every i, from a generator seeded with
    ``seed``). The query z1[i] succeeds when its cosine similarity to z2[i] is strictly
    larger than to every distractor, so a collapsed embedding scores 0, not 1. Chance
    level is 1 / candidates. ``candidates`` is capped at N.

    Args:
        z1, z2: (N, D) embeddings of two views (normalised here), N >= 2.
        candidates: size of each candidate set, >= 2.
        seed: seeds the choice of distractors.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or len(z1) < 2:
        raise ValueError(
            f"z1 and z2 must be the same (N, D) with N >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if candidates < 2:
        raise ValueError(f"candidates must be >= 2, got {candidates}")
    n = len(z1)
    m = min(candidates, n) - 1  # distractors per query
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, n, _CHUNK):
        rows = torch.arange(i, min(i + _CHUNK, n))  # B
        # m distractors without replacement: the m smallest of uniform keys, own index excluded.
        keys = torch.rand(len(rows), n, generator=gen)
        keys[torch.arange(len(rows)), rows] = 2.0
        distractors = keys.topk(m, dim=1, largest=False).indices  # B x m
        sim = a[rows] @ b.T  # B x N
        own = sim[torch.arange(len(rows)), rows]  # B
        others = sim.gather(1, distractors)  # B x m
        correct += int((own > others.max(dim=1).values).sum())
    return correct / n
