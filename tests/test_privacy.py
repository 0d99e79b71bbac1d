"""DP-SGD in the trainer: per-example gradients and clipping through Opacus, Poisson
sampling, noisy pushes, and the guards that refuse what would couple examples."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from client.negatives import LocalQueue
from client.privacy import DPSGD, check_private_training, noisy_rows
from client.stub import GlobalNegatives, QueueClient
from client.trainer import ContrastiveTrainer
from common.augment import image_views
from common.config import FedConfig, TrainConfig
from common.datasets import load_dataset
from common.encoders import build_encoder
from common.runtime.flower_env import free_port

CPU = torch.device("cpu")
# The loss and views these tests' margins were set at (the defaults before 2026-12-06):
# with the digits views and temperature 0.1 the plain update's spread is smaller.
CFG = FedConfig(width=8, embedding_dim=16, in_batch=False, key_mode="frozen", dp=True,
                noise_multiplier=1.0, device="cpu", temperature=0.2, views="images",
                crop_scale_min=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _model(cfg=CFG, seed=0, norm="group", weight_standardization=False):
    torch.manual_seed(seed)
    return build_encoder("cnn", in_channels=1, embedding_dim=cfg.embedding_dim, norm=norm,
                         width=cfg.width, weight_standardization=weight_standardization)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("ws", [False, True], ids=["plain", "weight-standardized"])
@pytest.mark.parametrize("key_mode", ["frozen", "shared"])
def test_per_example_gradients_sum_both_forward_passes_of_the_symmetric_loss(digits, ws, key_mode):
    # The symmetric loss runs the trainable encoder on view 1 and on view 2; with one
    # network for both views (shared) the positive key is that second pass itself. Opacus
    # must give each example the sum of its gradients from both passes: compare with
    # autograd run on one example at a time (GroupNorm makes a row's output independent of
    # the batch; weight standardisation uses the weight's statistics, not the batch's).
    cfg = replace(CFG, key_mode=key_mode)
    assert cfg.symmetric
    n = 6
    model = _model(weight_standardization=ws)
    key = copy.deepcopy(model).requires_grad_(False) if key_mode != "shared" else None
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    augment = image_views(CFG)
    x = digits.x_train[:n]
    v1, v2 = augment(x, g), augment(x, g)
    negatives = F.normalize(torch.randn(32, CFG.embedding_dim, generator=g), dim=1)

    plain = ContrastiveTrainer(reference, cfg, device=CPU, key_model=key)
    expected = []
    for i in range(n):
        reference.zero_grad()
        plain.view_loss(v1[i : i + 1], v2[i : i + 1], negatives)[0].sum().backward()
        expected.append([p.grad.clone() for p in reference.parameters()])

    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1.0, num_examples=n, batch_size=n)
    private = ContrastiveTrainer(model, cfg, device=CPU, key_model=key, dp=dp)
    dp.backward(private.view_loss(v1, v2, negatives)[0].mean())
    for j, p in enumerate(model.parameters()):
        assert p.grad_sample.shape == (n, *p.shape)
        for i in range(n):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)


def _step_delta(model0, x, dp: DPSGD | None, lr: float) -> torch.Tensor:
    """Parameter change of one step of plain SGD (or DP-SGD) on ``x`` from ``model0``."""
    model = copy.deepcopy(model0)
    key = copy.deepcopy(model0).requires_grad_(False)
    trainer = ContrastiveTrainer(
        model, CFG, device=CPU, key_model=key, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        generator=torch.Generator().manual_seed(5), dp=dp,
    )
    trainer.train_step(x)
    if dp is not None:
        dp.detach()
    return _flat(model) - _flat(model0)


def test_clipping_bounds_one_outlier_examples_influence_on_the_update(digits):
    # Replace example 0 of a batch by a crafted outlier (a checkerboard) or by another
    # digit. Without noise, the two DP-SGD updates differ by lr / E times the difference
    # of two clipped gradients: at most 2 C lr / E. Plain SGD has no such bound.
    n, lr, clip = 16, 0.5, 1e-5  # C below every example's gradient norm: all are clipped
    model0 = _model()
    x = digits.x_train[:n].clone()
    outlier, other = x.clone(), x.clone()
    outlier[0] = (torch.arange(64).view(8, 8) + torch.arange(8).view(8, 1)) % 2  # checkerboard
    other[0] = digits.x_train[n]

    def dp() -> DPSGD:
        return DPSGD(noise_multiplier=0.0, max_grad_norm=clip, num_examples=n, batch_size=n)

    bound = 2 * clip * lr / dp().expected_batch_size
    with_outlier = _step_delta(model0, outlier, dp(), lr)
    private = (with_outlier - _step_delta(model0, other, dp(), lr)).norm()
    plain = (_step_delta(model0, outlier, None, lr) - _step_delta(model0, other, None, lr)).norm()
    assert with_outlier.norm() > 0 and private <= bound * (1 + 1e-3)
    assert plain > 20 * bound  # without clipping, one example moves the update far more


def test_poisson_batches_sample_each_example_independently_from_secret_randomness():
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=1000, batch_size=100)
    assert (dp.steps_per_epoch, dp.sample_rate, dp.expected_batch_size) == (10, 0.1, 100.0)
    torch.manual_seed(0)
    batches = dp.batches(1000)
    sizes = [len(b) for b in batches]
    assert len(batches) == 10 and len(set(sizes)) > 1 and 700 < sum(sizes) < 1300
    assert all(len(set(b.tolist())) == len(b) for b in batches)
    torch.manual_seed(0)  # neither torch's global seed nor the run's --seed decides the sample
    again = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=1000, batch_size=100)
    assert [b.tolist() for b in again.batches(1000)] != [b.tolist() for b in batches]
    with pytest.raises(ValueError, match="set up for 1000 examples"):
        dp.batches(999)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_an_empty_poisson_batch_is_a_noise_only_step(digits, sigma):
    model = _model()
    before = _flat(model)
    dp = DPSGD(noise_multiplier=sigma, max_grad_norm=1.0, num_examples=8, batch_size=4)
    trainer = ContrastiveTrainer(model, CFG, device=CPU, dp=dp,
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    loss, negatives, _ = trainer.train_step(digits.x_train[:0])
    assert (loss, negatives, trainer.step) == (0.0, 0, 1)
    moved = (_flat(model) - before).norm()
    assert (moved > 0) == (sigma > 0)  # the noise, and nothing else


def test_an_epoch_under_dp_takes_every_poisson_step(digits):
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=40, batch_size=16)
    trainer = ContrastiveTrainer(_model(), CFG, device=CPU, dp=dp)
    stats = trainer.train_epoch(digits.x_train[:40])
    assert stats.steps == dp.steps_per_epoch == 3 and trainer.step == 3


def test_noisy_rows_are_unit_norm_releases():
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    noisy = noisy_rows(rows, 0.5, g)
    assert torch.allclose(noisy.norm(dim=1), torch.ones(200), atol=1e-5)
    cosine = (noisy * rows).sum(dim=1)
    assert 0.3 < cosine.mean() < 0.95  # moved, yet still related to the row it releases
    torch.testing.assert_close(noisy_rows(rows, 0.0, g), rows)


@pytest.mark.parametrize(
    "overrides, flag, reason",
    [
        ({"in_batch": True}, "--in-batch", "in-batch negatives couple the examples"),
        ({"norm": "batch"}, "--norm", "BatchNorm mixes the examples"),
        ({"queue_size": 64}, "--queue-size", "un-noised keys of this client's own data"),
        ({"noise_multiplier": 0.0}, "--noise-multiplier", "give the DP-SGD noise, or a target"),
        ({"target_epsilon": 3.0}, "--target-epsilon", "give one"),
        ({"delta": 0.0}, "--delta", "must be in"),
        ({"dp": False, "push_noise": 1.0, "noise_multiplier": 0.0}, "--push-noise",
         "needs --dp true"),
    ],
)
def test_config_refuses_what_dp_cannot_make_private(overrides, flag, reason):
    values = {**CFG.__dict__, **overrides}
    with pytest.raises(ValueError, match=flag) as err:
        FedConfig(**values)
    assert reason in str(err.value)


def test_trainer_refuses_batchnorm_in_batch_negatives_and_own_unnoised_rows():
    def dp() -> DPSGD:
        return DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=8, batch_size=4)

    with pytest.raises(ValueError, match="BatchNorm mixes the examples"):
        ContrastiveTrainer(_model(norm="batch"), CFG, device=CPU, dp=dp())
    simclr = TrainConfig(width=8, embedding_dim=16, in_batch=True, key_mode="frozen")
    with pytest.raises(ValueError, match="in-batch negatives couple"):
        ContrastiveTrainer(_model(), simclr, device=CPU, dp=dp())
    with pytest.raises(ValueError, match="local queue"):
        ContrastiveTrainer(_model(), CFG, device=CPU, dp=dp(), sources=[LocalQueue(8, 16)])
    with QueueClient(f"127.0.0.1:{free_port()}", "token") as client:  # never called
        own = GlobalNegatives(client, 8, max_age=2, exclude_own=False)
        with pytest.raises(ValueError, match="un-noised keys of its own data"):
            check_private_training(CFG, _model(), [own], own_rows_noised=False)
        check_private_training(CFG, _model(), [own], own_rows_noised=True)  # noised: allowed


def test_opacus_is_imported_only_when_dp_is_used():
    # Opacus and SciPy under it take seconds to import: every command, ClientApp and
    # --help would pay them. Loading every command and the apps must leave them out.
    code = ("import sys; from common.runtime.cli import discover_commands; discover_commands(); "
            "import client.app, server.app; print('opacus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_an_in_process_federation_plans_each_clients_rounds_to_its_target(digits):
    # Each client's accountant lives with the run: round 1's epsilon is part of the budget,
    # round 2 ends at the target (the noise derived for the whole plan).
    from common.config import DP_LOSS
    from simulations.in_process import run_federation

    x = digits.x_train[:192]
    cfg = FedConfig(**{**DP_LOSS, "dp": True, "target_epsilon": 8.0, "rounds": 2,
                       "batch_size": 32, "width": 4, "embedding_dim": 8, "device": "cpu",
                       "global_negatives": 0, "push_fraction": 0.0, "seed": 0})
    model, records = run_federation(cfg, [x[:96], x[96:]], x.shape[1])
    eps = [r.extra["epsilon"] for r in records]
    assert 0 < eps[0] < eps[1] <= 8.0 and eps[1] >= 0.99 * 8.0
    assert all(r.examples == 192 for r in records)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    plain, _ = run_federation(replace(cfg, dp=False, target_epsilon=0.0), [x[:96], x[96:]],
                              x.shape[1])
    assert not torch.equal(_flat(plain), _flat(model))  # clipped and noised: another model
