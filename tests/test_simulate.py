"""The simulation harness: scenarios, settings precedence, `fedcontrast simulate` and `compare`.

The end-to-end tests start real Flower simulations (a SuperLink with --simulation, Ray
actors, the real queue service on loopback); Ray's start-up costs 15-40 s each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client.state import StateDir
from common import key_state
from common.checkpoint import read_checkpoint
from common.config import FedConfig, read_config_values
from common.datasets import DatasetError, load_dataset
from common.errors import UsageError
from common.runtime.flower_env import ProcessTree
from server.sampling import seeded_sample
from simulations.commands import add_simulate_arguments as add_arguments
from simulations.compare import (
    _batches,
    client_batches,
    examples_per_round,
    paired_differences,
    round_batches,
)
from simulations.methods import SIMCLR, method_config
from simulations.privacy import SWEEP_DEFAULTS, parse_epsilon, run_settings
from simulations.scenario import load_scenario, scenario_names
from simulations.simulate import CLIENT_STATE, Simulation, resolve

FEDCONTRAST = str(Path(sys.executable).parent / "fedcontrast")
TINY = ["--width", "8", "--embedding-dim", "16", "--batch-size", "32", "--global-negatives", "64",
        "--queue-capacity", "512", "--device", "cpu", "--local-epochs", "1", "--num-clients", "3",
        "--round-timeout", "120"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
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
    with pytest.raises(UsageError, match="samples 1 of 3 clients"):  # Flower rounds down
        Simulation(num_clients=3).check_resources(FedConfig(fraction_train=0.5, min_nodes=2))
    Simulation(num_clients=3).check_resources(FedConfig(fraction_train=0.67, min_nodes=2))
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


def test_methods_differ_only_in_what_they_are_named_for():
    base = FedConfig(global_negatives=128, key_mode="ema", in_batch=False, push_fraction=0.3)
    assert method_config("fedcontrast", base) == base
    assert method_config("fedmoco", base) == replace(base, pull_scope="own")
    assert method_config("fedcontrast-key", base) == replace(base, key_sync="server")
    assert method_config("fedcontrast-key", FedConfig()).key_mode == "ema"
    for method in ("fedavg", "local", "centralized", "centralized-skewed"):  # SimCLR, in-batch only
        cfg = method_config(method, base)
        assert (cfg.global_negatives, cfg.push_fraction, cfg.in_batch, cfg.key_mode) == (
            0, 0.0, True, "shared")
        assert replace(cfg, **{k: getattr(base, k) for k in SIMCLR}) == base
    moment = replace(base, objective="moment", temperature=0.2)  # e.g. compare --objective moment
    assert method_config("fedavg", moment).objective == "infonce"
    assert method_config("fedbyol", moment).objective == "byol"
    with pytest.raises(UsageError, match="unknown method"):
        method_config("fedprox", base)


def test_client_batches_draw_every_batch_from_one_part_and_cover_each_pass():
    parts = [torch.arange(0, 10), torch.arange(10, 13), torch.arange(13, 14)]  # 14: alone, left out
    owner = {int(i): p for p, part in enumerate(parts) for i in part}
    batches = client_batches(parts, 4, torch.Generator().manual_seed(0))
    for _ in range(3):  # a pass: 10 -> 4 + 4 + 2, 3 -> 3
        drawn = [next(batches) for _ in range(4)]
        assert all(len({owner[int(i)] for i in b}) == 1 for b in drawn)
        assert sorted(int(i) for b in drawn for i in b) == list(range(13))
    with pytest.raises(ValueError, match="2 or more"):
        next(client_batches([torch.arange(1)], 4, torch.Generator()))


def test_one_part_batches_are_plain_shuffled_batches():
    # centralized keeps its random stream: one part is exactly the plain shuffled passes
    plain, parted = _batches(50, 8, torch.Generator().manual_seed(3)), client_batches(
        [torch.arange(50)], 8, torch.Generator().manual_seed(3))
    for _ in range(20):
        assert torch.equal(next(plain), next(parted))


def test_paired_differences_are_per_seed_against_fedavg_or_the_first_method():
    def runs(*lps: float) -> list[dict[str, float]]:
        return [{"linear_probe_backbone": lp, "knn_backbone": 2 * lp} for lp in lps]

    paired = paired_differences({"local": runs(0.1, 0.2), "fedavg": runs(0.3, 0.3),
                                 "fedcontrast": runs(0.35, 0.25)})
    assert paired["reference"] == "fedavg" and list(paired["methods"]) == ["local", "fedcontrast"]
    lp, knn = (paired["methods"]["fedcontrast"][k] for k in ("linear_probe_backbone", "knn_backbone"))
    assert lp["per_seed"] == pytest.approx([0.05, -0.05]) and lp["seeds_above"] == 1
    assert lp["mean"] == pytest.approx(0.0) and knn["per_seed"] == pytest.approx([0.1, -0.1])
    assert paired_differences({"local": runs(0.1), "centralized": runs(0.4)})["reference"] == "local"
    assert paired_differences({"fedavg": runs(0.1)}) is None


def test_in_process_methods_get_the_federated_sample_epoch_budget():
    cfg = FedConfig(rounds=4, local_epochs=3, fraction_train=0.5, batch_size=10)
    sim = Simulation(num_clients=3)
    assert sim.sampled(cfg) == 1  # Flower samples int(3 x 0.5) clients, not 1.5
    assert examples_per_round(cfg, 100, sim.sampled(cfg) / 3) == pytest.approx(100.0)
    # Skewed batches (cut per part: short last batches) are counted by their real size,
    # so over the rounds the examples trained match the budget, not the steps.
    parts = [torch.arange(0, 25), torch.arange(25, 32), torch.arange(32, 100)]
    rounds = round_batches(client_batches(parts, 10, torch.Generator().manual_seed(0)), 100.0)
    sizes = [[len(b) for b in next(rounds)] for _ in range(6)]
    assert all(sum(r) >= 100 - 10 for r in sizes)
    assert 600 <= sum(map(sum, sizes)) < 600 + 10  # overshoot carried, never accumulated
    assert math.ceil(100 / 10) < sum(map(len, sizes)) / 6  # more steps than full batches need
    # One part (centralized): whole passes, 2 x 5 batches of 300 examples per round.
    one = round_batches(_batches(300, 64, torch.Generator().manual_seed(0)), 600.0)
    assert [sum(len(b) for b in next(one)) for _ in range(3)] == [600, 600, 600]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_compare_writes_the_table_then_a_federated_method_resumes(tmp_path):
    # fedavg and fedcontrast run through the same simulate() path as fedmoco (above: only
    # their settings differ); one federated method keeps the suite's Ray start-ups few.
    out = tmp_path / "cmp"
    # Two of the three clients per round: the engine samples, the in-process methods get
    # the same fraction of sample-epochs.
    rc, log = _run([FEDCONTRAST, "compare", "--out", str(out), "--rounds", "2", "--eval-every", "1",
                    "--methods", "local,fedmoco,fedcontrast-key,centralized,centralized-skewed",
                    "--fraction-train", "0.67", *TINY], tmp_path, 850)
    assert rc == 0, log
    report = json.loads((out / "compare.json").read_text())
    assert list(report["results"]) == ["local", "fedmoco", "fedcontrast-key", "centralized",
                                       "centralized-skewed"]
    for method, runs in report["results"].items():
        for key in ("linear_probe_backbone", "knn_backbone", "retrieval_head", "alignment_head",
                    "wall_time_s"):
            assert runs[0][key] >= 0.0, (method, key)
        assert runs[0]["uniformity_head"] <= 0.0
    assert report["results"]["local"][0]["clients_averaged"] == 3
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 6 + 5 and "| centralized-skewed |" in table  # random init,
    # 5 methods, then 4 against the first, local, seed by seed (stdout names them too)
    paired = report["paired"]
    assert paired["reference"] == "local" and list(paired["methods"]) == [
        "fedmoco", "fedcontrast-key", "centralized", "centralized-skewed"]
    lp = "linear_probe_backbone"
    assert paired["methods"]["fedmoco"][lp]["per_seed"] == [
        report["results"]["fedmoco"][0][lp] - report["results"]["local"][0][lp]]
    assert "Against local, seed by seed" in table and "fedmoco - local: linear probe" in log
    assert (out / "compare.png").stat().st_size > 0
    assert read_config_values(out / "fedmoco-seed0")[1]["pull_scope"] == "own"
    # fedcontrast-key: fedmoco's traffic plus one key encoder, kept in its checkpoint
    assert {k: read_config_values(out / "fedcontrast-key-seed0")[1][k]
            for k in ("key_mode", "key_sync")} == {"key_mode": "ema", "key_sync": "server"}
    checkpoint = read_checkpoint(out / "fedcontrast-key-seed0")
    key = checkpoint["key_state"]
    assert list(key) == [key_state.PREFIX + k for k in checkpoint["state_dict"]]
    assert any(not torch.equal(key[key_state.PREFIX + k], v) for k, v in checkpoint["state_dict"].items()
               if v.is_floating_point())  # a slower encoder than the weights
    mb = {m: report["results"][m][0]["mb_sent_per_client_round"] for m in ("fedmoco", "fedcontrast-key")}
    key_mb = sum(t.numel() * t.element_size() for t in key.values()) / 1e6
    assert mb["fedcontrast-key"] - mb["fedmoco"] == pytest.approx(key_mb, rel=1e-6)
    run = out / "fedmoco-seed0"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["counted"], r["sampled"], r["replied"]) for r in rows] == [
        (1, 1, 2, 2), (2, 1, 2, 2)]
    assert rows[0]["pushed_rows"] > 0 and rows[1]["global_hits"] > 0  # own rows, from the real queue
    budget = report["budget"]  # what the engine trained: 2 of 3 clients, not 0.67 of them
    assert (budget["clients_per_round"], budget["sample_epochs"]) == (2, pytest.approx(2 * 2 / 3))

    # The virtual clients a round trained are the seed's draw over their client ids (so
    # every method of a comparison trains the same ones), and each client's state counts
    # the rounds it was drawn in.
    clients = ["partition-0", "partition-1", "partition-2"]
    drawn = [sorted(seeded_sample(clients, 2, 0, rnd)) for rnd in (1, 2, 3)]
    assert [r["sampled_clients"].split() for r in rows] == drawn[:2]

    def rounds_trained() -> dict[str, int]:
        return {s.name: StateDir(s, s.name).load().rounds_trained
                for s in sorted((run / CLIENT_STATE).iterdir())}

    assert rounds_trained() == {c: n for c in clients if (n := sum(c in d for d in drawn[:2]))}
    # A federated method's run directory is an ordinary simulation: resume it.
    rc, log = _run([FEDCONTRAST, "simulate", "--resume", str(run), "--rounds", "3"], tmp_path, 240)
    assert rc == 0, log
    assert "round 3/3" in log and "retrieval_head" in log  # progress, then trained vs random init
    assert "change" in log  # the end-of-run table: what training changed
    summary = json.loads((run / "summary.json").read_text())
    # the initial encoder, measured as the final one is: the level training has to beat
    assert set(summary["random_init"]) == set(summary["final_eval"]) and summary["final_eval"]
    assert summary["random_init"] != summary["final_eval"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["counted"], r["sampled"], r["replied"]) for r in rows][-1] == (3, 1, 2, 2)
    assert json.loads((run / "simulation.json").read_text())["num_clients"] == 3
    # Client state carried on across the resume, and round 3 drew as a fresh run would:
    # were the state reset, a client drawn before would count 1 instead of its total.
    assert rows[-1]["sampled_clients"].split() == drawn[2]
    assert rounds_trained() == {c: n for c in clients if (n := sum(c in d for d in drawn))}


def test_privacy_sweep_settings_keep_the_federation_and_change_only_privacy():
    base = resolve(parse_privacy(), defaults=SWEEP_DEFAULTS)[0]
    private, reference = run_settings(base, 4.0, 4.0), run_settings(base, math.inf, 4.0)
    assert (private.dp, private.target_epsilon, private.push_noise) == (True, 4.0, 4.0)
    assert (reference.dp, reference.push_noise, reference.target_epsilon) == (False, 0.0, 0.0)
    for cfg in (private, reference):  # the same per-example loss in every run
        assert (cfg.in_batch, cfg.queue_size, cfg.key_mode) == (False, 0, "ema")
        assert (cfg.rounds, cfg.dataset, cfg.global_negatives) == (base.rounds, base.dataset,
                                                                    base.global_negatives)
    default = run_settings(base, math.inf, 0.0, default_loss=True)  # what simulate trains
    assert (default.dp, default.in_batch, default.key_mode) == (False, True, "shared")
    assert (default.rounds, default.global_negatives) == (base.rounds, base.global_negatives)
    with pytest.raises(ValueError, match="not per-example"):
        run_settings(base, 8.0, 4.0, default_loss=True)
    with pytest.raises(ValueError, match="positive or inf"):
        parse_epsilon("0")


def parse_privacy(*argv: str) -> argparse.Namespace:
    from simulations.commands import add_privacy_arguments as add_privacy

    parser = argparse.ArgumentParser()
    add_privacy(parser)
    return parser.parse_args(list(argv))


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_privacy_sweep_reports_epsilon_monotone_in_the_noise(tmp_path):
    out = tmp_path / "priv"
    command = [FEDCONTRAST, "privacy", "--out", str(out), "--epsilons", "2,8",
               "--push-axis-epsilon", "8", "--push-fraction", "0.05", "--push-noise", "24",
               "--rounds", "2", "--pretrain-epochs", "2", "--pretrain-images", "256", *TINY]
    rc, log = _run(command, tmp_path, 880)
    assert rc == 0, log
    results = json.loads((out / "privacy.json").read_text())["results"]
    budget = {r["target_epsilon"]: r for r in results if r["axis"] == "budget"}
    low, high = budget[2.0], budget[8.0]
    assert 0 < low["epsilon"] <= 2.0 and 0 < high["epsilon"] <= 8.0
    assert low["epsilon"] < high["epsilon"]
    assert min(low["noise_multiplier"]) > max(high["noise_multiplier"])  # more noise, less epsilon
    assert low["pushes_private"] and high["pushes_private"]
    unnoised = [r for r in results if r["axis"] == "push axis" and r["push_noise"] == 0]
    assert len(unnoised) == 1 and not unnoised[0]["pushes_private"]
    # Its epsilon counts DP-SGD only (pushes not covered), derived for the same target. Not
    # compared with the noised run's: at epsilon 8 over 2 rounds the pushes with noise 24
    # cost under 0.01%, less than the calibration's tolerance.
    assert 0.99 * 8.0 <= unnoised[0]["epsilon"] <= 8.0
    table = (out / "privacy.md").read_text()
    assert "| NO |" in table and "not covered" in table
    assert "| random init | – |" in table  # the untrained reference the accuracies stand against
    default = [r for r in results if r["axis"] == "default loss"]  # on by default
    assert len(default) == 1 and math.isinf(default[0]["epsilon"])
    assert default[0]["negatives"] == "in-batch + global" and "| in-batch + global |" in table
    assert all(r["negatives"] == "global + second moment" for r in results
               if r["axis"] != "default loss")
    assert all(0.0 <= r["retrieval_head"] <= 1.0 for r in results)
    report = json.loads((out / "privacy.json").read_text())
    init = report["random_init"]
    assert 0.0 <= init["linear_probe_backbone"] <= 1.0
    # Every run started from the encoder pretrained on synthetic images: each ServerApp
    # pretrained it in its own process and measured it as the sweep did in its own (the
    # same weights; a kNN vote may differ by float rounding between processes' threads).
    pretrained = report["pretrained_init"]
    assert "| pretrained init (synthetic images) | – |" in table
    assert abs(pretrained["uniformity_head"] - init["uniformity_head"]) > 0.1
    assert len(list((out / "pretrained").glob("pretrained-*.pt"))) == 1  # pretrained once
    for run in out.glob("eps-*"):
        assert "pretrained encoder read from" in (run / "server.log").read_text(), run
        summary = json.loads((run / "summary.json").read_text())
        assert summary["pretrained_init"] == pytest.approx(
            {k: v for k, v in pretrained.items() if k in summary["pretrained_init"]},
            abs=0.01), run
    assert (out / "privacy.png").stat().st_size > 0
    for r in results:  # accuracies are reported, not asserted
        assert 0.0 <= r["linear_probe_backbone"] <= 1.0 and 0.0 <= r["knn_backbone"] <= 1.0
    # The same command again reuses every finished run (no simulation starts): same figures.
    logs = {p: p.read_bytes() for p in out.glob("*/server.log")}
    rc, log = _run(command, tmp_path, 240)
    assert rc == 0, log
    assert log.count("finished before") == len(results) == len(logs) == 4
    assert {p: p.read_bytes() for p in out.glob("*/server.log")} == logs
    rerun = json.loads((out / "privacy.json").read_text())["results"]
    assert [{k: v for k, v in r.items() if k != "reused"} for r in rerun] == results
    assert all(r["reused"] for r in rerun) and "Reused from an earlier command" in (
        out / "privacy.md").read_text()
    # Without 8 among --epsilons the epsilon-8 run with noised pushes belongs to the push
    # axis alone: the same run, reused.
    rc, log = _run([*command[:5], "2", *command[6:]], tmp_path, 240)
    assert rc == 0 and log.count("finished before") == 4, log
    axes = {r["run_dir"]: r["axis"] for r in json.loads((out / "privacy.json").read_text())["results"]}
    assert axes[high["run_dir"]] == "push axis"


RAY_START_TIMEOUT = """\
Successfully started run 42
ERROR :     An exception occured!! Timed out waiting for file /tmp/ray/session_x/gcs_server_port_ab
ERROR :     Traceback (most recent call last):
  File "/x/flwr/server/superlink/fleet/vce/backend/raybackend.py", line 119, in init_ray
    ray.init(
  File "python/ray/_raylet.pyx", line 428, in ray._raylet.wait_for_persisted_port
RuntimeError: Timed out waiting for file /tmp/ray/session_x/gcs_server_port_ab

ERROR :     An exception occurred !! Simulation Runtime crashed.
"""

CLIENT_APP_FAILED = """\
Successfully started run 43
  File "/x/client/app.py", line 80, in train
ValueError: bad batch
ERROR :     An exception occurred !! Simulation Runtime crashed.
"""


def test_only_a_failed_engine_start_is_retried(tmp_path):
    from server.deploy import first_error
    from simulations.simulate import engine_start_failure

    log = tmp_path / "server.log"
    log.write_text(CLIENT_APP_FAILED)
    assert engine_start_failure(log) is None  # clients ran: the run's own failure
    start = log.stat().st_size
    log.write_text(CLIENT_APP_FAILED + RAY_START_TIMEOUT)
    assert engine_start_failure(log, start) == (
        "RuntimeError: Timed out waiting for file /tmp/ray/session_x/gcs_server_port_ab")
    assert engine_start_failure(log, log.stat().st_size) is None  # only what came after `start`
    assert engine_start_failure(tmp_path / "missing.log") is None
    assert first_error(CLIENT_APP_FAILED) == "ValueError: bad batch"
    assert first_error("all fine\n") is None


@pytest.mark.e2e
@pytest.mark.timeout(360)
def test_a_failed_engine_start_is_tried_three_times_and_compare_keeps_what_finished(tmp_path):
    # Ray cannot make its session directory under a plain file: ray.init fails on every
    # try, which is the path a start-up timeout under load takes (see the test above).
    not_a_dir = tmp_path / "not-a-dir"
    not_a_dir.write_text("")
    out = tmp_path / "cmp"
    log = tmp_path / "compare.log"
    with ProcessTree() as tree:
        proc = tree.start([FEDCONTRAST, "compare", "--dataset", "digits", "--rounds", "1",
                           "--methods", "centralized,fedavg", "--out", str(out), *TINY],
                          log=log, cwd=tmp_path,
                          env={**os.environ, "RAY_TMPDIR": str(not_a_dir), "OMP_NUM_THREADS": "1"})
        rc = proc.wait(timeout=330)
    text = log.read_text(errors="replace")
    assert rc == 2, text
    assert "the simulation engine did not start (NotADirectoryError" in text
    assert "attempt 2 of 3" in text and "attempt 3 of 3" in text and "attempt 4" not in text
    run = out / "fedavg-seed0"
    assert (run / "server.log").read_text().count("Successfully started run") == 3
    assert "failed: NotADirectoryError" in text  # the one line that says how the run ended
    assert not (run / "metrics.jsonl").exists() and not (run / "arm.json").exists()
    # What finished before the failure is kept, and the error says how to go on from it.
    assert (out / "centralized-seed0" / "arm.json").exists()
    assert f"the same command with --out {out.resolve()} goes on from fedavg seed 0" in text


@pytest.mark.timeout(300)
def test_a_stopped_compare_goes_on_from_where_it_stopped(tmp_path, capsys):
    from simulations.compare import compare
    from simulations.reuse import RECORD

    cfg = FedConfig(dataset="digits", width=8, embedding_dim=16, batch_size=32, rounds=1,
                    local_epochs=1, device="cpu")
    sim = Simulation(num_clients=3)
    methods = ("local", "centralized")
    first = compare(cfg, sim, tmp_path, methods=methods)
    local, central = tmp_path / "local-seed0", tmp_path / "centralized-seed0"
    local_files = {f.name: f.read_bytes() for f in local.iterdir()}
    # An interrupted method leaves its directory without the record.
    (central / RECORD).unlink()
    (central / "left-by-the-stopped-run").write_text("")
    again = compare(replace(cfg, round_timeout=cfg.round_timeout + 1), sim, tmp_path, methods=methods)
    printed = capsys.readouterr().err
    assert "local seed 0: finished before" in printed and "reused" in printed
    # Not trained again: the same figures, wall time included, marked as reused in the table.
    assert again["results"]["local"] == [{**first["results"]["local"][0], "reused": "local seed 0"}]
    assert "Reused from an earlier command into the same directory" in (tmp_path / "compare.md").read_text()
    assert {f.name: f.read_bytes() for f in local.iterdir()} == local_files
    aside = tmp_path / "centralized-seed0.unfinished-1"
    assert (aside / "left-by-the-stopped-run").exists() and not (central / "left-by-the-stopped-run").exists()
    retrained = again["results"]["centralized"][0]  # trained again: same figures, its own time
    assert (central / RECORD).exists()
    assert retrained["wall_time_s"] != first["results"]["centralized"][0]["wall_time_s"]
    assert {k: v for k, v in retrained.items() if k != "wall_time_s"} == {
        k: v for k, v in first["results"]["centralized"][0].items() if k != "wall_time_s"}
    assert "reused" not in retrained
    report = json.loads((tmp_path / "compare.json").read_text())
    assert [len(runs) for runs in report["results"].values()] == [1, 1]  # one run each, not two
    # Settings that change what is trained are refused, the differences named, before
    # anything trains or moves: centralized-skewed, planned first, is not started.
    with pytest.raises(UsageError, match=r"local-seed0 holds a finished run with other settings "
                                         r"\(--lr 0.001 -> 0.002; --num-clients 3 -> 4\)"):
        compare(replace(cfg, lr=0.002), Simulation(num_clients=4), tmp_path,
                methods=("centralized-skewed", "local"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "centralized-seed0", "centralized-seed0.unfinished-1", "local-seed0"]
    # A record cut short (stopped while it was written) is an unfinished run.
    (central / RECORD).write_text('{"settings": {"kind": "centr')
    third = compare(cfg, sim, tmp_path, methods=methods)
    assert (tmp_path / "centralized-seed0.unfinished-2").is_dir()
    assert "reused" not in third["results"]["centralized"][0]
    with pytest.raises(UsageError, match="names a method twice"):
        compare(cfg, sim, tmp_path, methods=("local", "local"))


@pytest.mark.timeout(120)
def test_a_compare_rerun_knows_its_data_by_contents_not_by_path(tmp_path):
    import numpy as np

    from simulations.compare import compare

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8),
              "y_train": rng.integers(0, 3, 120), "x_test": rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
              "y_test": rng.integers(0, 3, 40)}
    np.savez(tmp_path / "a.npz", **arrays)
    np.savez(tmp_path / "copy.npz", **arrays)
    arrays["x_train"] = arrays["x_train"][::-1].copy()
    np.savez(tmp_path / "other.npz", **arrays)
    cfg = FedConfig(dataset=str(tmp_path / "a.npz"), width=8, embedding_dim=16, batch_size=32,
                    rounds=1, local_epochs=1, device="cpu")
    out, sim = tmp_path / "cmp", Simulation(num_clients=2)
    first = compare(cfg, sim, out, methods=("local",))["results"]["local"][0]
    copied = compare(replace(cfg, dataset=str(tmp_path / "copy.npz")), sim, out, methods=("local",))
    assert copied["results"]["local"][0] == {**first, "reused": "local seed 0"}
    with pytest.raises(UsageError, match=r"other settings \(data \(SHA-256\) [0-9a-f]{64} -> [0-9a-f]{64}\)"):
        compare(replace(cfg, dataset=str(tmp_path / "other.npz")), sim, out, methods=("local",))


def _run_dir(path: Path, rounds: int, **settings) -> Path:
    from common.runtime.rundir import RunDir

    run = RunDir(path)
    run.write_config(FedConfig(**settings))
    for rnd in range(1, rounds + 1):
        run.append_metrics({"round": rnd, "counted": 1})
    return path


def test_a_resume_that_would_mix_lose_or_redeal_rounds_is_refused(tmp_path):
    from server.deploy import refuse_finished_rounds
    from simulations.simulate import refuse_repartition

    a = _run_dir(tmp_path / "a", 3, dataset="digits", seed=1, partitioner="dirichlet")
    b = _run_dir(tmp_path / "b", 2)
    with pytest.raises(UsageError, match="continue it with --resume"):
        refuse_finished_rounds(a, None, 5)
    with pytest.raises(UsageError, match="trained 3 rounds already"):  # nothing left to train
        refuse_finished_rounds(a, a, 3)
    with pytest.raises(UsageError, match="into an empty --out"):  # a's rows after b's
        refuse_finished_rounds(b, a, 5)
    refuse_finished_rounds(a, a, 4)
    refuse_finished_rounds(tmp_path / "new", a, 4)

    (a / "simulation.json").write_text(json.dumps(Simulation(num_clients=10).as_dict()))
    same = FedConfig(dataset="digits", seed=1, partitioner="dirichlet", rounds=9, lr=0.1)
    refuse_repartition(same, Simulation(num_clients=10), a)  # more rounds, another lr: fine
    with pytest.raises(UsageError, match=r"--seed 1 -> 2, --num-clients 10 -> 20"):
        refuse_repartition(replace(same, seed=2), Simulation(num_clients=20), a)
    with pytest.raises(UsageError, match="--dirichlet-alpha 0.5 -> 0.1"):
        refuse_repartition(replace(same, dirichlet_alpha=0.1), Simulation(num_clients=10), a)


def test_a_resume_into_another_directory_carries_the_client_state(tmp_path):
    from simulations.simulate import _carry_client_state

    state = StateDir(tmp_path / "a" / CLIENT_STATE / "partition-0", "partition-0")
    saved = state.load()
    saved.rounds_trained = 4
    state.save(saved)
    _carry_client_state(tmp_path / "a", tmp_path / "b")
    copied = tmp_path / "b" / CLIENT_STATE / "partition-0"
    assert StateDir(copied, "partition-0").load().rounds_trained == 4


def test_privacy_sweep_refuses_a_push_axis_it_cannot_run_before_any_run(tmp_path):
    from simulations.privacy import sweep

    pushing = resolve(parse_privacy("--push-fraction", "0.05", "--push-noise", "4"),
                      defaults=SWEEP_DEFAULTS)[0]
    with pytest.raises(UsageError, match="positive finite budget"):
        sweep(pushing, Simulation(num_clients=2), tmp_path / "p", epsilons=[4.0], push_noise=4.0,
              push_axis_epsilon=math.inf)
    # The sweep's defaults push nothing: an axis of pushes with and without noise is refused.
    default = resolve(parse_privacy(), defaults=SWEEP_DEFAULTS)[0]
    assert (default.push_fraction, default.push_noise, default.global_negatives) == (0.0, 0.0, 0)
    with pytest.raises(UsageError, match="pushes no noised row"):
        sweep(default, Simulation(num_clients=2), tmp_path / "p", epsilons=[4.0], push_noise=0.0,
              push_axis_epsilon=8.0)
    assert not any((tmp_path / "p").iterdir())


def test_in_process_training_is_evaluated_after_the_last_round_even_without_eval_every():
    from simulations.compare import train_in_process

    data = load_dataset("synthetic:64")
    cfg = FedConfig(dataset="synthetic:64", rounds=3, local_epochs=1, eval_every=0, width=4,
                    embedding_dim=8, batch_size=16, device="cpu")
    seen = []
    train_in_process(cfg, data.x_train, data, on_eval=lambda rnd, _m: seen.append(rnd))
    assert seen == [3]  # the comparison's curve always has its final point


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_compare_runs_the_byol_methods_and_counts_what_each_client_sends(tmp_path):
    from client.byol_round import BYOL_STATE
    from common import optim_state
    from common.model import build_model

    out = tmp_path / "cmp"
    rc, log = _run([FEDCONTRAST, "compare", "--out", str(out), "--rounds", "2",
                    "--methods", "fedbyol,fedu,fedema", *TINY], tmp_path, 850)
    assert rc == 0, log
    report = json.loads((out / "compare.json").read_text())
    assert list(report["results"]) == ["fedbyol", "fedu", "fedema"]
    cfg = method_config("fedema", FedConfig(width=8, embedding_dim=16))
    model = build_model(cfg, 1)
    arrays = [*model.state_dict().values(), *optim_state.initial_arrays(model, cfg).values()]
    sent = sum(t.numel() * t.element_size() for t in arrays) / 1e6  # encoder, predictor, Adam
    for method, runs in report["results"].items():
        assert runs[0]["knn_backbone"] > 0.0 and runs[0]["mb_sent_per_client_round"] == pytest.approx(sent)
        assert read_config_values(out / f"{method}-seed0")[1]["byol_update"] == method
    assert "MB sent/client/round" in (out / "compare.md").read_text()
    kept = torch.load(out / "fedema-seed0" / CLIENT_STATE / "partition-0" / BYOL_STATE, weights_only=True)
    assert kept["fedema_lambda"] > 0  # autoscaled in round 2, from the model kept after round 1
