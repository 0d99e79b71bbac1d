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


def test_the_secret_scan_skips_token_shapes_in_public_key_material_but_not_tokens(tmp_path) -> None:
    from conftest import secrets_on_disk

    # A public key's base64 can hold a 43-character run between "+" and "/" by chance: in
    # an OpenSSH *.pub file, and in a log that prints a PEM key with escaped newlines (as
    # Flower's SuperLink logs the nodes' keys).
    run = "h3PAiQGkljDu12fyEuxFhjoArqQZleYu54MwArtlHkg"
    ssh = f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI+{run} node\n"
    pem = ("'-----BEGIN PUBLIC KEY-----\\nMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEiVCaH1ujQ4+Zq/abcdef"
           "ghijklmnopqrstuvwxyz0123\\n-----END PUBLIC KEY-----\\n'\n")
    assert secrets_on_disk(tmp_path) == []
    (tmp_path / "node.pub").write_text(ssh)
    (tmp_path / "superlink.log").write_text(f"INFO registered node {pem}{ssh}")
    assert secrets_on_disk(tmp_path) == []
    # A token is found wherever it stands outside key material, also next to a "/" in a
    # short path or after an escaped newline.
    token = "Zq3xT0kP9vW2mN5bR8cL1dF4gH7jK0aS6eU9iY2oQ3w"
    for i, text in enumerate((f"token={token}\n", f'{{"t": "{token}"}}', f"/queue/{token}/x",
                              f"'header\\n{token}'")):
        (tmp_path / "run.log").write_text(text)
        assert secrets_on_disk(tmp_path) == [f"run.log: [{token!r}]"], i
    (tmp_path / "run.log").unlink()
    # Secrets are looked for everywhere, key files included.
    assert secrets_on_disk(tmp_path, [b"AAAAI+h3PA"]) == [
        "node.pub: ['secret #0']", "superlink.log: ['secret #0']"]


def test_curves_draw_the_random_init_level_on_each_metric_that_has_one(tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    run = RunDir(tmp_path)
    for rnd, knn in ((1, 0.90), (2, 0.95)):
        run.append_metrics({"round": rnd, "knn_backbone": knn, "train_loss": 1.0 / rnd})
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read it
    path = run.plot("round", ("knn_backbone", "train_loss"), random_init={"knn_backbone": 0.93})
    assert path is not None and path.stat().st_size > 0
    levels = {ax.get_title(): [(line.get_ydata()[0], line.get_linestyle()) for line in ax.lines
                               if line.get_label() == "random init"]
              for ax in figures[0].axes}
    assert levels == {"knn_backbone": [(0.93, "--")], "train_loss": []}  # loss has no such level
