"""InfoNCE: agrees with the textbook formula, stays finite at low temperature, keeps examples
independent without in-batch negatives, and refuses ill-posed calls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from common.loss import InfoNCELoss, info_nce


def unit(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def naive_info_nce(
    q: torch.Tensor, k: torch.Tensor, neg: torch.Tensor, t: float, in_batch: bool
) -> list[float]:
    """loss_i = -log(exp(pos_i) / sum(exp(logits_i))), written out with Python loops."""
    n = len(q)
    losses = []
    for i in range(n):
        pos = math.exp(float(q[i] @ k[i]) / t)
        denom = pos + sum(math.exp(float(q[i] @ neg[j]) / t) for j in range(len(neg)))
        if in_batch:
            denom += sum(math.exp(float(q[i] @ k[j]) / t) for j in range(n) if j != i)
            denom += sum(math.exp(float(q[i] @ q[j]) / t) for j in range(n) if j != i)
        losses.append(-math.log(pos / denom))
    return losses


@pytest.mark.parametrize("in_batch", [False, True])
def test_matches_the_naive_formula(in_batch: bool) -> None:
    q, k, neg = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(7, 8, seed=3)
    loss = info_nce(q, k, neg, temperature=0.3, in_batch=in_batch)
    assert loss.shape == (5,)
    torch.testing.assert_close(
        loss, torch.tensor(naive_info_nce(q, k, neg, 0.3, in_batch), dtype=torch.float64)
    )


def test_in_batch_alone_is_nt_xent_over_the_2n_minus_2_others() -> None:
    q, k = unit(4, 6, seed=1), unit(4, 6, seed=2)
    expected = naive_info_nce(q, k, q[:0], 0.5, in_batch=True)
    torch.testing.assert_close(
        info_nce(q, k, None, 0.5, in_batch=True), torch.tensor(expected, dtype=torch.float64)
    )


def test_finite_with_large_logits_at_temperature_0_01() -> None:
    q = unit(16, 32, seed=1, dtype=torch.float32)
    k = F.normalize(q + 0.01 * unit(16, 32, seed=2, dtype=torch.float32), dim=1)  # logits near 100
    neg = torch.cat(
        [unit(64, 32, seed=3, dtype=torch.float32), q[:4]]
    )  # some negatives as close as the positive
    q = q.clone().requires_grad_()
    for in_batch in (False, True):
        loss = info_nce(q, k, neg, temperature=0.01, in_batch=in_batch)
        (grad,) = torch.autograd.grad(loss.sum(), q)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def _jacobian_wrt_query(in_batch: bool) -> torch.Tensor:
    q, k, neg = unit(4, 6, seed=1), unit(4, 6, seed=2), unit(10, 6, seed=3)
    jac = jacobian(
        lambda query: info_nce(query, k.detach(), neg.detach(), 0.2, in_batch=in_batch), q
    )  # 4 x 4 x 6
    return jac.abs().sum(dim=2)  # [i, j] = sum over D of |d loss_i / d query_j|


def test_without_in_batch_each_loss_depends_on_its_own_query_only() -> None:
    norms = _jacobian_wrt_query(in_batch=False)
    off_diagonal = norms[~torch.eye(4, dtype=torch.bool)]
    assert torch.all(off_diagonal == 0)
    assert torch.all(norms.diagonal() > 0)


def test_in_batch_negatives_couple_the_examples() -> None:
    norms = _jacobian_wrt_query(in_batch=True)
    assert torch.all(norms[~torch.eye(4, dtype=torch.bool)] > 0)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_temperature_is_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        info_nce(unit(2, 4), unit(2, 4), unit(3, 4), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=temperature)


def test_shape_mismatches_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2, 4\)"):
        info_nce(unit(3, 4), unit(2, 4), unit(5, 4))
    with pytest.raises(ValueError, match=r"\(5, 8\)"):
        info_nce(unit(3, 4), unit(3, 4), unit(5, 8))


@pytest.mark.parametrize("negatives", [None, torch.empty(0, 4, dtype=torch.float64)])
def test_no_negatives_at_all_is_refused(negatives: torch.Tensor | None) -> None:
    with pytest.raises(ValueError, match="no negatives"):
        info_nce(unit(3, 4), unit(3, 4), negatives)


def test_in_batch_with_a_single_example_has_no_negatives() -> None:
    with pytest.raises(ValueError, match="no negatives"):
        info_nce(unit(1, 4), unit(1, 4), None, in_batch=True)


def test_module_reduces_and_validates_at_construction() -> None:
    q, k, neg = unit(3, 4, seed=1), unit(3, 4, seed=2), unit(5, 4, seed=3)
    per_example = info_nce(q, k, neg, 0.2)
    torch.testing.assert_close(InfoNCELoss(0.2)(q, k, neg), per_example.mean())
    torch.testing.assert_close(InfoNCELoss(0.2, reduction="none")(q, k, neg), per_example)
    with pytest.raises(ValueError, match="mean, none"):
        InfoNCELoss(reduction="sum")
