"""The simulation harness: scenarios, settings precedence, `fedcontrast simulate` and `compare`.

The end-to-end tests start real Flower simulations (a SuperLink with --simulation, Ray
actors, the real queue service on loopback); Ray's start-up costs 15-40 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.state import StateDir
from common.cli import UsageError
from common.config import FedConfig, read_config_values
from common.datasets import DatasetError, load_dataset
from common.flower_env import ProcessTree
from simulations.scenario import load_scenario, scenario_names
from simulations.simulate import Simulation, _add_arguments, resolve

FEDCONTRAST = str(Path(sys.executable).parent / "fedcontrast")
TINY = ["--width", "8", "--embedding-dim", "16", "--batch-size", "32", "--global-negatives", "64",
        "--queue-capacity", "512", "--device", "cpu", "--local-epochs", "1", "--num-clients", "3",
        "--round-timeout", "120"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    return parser.parse_args(list(argv))


def test_shipped_scenarios_load_and_name_real_settings():
    names = scenario_names()
    assert {"iid", "dirichlet-0.5", "dirichlet-0.1", "cross-device-100"} <= set(names)
    for name in names:
        scenario = load_scenario(name)
        FedConfig(**scenario.settings)  # every key is a setting with a valid value
        Simulation(**scenario.simulation)
        assert scenario.description


def test_scenario_errors_name_the_culprit(tmp_path):
    with pytest.raises(UsageError, match="unknown scenario 'nope'"):
        load_scenario("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('[settings]\nbatch-sise = 3\n')
    with pytest.raises(UsageError, match=r"unknown settings \['batch-sise'\]"):
        load_scenario(bad)
    bad.write_text('[simulation]\nclients = 3\n')
    with pytest.raises(UsageError, match=r"unknown \[simulation\] keys \['clients'\]"):
        load_scenario(bad)
    bad.write_text('[settings\n')
    with pytest.raises(UsageError, match="not valid TOML"):
        load_scenario(bad)


def test_flags_override_scenario_which_overrides_defaults():
    cfg, sim = resolve(parse("--scenario", "cross-device-100"))
    assert (sim.num_clients, cfg.fraction_train, cfg.partitioner, cfg.rounds) == (100, 0.1, "dirichlet", 10)
    cfg, sim = resolve(parse("--scenario", "cross-device-100", "--num-clients", "20",
                             "--fraction-train", "0.5", "--rounds", "3"))
    assert (sim.num_clients, cfg.fraction_train, cfg.rounds, cfg.dirichlet_alpha) == (20, 0.5, 3, 0.5)


def test_simulation_refuses_what_would_hang_or_mislead():
    with pytest.raises(UsageError, match="--num-clients must be at least 1"):
        Simulation(num_clients=0)
    with pytest.raises(UsageError, match=r"share of one GPU in \[0, 1\]"):
        Simulation(client_gpus=1.5)
    with pytest.raises(UsageError, match="can never be met"):
        Simulation(num_clients=10).check_resources(FedConfig(fraction_train=0.1, min_nodes=2))
    with pytest.raises(UsageError, match="exceeds this machine"):
        Simulation(client_cpus=10_000).check_resources(FedConfig())
    assert Simulation(4, 1, 0.25).federation_config() == (
        "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.25")


def test_synthetic_dataset_is_deterministic_and_checked():
    a, b = load_dataset("synthetic:100", seed=3), load_dataset("synthetic:100", seed=3)
    assert a.x_train.shape == (100, 1, 8, 8) and a.x_test.shape == (20, 1, 8, 8)
    assert bool((a.x_train == b.x_train).all()) and a.num_classes == 10
    assert not bool((load_dataset("synthetic:100", seed=4).x_train == a.x_train).all())
    with pytest.raises(DatasetError, match="synthetic:N"):
        load_dataset("synthetic:ten")


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    log = cwd / f"{cmd[1]}-{len(list(cwd.glob('*.log')))}.log"
    with ProcessTree() as tree:
        proc = tree.start(cmd, log=log, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -1
    return rc, log.read_text(errors="replace")


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_simulate_then_resume(tmp_path):
    run = tmp_path / "sim"
    rc, log = _run([FEDCONTRAST, "simulate", "--out", str(run), "--rounds", "2", *TINY], tmp_path, 200)
    assert rc == 0, log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["replied"]) for r in rows] == [(1, 3), (2, 3)]
    assert rows[1]["global_hits"] > 0 and rows[0]["pushed_rows"] > 0  # the real queue served them
    assert "round 2/2" in log and "retrieval_head" in log  # progress, then trained vs random init
    assert json.loads((run / "simulation.json").read_text())["num_clients"] == 3
    states = sorted((run / "flower-home" / "fedcontrast" / "clients").iterdir())
    assert [s.name for s in states] == ["partition-0", "partition-1", "partition-2"]

    rc, log = _run([FEDCONTRAST, "simulate", "--resume", str(run), "--rounds", "3"], tmp_path, 200)
    assert rc == 0, log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for state in states:  # client state carried on across the resume
        assert StateDir(state, state.name).load().rounds_trained == 3


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_compare_runs_every_method_on_one_budget(tmp_path):
    out = tmp_path / "cmp"
    rc, log = _run([FEDCONTRAST, "compare", "--out", str(out), "--rounds", "2", "--eval-every", "1",
                    *TINY], tmp_path, 580)
    assert rc == 0, log
    report = json.loads((out / "compare.json").read_text())
    assert list(report["results"]) == ["local", "fedavg", "fedmoco", "fedcontrast", "centralized"]
    for method, runs in report["results"].items():
        for key in ("linear_probe_backbone", "knn_backbone", "alignment_head", "uniformity_head",
                    "wall_time_s"):
            assert 0.0 <= runs[0][key] or key == "uniformity_head", (method, key)
    assert report["results"]["local"][0]["clients_averaged"] == 3
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 6 and "| fedmoco |" in table  # random init + 5 methods
    assert (out / "compare.png").stat().st_size > 0
    assert read_config_values(out / "fedavg-seed0")[1]["global_negatives"] == 0
    assert read_config_values(out / "fedmoco-seed0")[1]["pull_scope"] == "own"
    own = [json.loads(x) for x in (out / "fedmoco-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert own[-1]["global_hits"] > 0  # pulls answered from the client's own rows
