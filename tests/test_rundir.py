"""What a run directory records about the process that wrote it."""

from __future__ import annotations

import json
import sys

from common.runtime.rundir import REDACTED, RunDir, redact_argv


def test_a_secret_flags_value_never_reaches_the_recorded_command_line() -> None:
    argv = ["flwr-serverapp", "--token", "s3cr3t", "--queue-token=abc", "--db-password", "pw",
            "--tokens-file", "tokens.txt", "--ssl-keyfile", "key.pem", "--rounds", "3"]
    assert redact_argv(argv) == [
        "flwr-serverapp", "--token", REDACTED, f"--queue-token={REDACTED}", "--db-password",
        REDACTED, "--tokens-file", "tokens.txt", "--ssl-keyfile", "key.pem", "--rounds", "3"]


def test_versions_json_holds_no_token_of_the_command_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["flwr-serverapp", "--token", "0123456789abcdef"])
    RunDir(tmp_path).write_versions()
    text = (tmp_path / "versions.json").read_text()
    assert "0123456789abcdef" not in text
    assert json.loads(text)["command"] == ["flwr-serverapp", "--token", REDACTED]


def test_the_secret_scan_finds_a_flower_process_token_as_old_runs_recorded_it(tmp_path) -> None:
    from conftest import secrets_on_disk

    flower_token = "09db71ef8e783854a958a7e916e98f122d6b17c88795dec7c67be3abce02534e" * 2
    (tmp_path / "versions.json").write_text(json.dumps(
        {"command": ["flwr-simulation", "--token", flower_token], "git_commit": "ab" * 20}))
    assert secrets_on_disk(tmp_path) == [f"versions.json: [{flower_token!r}]"]
