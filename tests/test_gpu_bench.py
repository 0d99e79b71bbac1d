"""The prepared GPU script runs end to end on the CPU at tiny sizes: every method's rounds
in one process (fedcontrast through the real queue service), evaluated, written."""

from __future__ import annotations

import json
import sys

import pytest

import bench.common
from bench import gpu_bench


@pytest.mark.timeout(300)
def test_the_gpu_script_runs_every_method_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "gpu_bench", "--data", "digits", "--train", "200", "--test", "100", "--clients", "2",
        "--rounds", "2", "--encoder", "cnn", "--width", "4", "--batch-size", "32",
        "--device", "cpu", "--name", "tiny"])
    gpu_bench.main()
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert [row[0] for row in record["rows"]] == ["fedavg", "fedcontrast", "fedema"]
    assert all(row[1] == 2 for row in record["rows"])  # both rounds ran within the budget
    assert record["summary"] == {"device": "cpu", "clients": 2, "train_images": 200}


def test_a_spent_budget_stops_a_method_after_its_current_round(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "gpu_bench", "--data", "digits", "--train", "100", "--test", "60", "--clients", "2",
        "--rounds", "3", "--encoder", "cnn", "--width", "4", "--batch-size", "32",
        "--device", "cpu", "--methods", "fedavg", "--budget-s", "0", "--name", "spent"])
    gpu_bench.main()
    (row,) = json.loads((tmp_path / "spent.json").read_text())["rows"]
    assert row[1] == 1
