"""The privacy accountant: Opacus's RDP over DP-SGD steps and push releases, and calibration."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.accounting import (
    NoiseCalibration,
    PrivacyAccountant,
    PrivacyPlan,
    Release,
    calibrate_noise_multiplier,
)

DELTA = 1e-5


def plan(**overrides) -> PrivacyPlan:
    values = dict(rounds=5, steps_per_round=8, sample_rate=0.125, push_rate=0.2, push_noise=4.0,
                  delta=DELTA, target_epsilon=3.0)
    values.update(overrides)
    return PrivacyPlan(**values)


@pytest.fixture(scope="module")
def base_sigma() -> float:
    """The noise calibrated for :func:`plan` (calibration takes seconds: done once)."""
    return calibrate_noise_multiplier(plan())


def test_epsilon_equals_opacus_for_the_same_steps_and_push_releases():
    ours = PrivacyAccountant()
    independent = RDPAccountant()
    for _round in range(3):
        ours.record_steps(noise_multiplier=1.1, sample_rate=0.1, steps=10)
        for _ in range(10):
            independent.step(noise_multiplier=1.1, sample_rate=0.1)
        ours.record_push(push_noise=3.0, sample_rate=0.2)
        independent.step(noise_multiplier=3.0 / 2, sample_rate=0.2)  # a unit row moves by <= 2
    assert ours.epsilon(DELTA) == pytest.approx(independent.get_epsilon(DELTA), rel=1e-12)
    assert len(ours) == 2  # one entry per mechanism, with its step count
    assert {(r.kind, r.steps) for r in ours.history} == {("dp-sgd", 30), ("push", 3)}


def test_push_releases_add_to_the_epsilon_of_dp_sgd():
    sgd_only = PrivacyAccountant()
    sgd_only.record_steps(1.0, 0.1, 20)
    with_pushes = sgd_only.copy()
    with_pushes.record_push(push_noise=2.0, sample_rate=0.5, rounds=2)
    assert with_pushes.epsilon(DELTA) > sgd_only.epsilon(DELTA) > 0
    assert PrivacyAccountant().epsilon(DELTA) == 0.0


def test_state_dict_survives_json_and_restores_the_same_epsilon():
    acc = PrivacyAccountant()
    acc.record_steps(0.9, 0.05, 40)
    acc.record_push(5.0, 0.2)
    restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    with pytest.raises(ValueError, match="format"):
        PrivacyAccountant.from_state_dict({"format": "something-else", "history": []})


def test_a_release_without_noise_is_refused():
    with pytest.raises(ValueError, match="positive, finite noise"):
        Release("dp-sgd", 0.0, 0.1, 1)
    with pytest.raises(ValueError, match="sample rate"):
        Release("push", 1.0, 1.5, 1)


def test_calibration_meets_the_target_over_the_whole_plan(base_sigma):
    p = plan()
    eps = p.accountant(base_sigma).epsilon(DELTA)
    assert 0.99 * p.target_epsilon <= eps <= p.target_epsilon


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_without_pushes_agrees_with_opacus():
    p = plan(push_rate=0.0, push_noise=0.0)
    ours = calibrate_noise_multiplier(p)
    theirs = get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=DELTA,
                                  sample_rate=p.sample_rate, steps=p.rounds * p.steps_per_round,
                                  accountant="rdp")
    assert ours == pytest.approx(theirs, rel=0.02)


def test_calibration_is_monotone_in_target_and_rounds(base_sigma):
    assert calibrate_noise_multiplier(plan(target_epsilon=6.0)) < base_sigma
    assert calibrate_noise_multiplier(plan(rounds=10)) > base_sigma


def test_calibration_counts_what_was_already_spent(base_sigma):
    spent = PrivacyAccountant()
    spent.record_steps(2.0, 0.125, 8)
    p = plan()
    sigma = calibrate_noise_multiplier(p, spent)
    assert sigma > base_sigma
    assert p.accountant(sigma, spent).epsilon(DELTA) <= p.target_epsilon


def test_pushes_alone_over_the_target_are_refused():
    with pytest.raises(ValueError, match="cannot be met.*push"):
        calibrate_noise_multiplier(plan(push_noise=0.5, push_rate=1.0, target_epsilon=1.0))


def test_a_calibration_holds_while_the_run_goes_on_as_planned():
    p = plan(rounds=5)
    cal = NoiseCalibration(p, first_round=1, noise_multiplier=1.3, last_round=2)
    assert cal.holds_for(plan(rounds=3), server_round=3)  # rounds 3..5 of the same run
    assert not cal.holds_for(plan(rounds=5), server_round=1)  # round numbering started again
    assert not cal.holds_for(plan(rounds=6), server_round=3)  # the run got longer
    assert not cal.holds_for(plan(rounds=3, target_epsilon=4.0), server_round=3)
    assert NoiseCalibration.from_dict(json.loads(json.dumps(cal.as_dict()))) == cal
