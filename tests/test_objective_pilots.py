"""The per-example objective pilots run end to end at tiny sizes: every kind of arm trains,
a private arm is calibrated to its epsilon, finished arms are reused, bad names refused."""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest
import torch

import bench.common
from bench import objective_pilots as op
from common.synthetic import CACHE_ENV

TINY = ["--data", "digits", "--epochs", "1", "--batch-size", "64", "--width", "4",
        "--embedding-dim", "8", "--pretrain-epochs", "1", "--pretrain-images", "64"]


def test_an_arm_name_says_its_loss_weight_epsilon_and_start():
    arm = op.parse_arm("detneg_u2")
    assert arm.trainer is op.DetachedNegatives and arm.weight == 2.0 and arm.epsilon is None
    arm = op.parse_arm("mix64_u3_ri")
    assert arm.trainer is op.RunningMixture and arm.attrs == {"clusters": 64}
    assert op.parse_arm("moment_u3_e1").epsilon == 1.0
    assert (arm.weight, arm.epsilon, arm.random_init) == (3.0, None, True)
    assert op.parse_arm("t0.5").settings == {"temperature": 0.5}
    assert op.parse_arm("fifo512").attrs == {"size": 512}
    assert op.parse_arm("detneg-noise0.3_u2").attrs == {"noise": 0.3}
    for bad, reason in (("nonsense", "unknown arm"), ("t", "unknown arm"),
                        ("moment_u0.5", "L >= 1"), ("default_e8", "per example"),
                        ("detneg_e8", "per example"), ("mix16_e8", "per example"),
                        ("default_u2", "in-batch")):
        with pytest.raises(argparse.ArgumentTypeError, match=reason):
            op.parse_arm(bad)


def test_the_logit_dp_sensitivity_is_the_papers_bound():
    # S = 1/n + min(2 e^(2/T) / (n + e^(2/T) - 1), 2): about 2 at low temperatures, small at 1.
    assert op.logit_dp_sensitivity(256, 0.1) == pytest.approx(1 / 256 + 2)
    assert op.logit_dp_sensitivity(256, 1.0) == pytest.approx(
        1 / 256 + 2 * torch.e ** 2 / (256 + torch.e ** 2 - 1))


def test_a_share_is_of_the_references_gain_at_the_same_seeds():
    def run(seed, gain):
        return {"seed": seed, "privacy": {}, "trained": dict.fromkeys(op.KEYS, 0.5 + gain),
                "start": dict.fromkeys(op.KEYS, 0.5)}

    reference = [run(0, 0.02), run(1, 0.04)]
    assert op.shares([run(0, 0.01), run(1, 0.02)], reference) == pytest.approx([0.5] * 3)
    assert op.shares([run(2, 0.01)], reference) is None  # the reference lacks seed 2
    rows = op.table_rows({"a": [run(0, 0.01)], "ref": [run(0, -0.01)]}, "ref")
    assert rows[0][4] == "– / – / –"  # no share of a reference that lost


def test_the_weighted_loss_adds_the_negative_term_once_more():
    g = torch.Generator().manual_seed(0)
    q, k, neg = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
                 for n in (4, 4, 16))
    extra = torch.logsumexp(q @ neg.T / 0.2, dim=1)
    assert torch.allclose(op.nce(q, k, neg, 0.2, 2.0), op.nce(q, k, neg, 0.2) + extra)


@pytest.mark.timeout(400)
def test_every_kind_of_arm_runs_and_a_rerun_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(op, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    arms = ["default", "detneg-noise0.5_u2", "fifo64", "moment_e8", "logitdp1", "mix16",
            "batchmoment-ema", "synthetic_u2", "pred", "t0.5_ri"]  # every trainer class
    argv = [*TINY, "--arms", *arms, "--out", str(tmp_path / "out"), "--name", "tiny"]
    op.main(argv)
    record = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r[0]: r for r in record["rows"]}
    assert list(rows) == arms
    assert rows["default"][4] == "100% / 100% / 100%"  # the reference's share of itself
    assert (tmp_path / "tiny.png").stat().st_size > 0
    per_seed = record["details"]["per_seed"]  # in the JSON only, for paired comparisons
    assert list(per_seed) == arms and all(len(runs) == 1 for runs in per_seed.values())
    assert "per_seed" not in (tmp_path / "tiny.md").read_text()
    kept = {a: json.loads((tmp_path / "out" / "runs" / f"{a}_s0.json").read_text()) for a in arms}
    private = kept["moment_e8"]["privacy"]
    assert 7.9 <= private["epsilon"] <= 8.0 and private["sgd_noise"] > private["joint_noise"] > 0
    assert float(rows["moment_e8"][5]) == pytest.approx(private["sgd_noise"], abs=1e-3)
    assert all(not kept[a]["privacy"] for a in arms if a != "moment_e8")
    for a in arms:
        for figures in (kept[a]["trained"], kept[a]["start"]):
            assert set(figures) == set(op.KEYS) and all(map(isinstance, figures.values(),
                                                            [float] * 4))
    # The random-init arm starts where no pretraining was done: its own start.
    assert kept["t0.5_ri"]["start"] != kept["default"]["start"]
    assert kept["default"]["start"] == kept["moment_e8"]["start"]  # one pretraining per seed
    assert len(list((tmp_path / "out" / "pretrained").glob("*.pt"))) == 1
    capsys.readouterr()
    op.main(argv)  # every arm reused: nothing trains, nothing printed per arm
    assert "seed 0:" not in capsys.readouterr().out
    assert json.loads((tmp_path / "tiny.json").read_text())["rows"] == record["rows"]
    op.main([*TINY, "--arms", "default", "--logit-dp-sigma", "2", "--out", str(tmp_path / "out"),
             "--name", "tiny"])  # other settings: trained again
    assert "kept with other settings" in capsys.readouterr().out
    assert not logging.root.manager.disable  # logging is left as it was found
    assert CACHE_ENV not in os.environ  # and so is the environment


def test_a_missing_data_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="benchmark data not found"):
        op.main(["--arms", "default", "--data", str(tmp_path / "none.npz"),
                 "--out", str(tmp_path / "out")])
