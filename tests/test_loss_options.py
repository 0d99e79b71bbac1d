"""The loss options for negatives: each against a direct, loop-based formula on tiny inputs,
the identity when off, per-example independence, validation, and use under DP-SGD."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from client.privacy import DPSGD
from client.trainer import ContrastiveTrainer, negative_options
from common.config import FedConfig, TrainConfig
from common.encoders import build_encoder
from common.loss import InfoNCELoss, NegativeOptions, info_nce, staleness_log_weights

N, K, D, T = 3, 5, 4, 0.5
CPU = torch.device("cpu")


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


Q, KEY, NEG = unit(N, D, seed=1), unit(N, D, seed=2), unit(K, D, seed=3)
AGES = torch.tensor([0, 1, 2, 1, 0])


def naive(q, k, neg, t, in_batch=False, log_w=None, mode="off", top_k=0, threshold=1.0,
          tau=0.0, beta=0.0, tq=None) -> list[float]:
    """The papers' formulas, one query at a time, with Python floats; queue rows at
    temperature ``tq`` (default ``t``)."""
    n, losses = len(q), []
    tq = t if tq is None else tq
    log_w = [0.0] * len(neg) if log_w is None else [float(v) for v in log_w]
    for i in range(n):
        p = float(q[i] @ k[i]) / t
        # (cosine, weight, temperature) of each negative of query i
        negs = [(float(q[i] @ neg[j]), math.exp(log_w[j]), tq) for j in range(len(neg))]
        if in_batch:
            negs += [(float(q[i] @ k[j]), 1.0, t) for j in range(n) if j != i]
            negs += [(float(q[i] @ q[j]), 1.0, t) for j in range(n) if j != i]
        suspects: set[int] = set()
        if mode != "off":
            candidates = [j for j in range(len(negs)) if threshold >= 1 or negs[j][0] > threshold]
            if top_k:
                candidates = sorted(candidates, key=lambda j: -negs[j][0])[:top_k]
            suspects = set(candidates)
        if mode == "drop":
            negs = [x for j, x in enumerate(negs) if j not in suspects]
        if tau > 0 or beta > 0:
            # Chuang et al. 2020's Ng with its clamp; Robinson et al. 2021: weights e^{beta s}
            m = len(negs)
            if m == 0:
                losses.append(0.0)
                continue
            imp = [math.exp(beta * c / tj) for c, _w, tj in negs]
            mean_imp = sum(imp) / m
            s_sum = sum(w * h / mean_imp * math.exp(c / tj) for (c, w, tj), h in zip(negs, imp, strict=True))
            w_sum = sum(w for _c, w, _t in negs)
            least = sum(w * math.exp(-1 / tj) for _c, w, tj in negs)
            ng = max((s_sum - tau * w_sum * math.exp(p)) / (1 - tau), least)
            losses.append(-math.log(math.exp(p) / (math.exp(p) + ng)))
            continue
        z = math.exp(p) + sum(w * math.exp(c / tj) for c, w, tj in negs)
        if mode == "positive":  # Huynh et al. 2022, attraction: mean over the positives
            terms = [math.log(math.exp(p) / z)]
            terms += [math.log(negs[j][1] * math.exp(negs[j][0] / negs[j][2]) / z) for j in suspects]
            losses.append(-sum(terms) / len(terms))
        else:
            losses.append(-math.log(math.exp(p) / z))
    return losses


def close(loss: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


# -- off is today's loss ---------------------------------------------------------------


@pytest.mark.parametrize("in_batch", [False, True])
def test_every_option_off_is_exactly_plain_info_nce(in_batch: bool) -> None:
    plain = info_nce(Q, KEY, NEG, T, in_batch=in_batch)
    off = NegativeOptions(false_negative_top_k=0, debias_tau_plus=0.0, hard_negative_beta=0.0)
    gamma_one = staleness_log_weights(AGES, 1.0)
    assert torch.equal(info_nce(Q, KEY, NEG, T, in_batch=in_batch, options=off), plain)
    assert torch.equal(
        info_nce(Q, KEY, NEG, T, in_batch=in_batch, negative_log_weights=gamma_one.double()),
        plain,
    )
    close(plain, naive(Q, KEY, NEG, T, in_batch))


def test_default_configs_turn_every_option_off() -> None:
    assert not negative_options(TrainConfig()).active
    assert FedConfig().staleness_gamma == 1.0 and FedConfig().pull_policy == "uniform"


# -- each option against its formula ---------------------------------------------------


@pytest.mark.parametrize("in_batch", [False, True])
def test_staleness_weighs_a_negative_of_age_a_by_gamma_to_the_a(in_batch: bool) -> None:
    log_w = staleness_log_weights(AGES, 0.5).double()
    torch.testing.assert_close(log_w, AGES.double() * math.log(0.5))
    close(info_nce(Q, KEY, NEG, T, in_batch=in_batch, negative_log_weights=log_w),
          naive(Q, KEY, NEG, T, in_batch, log_w=log_w))


FALSE_NEGATIVE_CASES = [
    {"top_k": 2},
    {"threshold": 0.0},
    {"top_k": 1, "threshold": -0.2},
]


@pytest.mark.parametrize("mode", ["drop", "positive"])
@pytest.mark.parametrize("select", FALSE_NEGATIVE_CASES)
@pytest.mark.parametrize("in_batch", [False, True])
def test_false_negative_cancellation_matches_huynh_et_al(mode: str, select: dict,
                                                         in_batch: bool) -> None:
    options = NegativeOptions(false_negative_mode=mode,
                              false_negative_top_k=select.get("top_k", 0),
                              false_negative_threshold=select.get("threshold", 1.0))
    log_w = staleness_log_weights(AGES, 0.7).double()
    close(info_nce(Q, KEY, NEG, T, in_batch=in_batch, options=options,
                   negative_log_weights=log_w),
          naive(Q, KEY, NEG, T, in_batch, log_w=log_w, mode=mode, **select))


@pytest.mark.parametrize("select", [{}, {"mode": "drop", "top_k": 2},
                                    {"mode": "positive", "threshold": 0.0},
                                    {"tau": 0.1, "beta": 1.0}, {"tau": 0.9}])
@pytest.mark.parametrize("in_batch", [False, True])
def test_a_queue_temperature_divides_the_queue_rows_alone(select: dict, in_batch: bool) -> None:
    tq = 1.3  # the positive and the batch's own negatives keep T
    options = NegativeOptions(false_negative_mode=select.get("mode", "off"),
                              false_negative_top_k=select.get("top_k", 0),
                              false_negative_threshold=select.get("threshold", 1.0),
                              debias_tau_plus=select.get("tau", 0.0),
                              hard_negative_beta=select.get("beta", 0.0))
    log_w = staleness_log_weights(AGES, 0.7).double()
    loss = info_nce(Q, KEY, NEG, T, in_batch=in_batch, options=options, negative_log_weights=log_w,
                    queue_temperature=tq)
    close(loss, naive(Q, KEY, NEG, T, in_batch, log_w=log_w, tq=tq, **select))
    assert not torch.allclose(loss, info_nce(Q, KEY, NEG, T, in_batch=in_batch, options=options,
                                             negative_log_weights=log_w))
    # T_q = T is the plain loss, bit for bit
    assert torch.equal(info_nce(Q, KEY, NEG, T, in_batch=in_batch, queue_temperature=T),
                       info_nce(Q, KEY, NEG, T, in_batch=in_batch))


def test_the_trainer_passes_the_queue_temperature_and_zero_means_the_temperature() -> None:
    source = _source()
    x = _images(6)

    def losses(cfg: FedConfig) -> torch.Tensor:
        trainer = ContrastiveTrainer(_model(), cfg, device=CPU, sources=[source])
        g = torch.Generator().manual_seed(1)
        v1, v2 = trainer.augment(x, g), trainer.augment(x, g)
        negatives, log_w, _ = trainer._bank()
        return trainer.view_loss(v1, v2, negatives, log_w)[0].detach()

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


def test_dropping_the_single_most_similar_negative_removes_exactly_it() -> None:
    options = NegativeOptions(false_negative_mode="drop", false_negative_top_k=1)
    sims = Q @ NEG.T  # N x K
    for i in range(N):
        keep = torch.ones(K, dtype=torch.bool)
        keep[sims[i].argmax()] = False
        expected = info_nce(Q[i : i + 1], KEY[i : i + 1], NEG[keep], T)
        torch.testing.assert_close(info_nce(Q, KEY, NEG, T, options=options)[i], expected[0])


@pytest.mark.parametrize(("tau", "beta"), [(0.1, 0.0), (0.3, 0.0), (0.0, 1.0), (0.1, 2.0)])
@pytest.mark.parametrize("in_batch", [False, True])
def test_debiased_and_hard_negatives_match_chuang_and_robinson(tau: float, beta: float,
                                                               in_batch: bool) -> None:
    options = NegativeOptions(debias_tau_plus=tau, hard_negative_beta=beta)
    close(info_nce(Q, KEY, NEG, T, in_batch=in_batch, options=options),
          naive(Q, KEY, NEG, T, in_batch, tau=tau, beta=beta))


def test_debiased_with_staleness_and_dropped_false_negatives() -> None:
    options = NegativeOptions(false_negative_mode="drop", false_negative_top_k=1,
                              debias_tau_plus=0.2, hard_negative_beta=0.5)
    log_w = staleness_log_weights(AGES, 0.5).double()
    close(info_nce(Q, KEY, NEG, T, options=options, negative_log_weights=log_w),
          naive(Q, KEY, NEG, T, log_w=log_w, mode="drop", top_k=1, tau=0.2, beta=0.5))


def test_debiased_sum_is_clamped_at_its_smallest_possible_value() -> None:
    # tau+ near 1 and a positive far more similar than every negative: the debiased sum
    # would be negative, so Ng = K e^{-1/T} (Chuang et al. 2020's clamp).
    q = unit(1, D, seed=4)
    k = q.clone()
    neg = -q.expand(K, D) + 0.3 * unit(K, D, seed=5)
    neg = F.normalize(neg, dim=1)
    loss = info_nce(q, k, neg, T, options=NegativeOptions(debias_tau_plus=0.9))
    p = 1 / T
    close(loss, [-math.log(math.exp(p) / (math.exp(p) + K * math.exp(-1 / T)))])


@pytest.mark.parametrize("options", [
    NegativeOptions(false_negative_mode="drop", false_negative_top_k=K),
    NegativeOptions(false_negative_mode="drop", false_negative_threshold=-1.0),
    NegativeOptions(false_negative_mode="drop", false_negative_top_k=K, debias_tau_plus=0.1),
    NegativeOptions(false_negative_mode="drop", false_negative_top_k=K, hard_negative_beta=1.0),
])
def test_a_query_left_without_negatives_has_loss_zero_and_finite_gradients(options) -> None:
    q = Q.clone().requires_grad_()
    loss = info_nce(q, KEY, NEG, T, options=options)
    (grad,) = torch.autograd.grad(loss.sum(), q)
    assert torch.equal(loss, torch.zeros(N, dtype=torch.float64))
    assert torch.isfinite(grad).all()


ALL_OPTIONS = {
    "staleness": (NegativeOptions(), 0.5),
    "drop top-k": (NegativeOptions(false_negative_mode="drop", false_negative_top_k=2), 1.0),
    "positive threshold": (NegativeOptions(false_negative_mode="positive",
                                           false_negative_threshold=0.0), 1.0),
    "debiased": (NegativeOptions(debias_tau_plus=0.1), 1.0),
    "hard": (NegativeOptions(hard_negative_beta=1.0), 1.0),
    "hard debiased drop stale": (NegativeOptions(false_negative_mode="drop",
                                                 false_negative_top_k=1, debias_tau_plus=0.1,
                                                 hard_negative_beta=1.0), 0.5),
}


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_finite_with_large_logits_at_temperature_0_01(name: str) -> None:
    options, gamma = ALL_OPTIONS[name]
    q = unit(16, 32, seed=1).float()
    k = F.normalize(q + 0.01 * unit(16, 32, seed=2).float(), dim=1)
    neg = torch.cat([unit(60, 32, seed=3).float(), q[:4]])
    ages = torch.arange(64) % 3
    q = q.clone().requires_grad_()
    loss = info_nce(q, k, neg, 0.01, options=options,
                    negative_log_weights=staleness_log_weights(ages, gamma))
    (grad,) = torch.autograd.grad(loss.sum(), q)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# -- per example -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_each_loss_depends_on_its_own_query_only(name: str) -> None:
    options, gamma = ALL_OPTIONS[name]
    log_w = staleness_log_weights(AGES, gamma).double()
    jac = jacobian(lambda query: info_nce(query, KEY, NEG, T, options=options,
                                          negative_log_weights=log_w), Q)  # N x N x D
    norms = jac.abs().sum(dim=2)
    assert torch.all(norms[~torch.eye(N, dtype=torch.bool)] == 0)
    assert torch.all(norms.diagonal() > 0)


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_perturbing_one_example_leaves_the_others_losses_unchanged(name: str) -> None:
    options, gamma = ALL_OPTIONS[name]
    log_w = staleness_log_weights(AGES, gamma).double()
    before = info_nce(Q, KEY, NEG, T, options=options, negative_log_weights=log_w)
    q, k = Q.clone(), KEY.clone()
    q[1], k[1] = unit(1, D, seed=9)[0], unit(1, D, seed=10)[0]
    after = info_nce(q, k, NEG, T, options=options, negative_log_weights=log_w)
    assert torch.equal(after[[0, 2]], before[[0, 2]]) and after[1] != before[1]


def test_the_loss_module_carries_the_options() -> None:
    options, gamma = ALL_OPTIONS["hard debiased drop stale"]
    log_w = staleness_log_weights(AGES, gamma).double()
    module = InfoNCELoss(T, reduction="none", options=options)
    torch.testing.assert_close(module(Q, KEY, NEG, log_w),
                               info_nce(Q, KEY, NEG, T, options=options, negative_log_weights=log_w))
    assert "hard_negative_beta=1.0" in repr(module)


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"false_negative_mode": "flip", "false_negative_top_k": 1}, "false_negative_mode"),
    ({"false_negative_mode": "drop", "false_negative_top_k": -1}, "top_k must be >= 0"),
    ({"false_negative_mode": "drop", "false_negative_threshold": 1.5}, r"\[-1, 1\]"),
    ({"false_negative_mode": "drop"}, "needs a mode"),
    ({"false_negative_top_k": 3}, "needs a mode"),
    ({"debias_tau_plus": 1.0}, r"\[0, 1\)"),
    ({"debias_tau_plus": -0.1}, r"\[0, 1\)"),
    ({"hard_negative_beta": -1.0}, ">= 0"),
    ({"false_negative_mode": "positive", "false_negative_top_k": 1, "debias_tau_plus": 0.1},
     "one positive"),
    ({"false_negative_mode": "positive", "false_negative_top_k": 1, "hard_negative_beta": 1.0},
     "one positive"),
])
def test_negative_options_refuse_bad_values_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NegativeOptions(**kwargs)


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"false_negative_mode": "drop"}, "--false-negative-mode needs suspects"),
    ({"false_negative_top_k": 2}, "--false-negative-top-k is set but"),
    ({"false_negative_threshold": 0.5}, "--false-negative-threshold is set but"),
    ({"false_negative_mode": "drop", "false_negative_top_k": -1}, "--false-negative-top-k must"),
    ({"false_negative_mode": "drop", "false_negative_threshold": -2.0},
     "--false-negative-threshold is a cosine"),
    ({"debias_tau_plus": 1.0}, "--debias-tau-plus must be in"),
    ({"hard_negative_beta": -0.5}, "--hard-negative-beta must"),
    ({"false_negative_mode": "positive", "false_negative_top_k": 1, "debias_tau_plus": 0.1},
     "--false-negative-mode 'positive'"),
    ({"staleness_gamma": 0.0}, r"--staleness-gamma must be in \(0, 1\]"),
    ({"staleness_gamma": 1.5}, r"--staleness-gamma must be in \(0, 1\]"),
    ({"staleness_gamma": 0.5, "global_negatives": 0}, "--global-negatives is 0"),
    ({"staleness_gamma": 0.5, "max_age": 0}, "--max-age 0"),
    ({"pull_policy": "oldest"}, "--pull-policy must be one of uniform, recent, stratified"),
    ({"pull_policy": "recent"}, "--pull-policy 'recent' takes the rows that arrived last"),
    ({"max_age": 0}, "--max-age 0 with --pull-mode reproducible and --push-timing after"),
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


def test_staleness_weights_and_loss_weights_are_validated() -> None:
    with pytest.raises(ValueError, match="gamma"):
        staleness_log_weights(AGES, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        staleness_log_weights(torch.tensor([1, -1]), 0.5)
    with pytest.raises(ValueError, match=r"\(5,\) finite"):
        info_nce(Q, KEY, NEG, T, negative_log_weights=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(5,\) finite"):
        info_nce(Q, KEY, NEG, T, negative_log_weights=torch.full((5,), -math.inf))


# -- through the trainer, under DP-SGD -------------------------------------------------


class AgedRows:
    """A negative source with fixed rows of known ages (what GlobalNegatives serves)."""

    exclude_own = True

    def __init__(self, rows: torch.Tensor, ages: torch.Tensor) -> None:
        self.rows, self._ages = rows, ages

    def negatives(self, step: int, device: torch.device) -> torch.Tensor:
        return self.rows.to(device)

    def ages(self) -> torch.Tensor:
        return self._ages

    def observe(self, keys: torch.Tensor) -> None:
        pass


DP_CFG = FedConfig(width=8, embedding_dim=16, in_batch=False, key_mode="frozen", dp=True,
                   noise_multiplier=1.0, device="cpu", batch_size=6)
DP_OPTIONS = {
    "staleness": {"staleness_gamma": 0.5},
    "drop top-k": {"false_negative_mode": "drop", "false_negative_top_k": 3},
    "positive threshold": {"false_negative_mode": "positive", "false_negative_threshold": 0.1},
    "debiased": {"debias_tau_plus": 0.1},
    "hard": {"hard_negative_beta": 1.0},
    "all but positive": {"staleness_gamma": 0.5, "false_negative_mode": "drop",
                         "false_negative_top_k": 2, "debias_tau_plus": 0.1,
                         "hard_negative_beta": 1.0},
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("cnn", in_channels=1, embedding_dim=16, norm="group", width=8)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _source() -> AgedRows:
    g = torch.Generator().manual_seed(4)
    return AgedRows(F.normalize(torch.randn(12, 16, generator=g), dim=1), torch.arange(12) % 3)


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
    negatives, log_w, _ = plain._bank()
    assert (log_w is not None) == (cfg.staleness_gamma < 1)
    expected = []
    for i in range(n):
        reference.zero_grad()
        plain.view_loss(v1[i : i + 1], v2[i : i + 1], negatives, log_w)[0].sum().backward()
        expected.append([p.grad.clone() for p in reference.parameters()])

    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1.0, num_examples=n, batch_size=n)
    private = ContrastiveTrainer(model, cfg, device=CPU, key_model=key, sources=[source], dp=dp)
    dp.backward(private.view_loss(v1, v2, negatives, log_w)[0].mean())
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
