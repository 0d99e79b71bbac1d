"""The loss's options for negatives (hard-negative weighting, the queue temperature): each
against a direct, loop-based formula on tiny inputs, the identity when off, per-example
independence, validation, and use under DP-SGD."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from client.privacy import DPSGD
from client.trainer import ContrastiveTrainer
from common.config import FedConfig, TrainConfig
from common.encoders import build_encoder
from common.loss import InfoNCELoss, info_nce

N, K, D, T = 3, 5, 4, 0.5
CPU = torch.device("cpu")


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


Q, KEY, NEG = unit(N, D, seed=1), unit(N, D, seed=2), unit(K, D, seed=3)


def naive(q, k, neg, t, in_batch=False, beta=0.0, tq=None) -> list[float]:
    """The papers' formulas, one query at a time, with Python floats; queue rows at
    temperature ``tq`` (default ``t``)."""
    n, losses = len(q), []
    tq = t if tq is None else tq
    for i in range(n):
        p = float(q[i] @ k[i]) / t
        # (cosine, temperature) of each negative of query i
        negs = [(float(q[i] @ neg[j]), tq) for j in range(len(neg))]
        if in_batch:
            negs += [(float(q[i] @ k[j]), t) for j in range(n) if j != i]
            negs += [(float(q[i] @ q[j]), t) for j in range(n) if j != i]
        if beta > 0:
            # Robinson et al. 2021: importance weights e^{beta s} of mean 1, Ng clamped
            m = len(negs)
            imp = [math.exp(beta * c / tj) for c, tj in negs]
            mean_imp = sum(imp) / m
            s_sum = sum(h / mean_imp * math.exp(c / tj) for (c, tj), h in zip(negs, imp, strict=True))
            least = sum(math.exp(-1 / tj) for _c, tj in negs)
            ng = max(s_sum, least)
            losses.append(-math.log(math.exp(p) / (math.exp(p) + ng)))
            continue
        z = math.exp(p) + sum(math.exp(c / tj) for c, tj in negs)
        losses.append(-math.log(math.exp(p) / z))
    return losses


def close(loss: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


# -- off is today's loss ---------------------------------------------------------------


@pytest.mark.parametrize("in_batch", [False, True])
def test_every_option_off_is_exactly_plain_info_nce(in_batch: bool) -> None:
    plain = info_nce(Q, KEY, NEG, T, in_batch=in_batch)
    assert torch.equal(info_nce(Q, KEY, NEG, T, in_batch=in_batch, hard_negative_beta=0.0), plain)
    close(plain, naive(Q, KEY, NEG, T, in_batch))


def test_default_configs_turn_hard_negatives_off() -> None:
    assert TrainConfig().hard_negative_beta == 0.0 and FedConfig().hard_negative_beta == 0.0


# -- each option against its formula ---------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("in_batch", [False, True])
def test_a_queue_temperature_divides_the_queue_rows_alone(beta: float, in_batch: bool) -> None:
    tq = 1.3  # the positive and the batch's own negatives keep T
    loss = info_nce(Q, KEY, NEG, T, in_batch=in_batch, hard_negative_beta=beta, queue_temperature=tq)
    close(loss, naive(Q, KEY, NEG, T, in_batch, beta=beta, tq=tq))
    assert not torch.allclose(loss, info_nce(Q, KEY, NEG, T, in_batch=in_batch,
                                             hard_negative_beta=beta))
    # T_q = T is the plain loss, bit for bit
    assert torch.equal(info_nce(Q, KEY, NEG, T, in_batch=in_batch, queue_temperature=T),
                       info_nce(Q, KEY, NEG, T, in_batch=in_batch))


def test_the_trainer_passes_the_queue_temperature_zero_meaning_the_temperature_and_the_weight() -> None:
    source = _source()
    x = _images(6)

    def losses(cfg: FedConfig) -> torch.Tensor:
        trainer = ContrastiveTrainer(_model(), cfg, device=CPU, sources=[source])
        g = torch.Generator().manual_seed(1)
        v1, v2 = trainer.augment(x, g), trainer.augment(x, g)
        negatives, _ = trainer._bank()
        return trainer.view_loss(v1, v2, negatives)[0].detach()

    cfg = FedConfig(width=8, embedding_dim=16, device="cpu", batch_size=6, symmetric=False)
    model = _model()
    g = torch.Generator().manual_seed(1)
    trainer = ContrastiveTrainer(model, cfg, device=CPU, sources=[source])
    v1, v2 = trainer.augment(x, g), trainer.augment(x, g)
    q, k = model(v1).detach(), model(v2).detach()
    expected = info_nce(q, k, source.rows, cfg.temperature, in_batch=True, queue_temperature=0.5)
    torch.testing.assert_close(losses(replace(cfg, queue_temperature=0.5)), expected)
    assert torch.equal(losses(replace(cfg, queue_temperature=0.0)),
                       losses(replace(cfg, queue_temperature=cfg.temperature)))
    per_example = replace(cfg, in_batch=False, queue_temperature=0.5)
    weighed = info_nce(q, k, source.rows, cfg.temperature, queue_temperature=0.5,
                       negative_weight=3.0)
    torch.testing.assert_close(losses(replace(per_example, negative_weight=3.0)), weighed)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("in_batch", [False, True])
def test_hard_negatives_match_robinson_et_al(beta: float, in_batch: bool) -> None:
    close(info_nce(Q, KEY, NEG, T, in_batch=in_batch, hard_negative_beta=beta),
          naive(Q, KEY, NEG, T, in_batch, beta=beta))


#: name -> the keyword arguments of :func:`info_nce` that turn the options on.
ALL_OPTIONS = {
    "hard": {"hard_negative_beta": 1.0},
    "hard, queue temperature": {"hard_negative_beta": 2.0, "queue_temperature": 1.3},
    "queue temperature": {"queue_temperature": 1.3},
    "negative weight": {"negative_weight": 2.0, "queue_temperature": 1.3},
}


@pytest.mark.parametrize(("w", "tq", "beta"), [(2.0, None, 0.0), (3.5, 1.3, 0.0), (2.0, None, 1.0)])
def test_a_negative_weight_adds_w_minus_1_log_sum_exps_of_the_negatives(w, tq, beta) -> None:
    # InfoNCE plus w - 1 more log-sum-exps of the query's logits against the negatives.
    loss = info_nce(Q, KEY, NEG, T, negative_weight=w, queue_temperature=tq,
                    hard_negative_beta=beta)
    t = T if tq is None else tq
    extra = [math.log(sum(math.exp(float(Q[i] @ NEG[j]) / t) for j in range(K)))
             for i in range(N)]
    close(loss, [a + (w - 1) * b for a, b in
                 zip(naive(Q, KEY, NEG, T, beta=beta, tq=tq), extra, strict=True)])
    close(info_nce(Q, KEY, NEG, T, negative_weight=1.0), naive(Q, KEY, NEG, T))


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_finite_with_large_logits_at_temperature_0_01(name: str) -> None:
    kwargs = {**ALL_OPTIONS[name], "queue_temperature": 0.01}
    q = unit(16, 32, seed=1).float()
    k = F.normalize(q + 0.01 * unit(16, 32, seed=2).float(), dim=1)
    neg = torch.cat([unit(60, 32, seed=3).float(), q[:4]])
    q = q.clone().requires_grad_()
    loss = info_nce(q, k, neg, 0.01, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), q)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# -- per example -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_each_loss_depends_on_its_own_query_only(name: str) -> None:
    kwargs = ALL_OPTIONS[name]
    jac = jacobian(lambda query: info_nce(query, KEY, NEG, T, **kwargs), Q)  # N x N x D
    norms = jac.abs().sum(dim=2)
    assert torch.all(norms[~torch.eye(N, dtype=torch.bool)] == 0)
    assert torch.all(norms.diagonal() > 0)


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_perturbing_one_example_leaves_the_others_losses_unchanged(name: str) -> None:
    kwargs = ALL_OPTIONS[name]
    before = info_nce(Q, KEY, NEG, T, **kwargs)
    q, k = Q.clone(), KEY.clone()
    q[1], k[1] = unit(1, D, seed=9)[0], unit(1, D, seed=10)[0]
    after = info_nce(q, k, NEG, T, **kwargs)
    assert torch.equal(after[[0, 2]], before[[0, 2]]) and after[1] != before[1]


def test_the_loss_module_carries_the_options() -> None:
    module = InfoNCELoss(T, reduction="none", hard_negative_beta=1.0, negative_weight=2.0)
    torch.testing.assert_close(module(Q, KEY, NEG),
                               info_nce(Q, KEY, NEG, T, hard_negative_beta=1.0, negative_weight=2.0))
    assert "hard_negative_beta=1.0" in repr(module) and "negative_weight=2.0" in repr(module)


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [-1.0, math.inf, math.nan])
def test_a_bad_hard_negative_beta_is_refused_by_the_loss(beta: float) -> None:
    with pytest.raises(ValueError, match="hard_negative_beta must be a finite number >= 0"):
        info_nce(Q, KEY, NEG, T, hard_negative_beta=beta)
    with pytest.raises(ValueError, match="hard_negative_beta must be a finite number >= 0"):
        InfoNCELoss(T, hard_negative_beta=beta)


@pytest.mark.parametrize(("w", "in_batch", "message"), [
    (0.5, False, "negative_weight must be a finite number >= 1"),
    (math.nan, False, "negative_weight must be a finite number >= 1"),
    (math.inf, False, "negative_weight must be a finite number >= 1"),
    (2.0, True, "it needs in_batch=False"),
])
def test_a_bad_negative_weight_is_refused_by_the_loss(w: float, in_batch: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        info_nce(Q, KEY, NEG, T, in_batch=in_batch, negative_weight=w)
    with pytest.raises(ValueError, match=message):
        InfoNCELoss(T, in_batch=in_batch, negative_weight=w)


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"hard_negative_beta": -0.5}, "--hard-negative-beta must"),
    ({"negative_weight": 0.9, "in_batch": False}, "--negative-weight must be a finite number >= 1"),
    ({"negative_weight": 2.0}, "--negative-weight weighs the detached negatives of a per-example "
                               "loss: needs --in-batch false"),
    ({"hard_negative_beta": math.nan}, "--hard-negative-beta must"),
    ({"max_age": 0}, "--max-age 0 with --pull-mode reproducible: pulls see only rows of finished"),
    ({"queue_temperature": -0.1}, "--queue-temperature must be zero"),
    ({"queue_temperature": math.inf}, "--queue-temperature must be zero"),
])
def test_config_names_the_flag_of_a_bad_option(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        FedConfig(**kwargs)


def test_a_queue_temperature_of_zero_is_refused_by_the_loss() -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        info_nce(Q, KEY, NEG, T, queue_temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        InfoNCELoss(T, queue_temperature=-1.0)
    module = InfoNCELoss(T, reduction="none", queue_temperature=0.9)
    torch.testing.assert_close(module(Q, KEY, NEG), info_nce(Q, KEY, NEG, T, queue_temperature=0.9))
    assert "queue_temperature=0.9" in repr(module)


# -- through the trainer, under DP-SGD -------------------------------------------------


class FixedRows:
    """A negative source with fixed rows (what GlobalNegatives serves)."""

    exclude_own = True

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def negatives(self, step: int, device: torch.device) -> torch.Tensor:
        return self.rows.to(device)

    def observe(self, keys: torch.Tensor) -> None:
        pass


DP_CFG = FedConfig(width=8, embedding_dim=16, in_batch=False, key_mode="frozen", dp=True,
                   noise_multiplier=1.0, device="cpu", batch_size=6)
DP_OPTIONS = {
    "hard": {"hard_negative_beta": 1.0},
    "hard, queue temperature": {"hard_negative_beta": 1.0, "queue_temperature": 1.0},
    "negative weight": {"negative_weight": 2.0},
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("cnn", in_channels=1, embedding_dim=16, norm="group", width=8)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _source() -> FixedRows:
    g = torch.Generator().manual_seed(4)
    return FixedRows(F.normalize(torch.randn(12, 16, generator=g), dim=1))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", DP_OPTIONS)
def test_opacus_per_example_gradients_equal_one_example_at_a_time(name: str) -> None:
    cfg = replace(DP_CFG, **DP_OPTIONS[name])
    n, source = 6, _source()
    model = _model()
    key = copy.deepcopy(model).requires_grad_(False)
    reference = copy.deepcopy(model)
    x = _images(n)
    g = torch.Generator().manual_seed(1)
    plain = ContrastiveTrainer(reference, cfg, device=CPU, key_model=key, sources=[source])
    v1, v2 = plain.augment(x, g), plain.augment(x, g)
    negatives, _ = plain._bank()
    expected = []
    for i in range(n):
        reference.zero_grad()
        plain.view_loss(v1[i : i + 1], v2[i : i + 1], negatives)[0].sum().backward()
        expected.append([p.grad.clone() for p in reference.parameters()])

    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1.0, num_examples=n, batch_size=n)
    private = ContrastiveTrainer(model, cfg, device=CPU, key_model=key, sources=[source], dp=dp)
    dp.backward(private.view_loss(v1, v2, negatives)[0].mean())
    for j, p in enumerate(model.parameters()):
        for i in range(n):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)
    dp.detach()


@pytest.mark.parametrize("name", DP_OPTIONS)
def test_a_dp_sgd_step_with_the_option_runs_and_clips(name: str) -> None:
    # No noise and a clipping norm below every example's gradient: one SGD step moves the
    # weights by lr / E times a sum of n vectors of norm C, so at most lr C n / E.
    cfg = replace(DP_CFG, **DP_OPTIONS[name])
    n, lr, clip = 6, 0.5, 1e-5
    model = _model()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip, num_examples=n, batch_size=n)
    trainer = ContrastiveTrainer(
        model, cfg, device=CPU, key_model=copy.deepcopy(model).requires_grad_(False),
        sources=[_source()], optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        generator=torch.Generator().manual_seed(5), dp=dp,
    )
    loss, used, had_rows = trainer.train_step(_images(n))
    dp.detach()
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert math.isfinite(loss) and used == 12 and had_rows
    assert 0 < step.norm() <= lr * clip * n / dp.expected_batch_size * (1 + 1e-3)
