"""`fedcontrast train-local` as a user runs it: run directory, errors without tracebacks."""

import argparse
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from common.checkpoint import load_encoder


def fedcontrast(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "common.runtime.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_train_local_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    r = fedcontrast("train-local", "--dataset", "digits", "--epochs", "2", "--width", "8",
                    "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "versions.json", "metrics.csv", "metrics.jsonl", "encoder.pt",
                 "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["trained"]) == set(summary["random_init"])
    assert "linear_probe_backbone" in summary["trained"] and "pretrained_init" not in summary
    model = load_encoder(out)
    assert model.embedding_dim == 128
    # the saved config re-runs as it is
    # (now from the encoder pretrained on synthetic images, measured beside the random init)
    r2 = fedcontrast("train-local", "--config", str(out), "--epochs", "1", "--out",
                     str(tmp_path / "rerun"), "--quiet", "--pretrain-epochs", "1",
                     "--pretrain-images", "64")
    assert r2.returncode == 0, r2.stderr
    cfg2 = json.loads((tmp_path / "rerun" / "config.json").read_text())["config"]
    assert (cfg2["width"], cfg2["epochs"], cfg2["pretrain_epochs"]) == (8, 1, 1)
    summary2 = json.loads((tmp_path / "rerun" / "summary.json").read_text())
    assert set(summary2["pretrained_init"]) == set(summary2["random_init"])
    assert summary2["pretrained_init"] != summary2["random_init"]


def _bad_npz(path):
    np.savez(path, x_train=np.zeros((4, 8, 8), np.uint8))  # y_train, x_test, y_test missing
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet"], "digits"),
        (["--dataset", "/nonexistent/data.npz"], "no such file"),
        (["--temperature", "0"], "--temperature"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(tmp_path, args, message):
    r = fedcontrast("train-local", *args, "--out", str(tmp_path / "x"), "--quiet", timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_pretraining_on_items_that_are_not_images_is_refused_in_one_line(tmp_path):
    r = fedcontrast("train-local", "--dataset", "dna", "--pretrain-epochs", "1", "--out",
                    str(tmp_path / "x"), "--quiet", timeout=120)
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and "not (channels, height, width)" in errors[0], r.stderr


def test_malformed_npz_is_one_line(tmp_path):
    r = fedcontrast("train-local", "--dataset", _bad_npz(tmp_path / "bad.npz"), "--out",
                    str(tmp_path / "x"), "--quiet", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "y_train" in r.stderr


def test_a_command_whose_module_fails_to_import_is_listed_and_says_why(monkeypatch, capsys):
    from common.runtime import cli

    broken = cli.Command(name="broken", help="a command whose module is missing",
                         add_arguments=cli.deferred("no_such_module:add_arguments"),
                         run=cli.deferred("no_such_module:run"))
    working = cli.Command(name="fine", help="works", add_arguments=lambda p: None,
                          run=lambda args: 0)
    registry = {"broken": broken, "fine": working}
    monkeypatch.setattr(cli, "discover_commands",
                        lambda only=None: {only: registry[only]} if only in registry else registry)
    assert cli.main(["fine"]) == 0
    assert cli.main(["broken"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
    assert len(err) == 1 and "cannot load no_such_module:add_arguments" in err[0], err
    parser = cli.build_parser(registry, arguments=False)
    assert "a command whose module is missing" in parser.format_help()


def test_the_command_help_lines_are_those_of_the_installed_entry_points():
    # pyproject.toml names each Command in a light command module; its deferred run exists.
    from common.runtime.cli import deferred, discover_commands

    commands = discover_commands()
    assert sorted(commands) == ["client", "compare", "evaluate", "privacy", "queue-server",
                                "server", "simulate", "train-local"]
    for command in commands.values():
        assert not command.help.startswith("(unavailable"), command.help
        assert isinstance(command.run, deferred)  # the code is imported when it runs
        module, _, name = command.run.target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), command.run
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)  # the flags are defined in the light module itself
        assert parser.format_help()


def test_version_and_help():
    r = fedcontrast("--version")
    assert r.returncode == 0 and r.stdout.startswith("fedcontrast ")
    r = fedcontrast("train-local", "--help")
    assert r.returncode == 0 and "--device" in r.stdout and "--dataset" in r.stdout


HEAVY = ["torch", "flwr", "grpc", "client.train_local", "client.node", "server.queue_server", "server.deploy",
         "simulations.simulate", "simulations.compare", "simulations.privacy"]


@pytest.mark.parametrize("argv, loaded, absent", [
    (["--version"], [], HEAVY),
    (["--help"], ["client.commands", "server.commands", "simulations.commands"], HEAVY),
    ([], ["simulations.commands"], HEAVY),  # no command: the same list, exit status 2
    (["-v", "evaluate", "--help"], ["client.commands"], HEAVY),  # flags need no torch
    (["compare", "--help"], ["simulations.commands"], HEAVY),
    (["compare", "--no-such-flag"], [], HEAVY),  # refused before any import
    (["evaluate", "/nonexistent"], ["client.train_local", "torch"],  # running it loads its code only
     [m for m in HEAVY if m.startswith(("simulations.", "server.", "client.node"))]),
])
def test_the_command_line_loads_only_the_commands_it_names(argv, loaded, absent):
    code = ("import sys; from common.runtime.cli import main\n"
            f"try: main({argv!r})\nexcept SystemExit: pass\n"
            f"print([m in sys.modules for m in {loaded + absent!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == str([True] * len(loaded) + [False] * len(absent))


@pytest.mark.timeout(300)
def test_evaluate_a_saved_run_reports_probes_beside_random_init(tmp_path):
    out = tmp_path / "run"
    assert fedcontrast("train-local", "--epochs", "1", "--width", "8", "--seed", "1", "--out", str(out),
                       "--quiet").returncode == 0
    r = fedcontrast("evaluate", str(out), "--json", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    figures = json.loads((tmp_path / "eval.json").read_text())
    # By default on the run's own split (seed 1): the figures the run reported itself.
    # Seed 0 splits digits otherwise, so some of its test items were trained on.
    own = json.loads((out / "summary.json").read_text())["trained"]
    keys = ("knn_backbone", "linear_probe_backbone", "retrieval_head", "uniformity_head")
    assert all(figures["trained"][k] == pytest.approx(own[k]) for k in keys)
    r = fedcontrast("evaluate", str(out), "--seed", "0", "--json", str(tmp_path / "seed0.json"))
    seed0 = json.loads((tmp_path / "seed0.json").read_text())["trained"]
    assert r.returncode == 0 and any(seed0[k] != pytest.approx(own[k]) for k in keys)
    for key in ("knn_backbone", "linear_probe_backbone", "retrieval_head"):
        assert 0 <= figures["trained"][key] <= 1 and 0 <= figures["random_init"][key] <= 1
    assert figures["trained"]["uniformity_head"] <= 0 and figures["random_init"]["uniformity_head"] <= 0
    # the trained encoder and the random init are two encoders, not one evaluated twice
    assert figures["trained"]["uniformity_head"] != figures["random_init"]["uniformity_head"]
    # --dataset: the same encoder on other data of the same image shape, an .npz here
    other = tmp_path / "other.npz"
    rng = np.random.default_rng(0)
    np.savez(other, x_train=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8),
             y_train=np.arange(60) % 3, x_test=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
             y_test=np.arange(30) % 3)
    r = fedcontrast("evaluate", str(out), "--dataset", str(other), "--json", str(tmp_path / "o.json"))
    assert r.returncode == 0, r.stderr
    on_other = json.loads((tmp_path / "o.json").read_text())
    assert on_other["dataset"] == "other" and figures["dataset"] == "digits"  # named by its stem
    assert on_other["trained"]["knn_backbone"] != figures["trained"]["knn_backbone"]
    r = fedcontrast("evaluate", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no run directory" in r.stderr


def test_the_end_of_run_table_leads_with_what_training_changed():
    from rich.console import Console

    from client.train_local import summary_table

    trained = {"retrieval_head": 0.80, "alignment_head": 0.5, "knn_backbone": 0.97,
               "linear_probe_backbone": 0.98, "uniformity_head": -3.5}
    init = {"retrieval_head": 0.50, "alignment_head": 0.7, "knn_backbone": 0.93,
            "linear_probe_backbone": 0.96, "uniformity_head": -2.5}
    table = summary_table({"dataset": "digits", "trained": trained, "random_init": init,
                           "raw_pixel_knn": 0.972})
    columns = {c.header: list(c.cells) for c in table.columns}
    assert list(columns) == ["metric", "trained", "random init", "change"]
    assert columns["metric"][:4] == ["knn_backbone", "linear_probe_backbone", "retrieval_head",
                                     "uniformity_head"]
    assert columns["change"][:4] == ["+0.0400", "+0.0200", "+0.3000", "-1.0000"]
    console = Console(width=80, record=True)
    console.print(table)
    assert any(line.strip().startswith("change = trained - random init: > 0 is better")
               and line.strip().endswith(")")
               for line in console.export_text().splitlines())  # how to read it, in one line
