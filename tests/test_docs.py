"""README and docs stay true to the code: the generated reference and the two opening commands."""

from pathlib import Path

from common.runtime import docs

ROOT = Path(__file__).resolve().parent.parent


def test_reference_is_current():
    assert docs.REFERENCE.read_text() == docs.reference(), (
        "docs/reference.md is stale: run `python -m common.runtime.docs`")


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_settings_flag_is_in_the_reference():
    import dataclasses

    from common.config import FedConfig, flag_name

    ref = docs.reference()
    for f in dataclasses.fields(FedConfig):
        assert f"`{flag_name(f.name)}`" in ref


def test_make_help_names_every_target():
    makefile = (ROOT / "Makefile").read_text()
    phony = next(line for line in makefile.splitlines() if line.startswith(".PHONY:"))
    targets = set(phony.split(":", 1)[1].split()) - {"help"}
    helped = {line.split('"make ', 1)[1].split()[0] for line in makefile.splitlines()
              if line.strip().startswith('@echo "make ')}
    assert targets and targets == helped, (targets, helped)


def test_every_command_help_states_each_default_once_and_never_as_none():
    # argparse's defaults formatter appended "(default: None)" to flags whose help already
    # said what their absence means, e.g. "--num-clients ... (default: 10) (default: None)".
    import re

    from common.runtime.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "compare" in a.choices)
    assert len(sub.choices) >= 8
    for name, command in sub.choices.items():
        text = " ".join(command.format_help().split())
        assert "(default: None)" not in text, name
        assert not re.search(r"\(default[^()]*\) \(default", text), name
    # Defaults the help does not state are still shown.
    simulate = " ".join(sub.choices["simulate"].format_help().split())
    assert "virtual clients, each one partition of --dataset (default: 10) --client-cpus" in simulate
    assert "no progress bars (default: False)" in " ".join(sub.choices["train-local"].format_help().split())


def test_simulate_help_fits_a_screen_and_help_all_shows_every_setting(monkeypatch, capsys):
    import dataclasses

    import pytest

    from common.config import EXPERIMENTS, FedConfig, flag_name, setting_group
    from common.runtime.cli import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    simulate = build_parser(arguments=True)._subparsers._group_actions[0].choices["simulate"]
    short = simulate.format_help()
    assert len(short.splitlines()) <= 100
    assert "--hard-negative-beta" not in short and "--help-all" in short
    with pytest.raises(SystemExit):
        simulate.parse_args(["--help-all"])
    full = capsys.readouterr().out
    assert EXPERIMENTS in full
    for f in dataclasses.fields(FedConfig):
        assert flag_name(f.name) in full
    assert setting_group(next(f for f in dataclasses.fields(FedConfig)
                              if f.name == "pull_mode")) == EXPERIMENTS
    # A hidden setting is still a flag.
    assert simulate.parse_args(["--hard-negative-beta", "1"]).hard_negative_beta == 1.0


def test_no_text_dates_anything_by_a_work_period_counter():
    # When something was measured or changed is a date or a commit, which a reader can look
    # up; "session" alone (a TLS or Ray session) is fine.
    import re
    import subprocess

    counter = re.compile(r"[Ss]essions? [0-9]+|session-[0-9]+")
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
        paths = [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the project's folders
        paths = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    texts = [p for p in paths if p.is_file() and (p.suffix in (".md", ".py", ".toml")
                                                   or p.parent == ROOT / "bench" / "results")]
    assert len(texts) > 50
    found = [f"{p.relative_to(ROOT)}: {m[0]}" for p in texts if p.suffix != ".png"
             for m in counter.finditer(p.read_text(errors="replace"))]
    assert not found, found
