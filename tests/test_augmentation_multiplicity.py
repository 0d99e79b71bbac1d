"""Augmentation multiplicity under DP-SGD (``--augmentations K``, De et al. 2022): each
sampled example's gradient is the mean over its K pairs of views, clipped once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.privacy import DPSGD
from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.datasets import load_dataset
from common.encoders import build_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

PRIVATE = FedConfig(width=8, embedding_dim=16, batch_size=4, objective="moment", in_batch=False,
                    key_mode="ema", global_negatives=0, push_fraction=0.0, device="cpu",
                    views="images", temperature=0.2, dp=True, noise_multiplier=1.0)


def _per_row_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of each row's loss alone, one backward per row (no Opacus)."""
    out = []
    for row in x:
        model.zero_grad()
        (model(row[None]) ** 2).sum().backward()
        out.append(model.weight.grad.clone())
    return out


def test_each_examples_gradient_is_the_mean_of_its_rows_and_clipped_once():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(6, 3)  # 3 examples x K = 2 rows each
    rows = _per_row_grads(model, x)
    clip = 0.5
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip, num_examples=3, batch_size=3,
               augmentations=2)
    optimizer = dp.attach(model, torch.optim.SGD(model.parameters(), lr=0.0))
    optimizer.zero_grad(set_to_none=True)
    dp.backward((model(x) ** 2).sum(dim=1).mean())
    dp.group_examples()
    per_example = model.weight.grad_sample
    assert per_example.shape == (3, 2, 3)
    for e in range(3):
        torch.testing.assert_close(per_example[e], 0.5 * (rows[2 * e] + rows[2 * e + 1]))
    optimizer.step()  # clips each example's mean to `clip`, sums, no noise, / expected batch
    norms = torch.stack([(per_example[e].norm() ** 2 + model.bias.grad_sample[e].norm() ** 2).sqrt()
                         for e in range(3)])
    scale = (clip / norms).clamp(max=1.0)
    expected = (per_example * scale[:, None, None]).sum(dim=0) / 3
    torch.testing.assert_close(model.weight.grad, expected)
    dp.detach()


def test_rows_that_are_not_whole_groups_are_refused():
    model = nn.Linear(3, 2)
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1.0, num_examples=3, batch_size=3,
               augmentations=2)
    dp.attach(model, torch.optim.SGD(model.parameters(), lr=0.0))
    dp.backward(model(torch.randn(5, 3)).sum(dim=1).mean())
    with pytest.raises(ValueError, match="whole groups of 2"):
        dp.group_examples()
    dp.detach()
    with pytest.raises(ValueError, match="augmentations"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=3, batch_size=3,
              augmentations=0)


def test_a_private_step_sees_k_views_per_example_and_releases_a_bounded_moment():
    digits = load_dataset("digits")
    cfg = FedConfig(**{**PRIVATE.__dict__, "augmentations": 3})
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=8, batch_size=4,
               moment_noise=0.0, augmentations=3)
    torch.manual_seed(0)
    model = build_encoder("cnn", in_channels=1, embedding_dim=16, norm="group", width=8)
    trainer = ContrastiveTrainer(model, cfg, device=torch.device("cpu"), dp=dp,
                                 generator=torch.Generator().manual_seed(1))
    seen = []
    trainer.sources = [type("Spy", (), {"negatives": lambda self, step, device: None,
                                        "observe": lambda self, keys: seen.append(keys)})()]
    trainer.second_moment.zero_()
    trainer.train_step(digits.x_train[:4])
    (keys,) = seen
    assert keys.shape == (12, 16)  # 4 examples x 3 pairs of views
    assert all(p.grad_sample is None or p.grad_sample.shape[0] == 4
               for p in dp.optimizer.params if hasattr(p, "grad_sample"))
    # No moment noise: the release is the examples' mean outer products, each of norm <= 1.
    released = trainer.second_moment / 0.1 * dp.expected_batch_size
    assert torch.linalg.matrix_norm(released) <= 4 + 1e-4
    dp.detach()


def test_augmentations_need_dp():
    with pytest.raises(ValueError, match="--augmentations"):
        FedConfig(augmentations=2)
    with pytest.raises(ValueError, match="--augmentations"):
        FedConfig(**{**PRIVATE.__dict__, "augmentations": 0})
