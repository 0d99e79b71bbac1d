"""``--objective moment``: InfoNCE per example against negatives drawn from the keys'
running second moment, released with noise under DP-SGD and accounted with each step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from client.privacy import (
    DPSGD,
    MOMENT_NOISE_RATIO,
    joint_noise_multiplier,
    sgd_noise_multiplier,
)
from client.trainer import MOMENT_SAMPLES, SECOND_MOMENT_RATE, ContrastiveTrainer
from common.augment import image_views
from common.config import FedConfig
from common.datasets import load_dataset
from common.encoders import build_encoder

CPU = torch.device("cpu")
MOMENT = FedConfig(width=8, embedding_dim=16, batch_size=8, objective="moment", in_batch=False,
                   key_mode="ema", global_negatives=0, push_fraction=0.0, device="cpu",
                   views="images", temperature=0.2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trainer(cfg: FedConfig = MOMENT, dp: DPSGD | None = None) -> ContrastiveTrainer:
    torch.manual_seed(0)
    model = build_encoder("cnn", in_channels=1, embedding_dim=cfg.embedding_dim, norm="group",
                          width=cfg.width)
    return ContrastiveTrainer(model, cfg, device=CPU, dp=dp,
                              generator=torch.Generator().manual_seed(1))


def test_one_examples_loss_has_no_gradient_in_another_example(digits):
    trainer = _trainer()
    trainer.second_moment = torch.diag(torch.linspace(0.01, 0.2, 16))  # not isotropic
    g = torch.Generator().manual_seed(2)
    augment = image_views(MOMENT)
    x = digits.x_train[:6]
    v1 = augment(x, g).requires_grad_(True)
    v2 = augment(x, g).requires_grad_(True)
    negatives, _ = trainer._negatives(x.shape[0])
    assert negatives.shape == (MOMENT_SAMPLES, 16)
    losses, _ = trainer.view_loss(v1, v2, negatives)
    for i in range(x.shape[0]):
        g1, g2 = torch.autograd.grad(losses[i], (v1, v2), retain_graph=True)
        others = torch.arange(x.shape[0]) != i
        assert g1[i].abs().sum() > 0 and g2[i].abs().sum() > 0
        assert g1[others].abs().max() == 0 and g2[others].abs().max() == 0


def _view_losses(loss_fn, x, seed: int = 2):
    """``loss_fn(v1, v2)`` on two views of ``x`` drawn from ``seed`` (the same draws for any
    pixels of the same shape)."""
    g = torch.Generator().manual_seed(seed)
    augment = image_views(MOMENT)
    v1, v2 = augment(x, g), augment(x, g)
    return loss_fn(v1, v2)


def test_one_examples_loss_does_not_change_with_another_examples_data(digits):
    # A loss can have no gradient in another example and still read its data (negatives that
    # are other examples' detached embeddings): under DP-SGD each example's gradient must not
    # change when another example does, so the values are checked too.
    trainer = _trainer()
    trainer.second_moment = torch.diag(torch.linspace(0.01, 0.2, 16))
    negatives, _ = trainer._negatives(6)
    x = digits.x_train[:6]
    other = x.clone()
    other[3] = digits.x_train[10]
    others = torch.arange(6) != 3

    def moment(v1, v2):
        return trainer.view_loss(v1, v2, negatives)[0].detach()

    before, after = _view_losses(moment, x), _view_losses(moment, other)
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert (after[3] - before[3]).abs() > 1e-4

    def detached_batch(v1, v2):  # the batch's keys as negatives, without gradient
        q, k = trainer.model(v1), trainer.key_model(v2).detach()
        return F.cross_entropy(q @ k.T / 0.2, torch.arange(len(q)), reduction="none").detach()

    before, after = _view_losses(detached_batch, x), _view_losses(detached_batch, other)
    assert (after[others] - before[others]).abs().min() > 1e-6  # the check catches it


def test_negatives_follow_the_second_moment_and_ignore_its_noise():
    trainer = _trainer()
    m = torch.zeros(16, 16)
    m[0, 0], m[1, 1] = 0.8, 0.2
    m[2, 2] = -0.05  # noise can make a released moment indefinite
    trainer.second_moment = m
    samples = trainer._moment_samples(4000)
    assert torch.isfinite(samples).all()
    torch.testing.assert_close(samples.norm(dim=1), torch.ones(4000))
    mass = (samples ** 2).mean(dim=0)  # where the samples lie, per axis
    assert mass[2:].max() == 0  # nothing along the negative eigenvalue or the null space
    assert mass[0] > 2 * mass[1] > 0


def test_the_running_moment_averages_the_steps_keys(digits):
    trainer = _trainer()
    seen = []
    trainer.sources = [type("Spy", (), {"negatives": lambda self, step, device: None,
                                        "observe": lambda self, keys: seen.append(keys)})()]
    before = trainer.second_moment.clone()
    trainer.train_step(digits.x_train[:8])
    (keys,) = seen
    expected = (1 - SECOND_MOMENT_RATE) * before + SECOND_MOMENT_RATE * keys.T @ keys / 8
    torch.testing.assert_close(trainer.second_moment, expected)


def test_the_released_moment_bounds_each_example_and_adds_the_stated_noise():
    z = torch.randn(5, 16)
    quiet = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=10, batch_size=5,
                  moment_noise=0.0)
    unit = F.normalize(z, dim=1)
    # Each example's share is z z^T of its unit embedding, whatever the norm it came with.
    torch.testing.assert_close(quiet.noisy_moment_sum(3 * z, 16), unit.T @ unit)
    assert torch.linalg.matrix_norm(unit[:1].T @ unit[:1]) == pytest.approx(1.0)
    noisy = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=10, batch_size=5,
                  moment_noise=2.0, generator=torch.Generator().manual_seed(0))
    draws = torch.stack([noisy.noisy_moment_sum(torch.zeros(0, 16), 16) for _ in range(400)])
    assert torch.equal(draws, draws.transpose(1, 2))
    diagonal = draws.diagonal(dim1=1, dim2=2).flatten()
    off = draws[:, 0, 1:]
    assert diagonal.std().item() == pytest.approx(2.0, rel=0.05)  # the noise multiplier
    assert off.std().item() == pytest.approx(2.0 / math.sqrt(2), rel=0.05)  # symmetrised


@pytest.mark.parametrize("sgd", [0.6, 1.0, 4.0])
def test_the_joint_release_is_one_gaussian_mechanism_of_the_joint_multiplier(sgd):
    # The gradient (noise sigma) and the second moment (noise r sigma) of the same batch,
    # composed as two Gaussian mechanisms, lose exactly the privacy of one Gaussian of the
    # joint multiplier; the accountant records that one (with the batch's sampling).
    joint = joint_noise_multiplier(sgd)
    assert joint < sgd and sgd_noise_multiplier(joint) == pytest.approx(sgd)
    pair = pld_lib.from_gaussian_mechanism(sgd, value_discretization_interval=1e-4).compose(
        pld_lib.from_gaussian_mechanism(MOMENT_NOISE_RATIO * sgd, value_discretization_interval=1e-4))
    one = pld_lib.from_gaussian_mechanism(joint, value_discretization_interval=1e-4)
    for delta in (1e-3, 1e-5):
        assert pair.get_epsilon_for_delta(delta) == pytest.approx(one.get_epsilon_for_delta(delta),
                                                                   rel=1e-3)


def test_an_empty_poisson_batch_still_releases_a_noisy_moment(digits):
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=8, batch_size=4,
               moment_noise=2.0)
    cfg = FedConfig(**{**MOMENT.__dict__, "dp": True, "noise_multiplier": 1.0})
    trainer = _trainer(cfg, dp)
    before = trainer.second_moment.clone()
    trainer.train_step(digits.x_train[:0])
    assert not torch.equal(trainer.second_moment, before)
    trainer.train_step(digits.x_train[:4])
    dp.detach()


@pytest.mark.parametrize(
    "overrides, flag",
    [({"key_mode": "shared"}, "--key-mode"), ({"key_mode": "frozen"}, "--key-mode"),
     ({"in_batch": True}, "--in-batch"), ({"queue_size": 64}, "--queue-size"),
     ({"dp": True, "noise_multiplier": 1.0, "norm": "batch"}, "--norm")],
)
def test_config_refuses_what_the_moment_objective_cannot_use(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        FedConfig(**{**MOMENT.__dict__, **overrides})
