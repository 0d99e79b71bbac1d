"""The `fedcontrast server` and `fedcontrast client` commands' own logic (no processes)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.commands import add_client_arguments as client_arguments
from client.node import node_config, supernode_command
from common.config import FedConfig, from_run_config
from common.errors import UsageError
from common.runtime.flower_env import ProcessTree, flower_env, free_port
from server.commands import add_server_arguments as server_arguments
from server.deploy import (
    app_dir,
    queue_tls_run_config,
    resolve_settings,
    stage_app,
    superlink_command,
    write_run_config,
)


def server_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server_arguments(parser)
    return parser.parse_args(list(argv))


def client_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    client_arguments(parser)
    return parser.parse_args(list(argv))


def test_app_dir_is_the_repository_with_the_flower_app():
    assert (app_dir() / "server" / "app.py").exists()


def test_the_staged_app_builds_the_same_fab_as_the_checkout(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    dest = tmp_path / "fab-source"
    dest.mkdir()
    (dest / "stale.py").write_text("a file from an older staging\n")
    staged = stage_app(dest)
    assert not (staged / "stale.py").exists() and not list(staged.rglob("__pycache__"))
    assert (staged / "server" / "app.py").exists() and (staged / "pyproject.toml").exists()
    assert build_fab_from_disk(staged) == build_fab_from_disk(app_dir())  # byte for byte


def test_superlink_needs_tls_files_or_an_explicit_insecure(tmp_path):
    with pytest.raises(UsageError, match="--insecure"):
        superlink_command(server_args())
    assert "--insecure" in superlink_command(server_args("--insecure"))
    files = []
    for name in ("ca.pem", "cert.pem", "key.pem", "keys.csv"):
        (tmp_path / name).write_text("x")
        files.append(str(tmp_path / name))
    cmd = superlink_command(server_args("--ssl-ca-certfile", files[0], "--ssl-certfile", files[1],
                                        "--ssl-keyfile", files[2], "--auth-list-public-keys", files[3]))
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == files[1]


def test_run_config_file_round_trips_through_flower(tmp_path):
    args = server_args("--out", "relative/run dir", "--rounds", "3", "--dataset", 'we"ird.npz')
    cfg, out, resume = resolve_settings(args)
    assert out.is_absolute() and resume is None
    path = write_run_config(tmp_path / "rc.toml", cfg, out, resume)
    parsed = parse_config_args([str(path)])
    assert from_run_config(FedConfig, parsed) == cfg
    assert parsed["run-dir"] == str(out) and parsed["resume"] == ""


def test_the_queue_is_served_with_the_superlinks_tls_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("ca.pem", "cert.pem", "key.pem", "queue.pem", "queue.key"):
        (tmp_path / name).write_text("x")
    tls = ["--ssl-ca-certfile", "ca.pem", "--ssl-certfile", "cert.pem", "--ssl-keyfile", "key.pem"]
    extra = queue_tls_run_config(server_args(*tls))
    assert extra == {"queue-ssl-certfile": str(tmp_path / "cert.pem"),
                     "queue-ssl-keyfile": str(tmp_path / "key.pem")}  # absolute
    own = ["--queue-ssl-certfile", "queue.pem", "--queue-ssl-keyfile", "queue.key"]
    assert queue_tls_run_config(server_args(*tls, *own))["queue-ssl-certfile"] == str(
        tmp_path / "queue.pem")
    assert queue_tls_run_config(server_args("--superlink", "h:1", "--ssl-ca-certfile", "ca.pem",
                                            *own))["queue-ssl-keyfile"] == str(tmp_path / "queue.key")
    assert queue_tls_run_config(server_args("--insecure")) == {"queue-ssl-certfile": "",
                                                               "queue-ssl-keyfile": ""}
    cfg, out, resume = resolve_settings(server_args(*tls))
    parsed = parse_config_args([str(write_run_config(tmp_path / "rc.toml", cfg, out, resume, extra))])
    assert {k: parsed[k] for k in extra} == extra  # what the ServerApp will read


def test_a_tls_deployment_never_serves_the_queue_in_clear(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(UsageError, match="--queue-ssl-certfile"):
        queue_tls_run_config(server_args("--superlink", "h:1", "--ssl-ca-certfile",
                                         str(tmp_path / "ca.pem")))
    with pytest.raises(UsageError, match="go together"):
        queue_tls_run_config(server_args("--superlink", "h:1", "--ssl-ca-certfile",
                                         str(tmp_path / "ca.pem"), "--queue-ssl-certfile", "c"))
    with pytest.raises(UsageError, match="--insecure"):
        queue_tls_run_config(server_args("--insecure", "--queue-ssl-certfile", "c",
                                         "--queue-ssl-keyfile", "k"))
    with pytest.raises(UsageError, match="no such file"):
        queue_tls_run_config(server_args("--superlink", "h:1", "--ssl-ca-certfile",
                                         str(tmp_path / "ca.pem"), "--queue-ssl-certfile",
                                         str(tmp_path / "missing.pem"), "--queue-ssl-keyfile",
                                         str(tmp_path / "ca.pem")))


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(UsageError, match="encoder.pt"):
        resolve_settings(server_args("--resume", str(tmp_path)))


@pytest.mark.parametrize("command", ["server", "simulate"])
def test_a_run_directory_with_rounds_is_refused_before_anything_starts(tmp_path, capsys, command):
    from common.runtime.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (out / "simulation.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    extra = ["--insecure"] if command == "server" else []
    packages = [logging.getLogger(name) for name in ("common", "client", "server", "simulations")]
    levels = [logger.level for logger in packages]
    try:
        assert main([command, "--out", str(out), *extra]) == 2
    finally:  # main() sets our packages' log levels, as a command should: not for later tests
        for logger, level in zip(packages, levels, strict=True):
            logger.setLevel(level)
    err = capsys.readouterr().err
    assert "already holds a run (2 rounds" in err and f"--resume {out}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing started


def test_node_config_is_absolute_and_quoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = client_args("--superlink", "127.0.0.1:9092", "--insecure", "--partition-id", "1",
                       "--num-partitions", "2", "--state-dir", "st")
    config = node_config(args)
    assert config == {"partition-id": 1, "num-partitions": 2, "client-id": "partition-1",
                      "state-dir": str(tmp_path / "st")}
    cmd = supernode_command(args, config, 9999)
    text = cmd[cmd.index("--node-config") + 1]
    assert parse_config_args([text]) == config  # what the SuperNode will read


def test_node_config_trusts_the_queue_with_the_superlinks_ca(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_text("x")
    args = client_args("--superlink", "h:1", "--root-certificates", "ca.pem", "--partition-id", "0",
                       "--num-partitions", "1")
    config = node_config(args)
    assert config["queue-root-certificates"] == str(tmp_path / "ca.pem")
    cmd = supernode_command(args, config, 9999)
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]]) == config


def test_node_config_refuses_what_flower_cannot_carry(tmp_path):
    with pytest.raises(UsageError, match="--data-path"):
        node_config(client_args("--superlink", "h:1", "--insecure"))
    with pytest.raises(UsageError, match="client-id"):
        data = tmp_path / "d.npz"
        data.write_bytes(b"")
        node_config(client_args("--superlink", "h:1", "--data-path", str(data)))
    with pytest.raises(UsageError, match="--root-certificates"):
        args = client_args("--superlink", "h:1", "--partition-id", "0", "--num-partitions", "1")
        supernode_command(args, node_config(args), 1)
    bad = Path(tmp_path / 'a"b')
    with pytest.raises(UsageError, match="double quote"):
        node_config(client_args("--superlink", "h:1", "--partition-id", "0", "--num-partitions", "1",
                                "--state-dir", str(bad)))


def test_node_data_may_be_a_dataset_plugin_and_a_wrong_one_is_named():
    args = client_args("--superlink", "h:1", "--insecure", "--data-path", "common.examples.dna:genomes:n=200",
                       "--client-id", "lab-a")
    assert node_config(args)["data-path"] == "common.examples.dna:genomes:n=200"
    with pytest.raises(UsageError, match="common.examples.dna:nope"):
        node_config(client_args("--superlink", "h:1", "--insecure", "--data-path", "common.examples.dna:nope",
                                "--client-id", "lab-a"))
    with pytest.raises(UsageError, match="no such file"):
        node_config(client_args("--superlink", "h:1", "--insecure", "--data-path", "missing.npz",
                                "--client-id", "lab-a"))


FEDCONTRAST = str(Path(sys.executable).parent / "fedcontrast")


def run_command(tmp_path: Path, *argv: str) -> tuple[int, str]:
    """`fedcontrast ARGV` as a process of its own (stopped if it outlives 120 s): its status
    and what it wrote."""
    log = tmp_path / "command.log"
    tree = ProcessTree()
    try:
        proc = tree.start([FEDCONTRAST, *argv], env=flower_env(tmp_path / "home"), log=log,
                          cwd=tmp_path)
        return proc.wait(timeout=120), log.read_text()
    finally:
        tree.stop()


@pytest.mark.timeout(150)
def test_a_server_without_its_dataset_stops_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    rc, said = run_command(tmp_path, "server", "--insecure", "--port", str(free_port()),
                           "--out", str(out), "--dataset", "/nonexistent/data.npz")
    assert rc == 2, said
    assert said.strip().splitlines() == [
        "fedcontrast server: error: --dataset /nonexistent/data.npz: no such file: "
        "/nonexistent/data.npz (expected an .npz archive with arrays x_train, y_train, x_test, "
        "y_test) (the server shapes the encoder with it and evaluates on its test split: give "
        "one this machine can read)"]
    assert not out.exists()  # no SuperLink, no run directory


@pytest.mark.timeout(150)
def test_a_client_with_a_malformed_data_file_stops_before_anything_starts(tmp_path):
    data = tmp_path / "site.npz"
    data.write_text("x_train,y_train\n1,2\n")
    rc, said = run_command(tmp_path, "client", "--superlink", f"127.0.0.1:{free_port()}",
                           "--insecure", "--data-path", str(data), "--client-id", "site",
                           "--state-dir", str(tmp_path / "state"))
    assert rc == 2, said
    (line,) = said.strip().splitlines()
    assert line.startswith(f"fedcontrast client: error: --data-path {data}: {data}: not an .npz archive")
    assert not (tmp_path / "state").exists()  # no SuperNode


def test_a_run_without_a_counted_round_failed_and_one_with_some_is_told_apart():
    from server.app import final_status

    counted, uncounted = {"round": 1, "counted": 1}, {"round": 2, "counted": 0}
    assert final_status([counted, {**counted, "round": 2}], 2, None) == "completed"
    assert final_status([counted, uncounted], 2, None).startswith(
        "completed with uncounted rounds: round(s) 2 of 2 had fewer than --min-nodes 2")
    assert final_status([{**uncounted, "round": 1}, uncounted], 2, None).startswith(
        "failed: NoRoundCounted: none of the 2 rounds counted")
    assert final_status([counted], 2, "collapse") == "stopped early: collapse"


def test_the_outcome_line_and_status_come_from_this_runs_summary(tmp_path):
    from server.deploy import EXIT_FAILED, EXIT_UNCOUNTED_ROUNDS, run_outcome

    (tmp_path / "summary.json").write_text('{"run_id": 7, "status": "completed with uncounted '
                                           'rounds: round(s) 1 of 2 ..."}')
    assert run_outcome(tmp_path, "7", "finished:completed") == (
        EXIT_UNCOUNTED_ROUNDS, "run 7 completed with uncounted rounds: round(s) 1 of 2 ...")
    # another run's summary says nothing of this one: the log's first error does
    (tmp_path / "server.log").write_text("INFO :  starting\nTraceback (most recent call last):\n"
                                         "server.sampling.NotEnoughNodes: 1 node(s) online\n")
    code, line = run_outcome(tmp_path, "8", "finished:failed")
    assert code == EXIT_FAILED and line.startswith(
        "run 8 failed: server.sampling.NotEnoughNodes: 1 node(s) online (full log:")
