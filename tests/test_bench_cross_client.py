"""The cross-client negatives benchmark's arms differ only in the gradient their extra negatives carry."""

from __future__ import annotations

import pytest
import torch

from bench.cross_client_negatives_bench import ExtraNegativesTrainer
from common.config import FedConfig
from common.encoders import build_encoder

CFG = FedConfig(width=4, embedding_dim=8, batch_size=4, device="cpu")


def trainer(grad: str) -> ExtraNegativesTrainer:
    torch.manual_seed(0)
    model = build_encoder("cnn", in_channels=1, embedding_dim=8, width=4)
    items = torch.rand(12, 1, 8, 8)
    t = ExtraNegativesTrainer(model, CFG, device=torch.device("cpu"), items=items, extra=3, grad=grad,
                              generator=torch.Generator().manual_seed(0))
    t.pool = torch.arange(6, 12)  # the other partitions' items
    return t


@pytest.mark.parametrize(("grad", "backbone", "head"), [("none", False, False), ("head", False, True),
                                                          ("full", True, True)])
def test_extra_negatives_carry_gradient_only_where_the_arm_says(grad, backbone, head):
    t = trainer(grad)
    negatives = t._extra_negatives()
    assert negatives.shape == (3, 8)
    assert torch.allclose(negatives.norm(dim=1), torch.ones(3), atol=1e-5)
    t.model.zero_grad()
    if negatives.requires_grad:
        negatives.sum().backward()
    grads = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
             for name, part in (("backbone", t.model.backbone), ("head", t.model.head))}
    assert grads == {"backbone": backbone, "head": head}


def test_extra_negatives_come_from_the_pool_only():
    t = trainer("none")
    t.items[:6] = float("nan")  # the batch's own partition: never drawn
    for _ in range(5):
        assert torch.isfinite(t._extra_negatives()).all()
    loss, _steps, _had = t.train_step(torch.rand(4, 1, 8, 8))
    assert loss > 0
