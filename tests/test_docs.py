"""README stays true to the code: the generated reference and the two opening commands."""

from pathlib import Path

from common import docs

ROOT = Path(__file__).resolve().parent.parent


def test_readme_reference_is_current():
    text = docs.README.read_text()
    assert docs.render(text) == text, "README reference is stale: run `python -m common.docs`"


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
