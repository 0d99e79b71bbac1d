"""The learning-curve benchmark runs end to end at tiny sizes: both methods at every
point, evaluated on the same images, written with a plot, and reused when run again."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import pytest

import bench.common
from bench import learning_curve_bench


def test_a_point_is_images_times_passes():
    assert learning_curve_bench.parse_point("40000x4") == (40000, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="IMAGESxPASSES"):
        learning_curve_bench.parse_point("40000")
    with pytest.raises(argparse.ArgumentTypeError, match="at least"):
        learning_curve_bench.parse_point("100x0")


@pytest.mark.timeout(300)
def test_the_curve_runs_every_point_and_reuses_finished_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(learning_curve_bench, "RESULTS_DIR", tmp_path)
    argv = ["learning_curve_bench", "--data", "digits", "--test", "100", "--widths", "4",
            "--points", "200x1", "300x2", "--clients", "2", "--out", str(tmp_path / "points"),
            "--name", "tiny"]
    monkeypatch.setattr(sys, "argv", argv)
    learning_curve_bench.main()
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert [(r[0], r[2], r[3]) for r in record["rows"]] == [
        ("centralized", "200 x 1", 200), ("fedavg", "200 x 1", 200),
        ("centralized", "300 x 2", 600), ("fedavg", "300 x 2", 600)]
    assert set(record["summary"]["random_init"]) == {"4"}
    assert (tmp_path / "tiny.png").stat().st_size > 0
    assert len(list((tmp_path / "points").glob("*.json"))) == 4
    capsys.readouterr()
    learning_curve_bench.main()  # every point reused: nothing trains, nothing printed per point
    assert "width   4 " not in capsys.readouterr().out
    assert json.loads((tmp_path / "tiny.json").read_text())["rows"] == record["rows"]
    monkeypatch.setattr(sys, "argv", [*argv, "--alpha", "0.3", "--points", "200x1"])
    learning_curve_bench.main()  # other settings: the point trains again
    assert "kept with other settings" in capsys.readouterr().out
    assert not logging.root.manager.disable  # logging is left as it was found
