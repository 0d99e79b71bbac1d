"""The privacy benchmark's table: arms named from their settings, figures averaged over
seeds, and each arm's gain as a share of the default loss's gain over random init."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bench.privacy_bench import DEFAULT_ARM, QUEUE_ROWS, aggregate, arm_name, per_seed
from common.config import FedConfig
from simulations.commands import SWEEP_DEFAULTS
from simulations.privacy import negatives_label, run_settings

FIG = ("linear_probe_backbone", "knn_backbone", "retrieval_head", "uniformity_head")


def result(eps: float, negatives: str, axis: str, probe: float, sigma=(0.0, 0.0)) -> dict:
    return {"target_epsilon": eps, "epsilon": eps, "negatives": negatives, "axis": axis,
            "noise_multiplier": sigma, **dict.fromkeys(FIG, probe)}


def test_arms_are_named_from_their_settings():
    assert arm_name(result(math.inf, "in-batch + global", "default loss", 0.5)) == DEFAULT_ARM
    assert arm_name(result(8.0, "global + second moment", "budget", 0.5)) == \
        "epsilon 8, per-example, queue rows"
    assert arm_name(result(8.0, "second moment", "budget", 0.5)) == \
        "epsilon 8, per-example, no queue rows"
    assert arm_name(result(math.inf, "global + second moment", "budget", 0.5)) == \
        "no DP, per-example, queue rows"
    assert arm_name({**result(8.0, "second moment", "budget", 0.5), "negative_weight": 2.0}) == \
        "epsilon 8, per-example, no queue rows, negative weight 2"


def test_the_sweeps_runs_train_the_moment_objective_and_the_reference_the_default_loss():
    base = FedConfig(**SWEEP_DEFAULTS)
    private = run_settings(base, 8.0, 0.0)
    assert (private.objective, private.in_batch, private.dp) == ("moment", False, True)
    # No queue rows by default (they tied the runs without them under DP); the benchmark's
    # extra arm adds them.
    assert negatives_label(private) == "second moment"
    assert (private.global_negatives, private.push_fraction) == (0, 0.0)
    rows = run_settings(replace(base, **QUEUE_ROWS), 8.0, QUEUE_ROWS["push_noise"])
    assert negatives_label(rows) == "global + second moment"
    assert (rows.push_fraction, rows.push_noise) == (0.05, 24.0)
    reference = run_settings(base, math.inf, 0.0, default_loss=True)
    assert (reference.objective, reference.in_batch, reference.dp) == ("infonce", True, False)
    assert reference.temperature == FedConfig.temperature


def test_shares_are_of_the_default_losss_mean_gain_over_each_seeds_random_init():
    init = {0: dict.fromkeys(FIG, 0.40), 1: dict.fromkeys(FIG, 0.42)}
    runs = [(0, result(math.inf, "in-batch", "default loss", 0.50)),  # gain 0.10
            (1, result(math.inf, "in-batch", "default loss", 0.52)),  # gain 0.10
            (0, result(8.0, "second moment", "budget", 0.45, (1.1, 1.2))),  # gain 0.05
            (1, result(8.0, "second moment", "budget", 0.43, (1.0, 1.1)))]  # gain 0.01
    headers, rows, summary = aggregate(runs, init)
    table = {row[0]: dict(zip(headers, row, strict=True)) for row in rows}
    private = table["epsilon 8, per-example, no queue rows"]
    assert private["seeds"] == "0,1"
    assert private["linear probe"] == "0.4400 ± 0.0100"
    assert private["DP-SGD σ"] == "1-1.2"
    assert table[DEFAULT_ARM]["DP-SGD σ"] == "–"
    assert private["share of the default loss's gain (probe / kNN / retrieval)"] == "30% / 30% / 30%"
    assert table["random init"]["linear probe"] == "0.4100 ± 0.0100"
    assert summary["epsilon 8, per-example, no queue rows: knn_backbone gain"] == pytest.approx(0.03)
    # Every run's figures by seed stay in the JSON, for a paired comparison later.
    details = per_seed(runs, init)
    assert [(r["seed"], r["arm"], r["linear_probe_backbone"]) for r in details["per_seed"]] == [
        (0, DEFAULT_ARM, 0.50), (1, DEFAULT_ARM, 0.52), (0, "epsilon 8, per-example, no queue rows", 0.45),
        (1, "epsilon 8, per-example, no queue rows", 0.43)]
    assert details["random_init"] == init and details["pretrained_init"] is None


def test_with_a_pretrained_start_each_arm_reports_what_its_training_added_over_it():
    init = {0: dict.fromkeys(FIG, 0.40), 1: dict.fromkeys(FIG, 0.42)}
    start = {0: dict.fromkeys(FIG, 0.46), 1: dict.fromkeys(FIG, 0.46)}  # gains 0.06, 0.04
    runs = [(0, result(math.inf, "in-batch", "default loss", 0.50)),  # gain 0.10
            (1, result(math.inf, "in-batch", "default loss", 0.52)),  # gain 0.10
            (0, result(8.0, "second moment", "budget", 0.48)),  # +0.02 over its start
            (1, result(8.0, "second moment", "budget", 0.45))]  # -0.01 over its start
    headers, rows, summary = aggregate(runs, init, start)
    table = {row[0]: dict(zip(headers, row, strict=True)) for row in rows}
    over = "over the pretrained start (probe / kNN / retrieval)"
    pretrained = table["pretrained init (synthetic images, no data)"]
    assert pretrained["linear probe"] == "0.4600 ± 0.0000"
    assert pretrained["share of the default loss's gain (probe / kNN / retrieval)"] == "50% / 50% / 50%"
    assert pretrained[over] == table["random init"][over] == "–"
    private = table["epsilon 8, per-example, no queue rows"]
    assert private["share of the default loss's gain (probe / kNN / retrieval)"] == "55% / 55% / 55%"
    assert private[over] == "+0.005 / +0.005 / +0.005"
    assert table[DEFAULT_ARM][over] == "+0.050 / +0.050 / +0.050"
    assert summary["no DP, default loss (in-batch negatives): retrieval_head over the pretrained start"] \
        == pytest.approx(0.05)
    # Without a pretrained start the table has no such row or column.
    headers, rows, _ = aggregate(runs, init)
    assert over not in headers and len(rows) == 3


@pytest.mark.usefixtures("one_thread")
def test_sweeps_of_one_seed_share_the_pretrained_encoder_kept_where_they_are_told(tmp_path, monkeypatch):
    from common import synthetic
    from simulations.privacy import sweep
    from simulations.simulate import Simulation

    base = FedConfig(**{**SWEEP_DEFAULTS, "dataset": "digits", "width": 8, "embedding_dim": 16,
                        "batch_size": 32, "pretrain_epochs": 1, "pretrain_images": 64})
    shared = tmp_path / "seed0" / "pretrained"
    synthetic._PRETRAINED.clear()
    first = sweep(base, Simulation(num_clients=2), tmp_path / "seed0", epsilons=[],
                  push_noise=0.0, push_axis_epsilon=None, kept_in=None)
    (kept,) = shared.glob("pretrained-*.pt")
    # The queue arm's sweep (other negatives, its own output) reads that file: no pretraining.
    synthetic._PRETRAINED.clear()
    monkeypatch.setattr(synthetic, "dead_leaves", lambda *a, **k: pytest.fail("pretrained again"))
    second = sweep(replace(base, **QUEUE_ROWS), Simulation(num_clients=2), tmp_path / "seed0-queue",
                   epsilons=[], push_noise=QUEUE_ROWS["push_noise"], push_axis_epsilon=None,
                   kept_in=None, pretrained_dir=shared)
    assert second["pretrained_init"] == first["pretrained_init"]
    assert not (tmp_path / "seed0-queue" / "pretrained").exists()
    assert list(shared.iterdir()) == [kept]


def test_a_setting_out_of_range_is_refused_in_one_line_before_anything_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.privacy_bench", "--data", "digits",
                           "--pretrain-epochs", "-1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "--pretrain-epochs must be zero or more (got -1)"
    assert "Traceback" not in done.stderr and not done.stdout


@pytest.mark.parametrize(("weights", "message"), [
    ("1,0.5", "--negative-weight must be a finite number >= 1 (got 0.5)"),
    ("1,two", "--negative-weights must be numbers separated by commas (got '1,two')"),
])
def test_negative_weights_out_of_range_are_refused_before_anything_runs(weights, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.privacy_bench", "--data", "digits",
                           "--negative-weights", weights], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr.strip(), done.stdout) == (1, message, "")
