"""Every command the README and docs/ show works as written.

Each line of a fenced ``bash`` block is checked by its kind: a ``fedcontrast`` command is
parsed by the real parser and, where it takes settings, its settings are resolved and
checked as the command would (scenario included); the cheap ones (``train-local`` and
``evaluate`` on a built-in dataset) also run, with tiny sizes appended; ``make TARGET``
must dry-run (``make -n``); ``python -m MODULE`` must name an importable module. A block
that needs CUDA, a second machine or a user's own files is preceded by
``<!-- not run: why -->`` and skipped; any other kind of line fails the test, so a new
command is either checked here or marked.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not run:"
#: Appended to a command that runs, so that it trains in seconds (later flags win).
TINY = {"train-local": ["--epochs", "1", "--width", "4", "--batch-size", "64", "--quiet",
                        "--eval-every", "0"],
        "evaluate": []}
BUILT_IN_DATA = ("digits", "synthetic", "dna")


def shown_commands(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, words)`` of each command in the file's fenced bash blocks, except
    those of blocks marked not run; continuation lines joined (the numbers after one are
    then a line early), comments dropped."""
    commands = []
    text = path.read_text()
    for block in re.finditer(r"([^\n]*)\n```bash\n(.*?)```", text, re.S):
        if block[1].startswith(NOT_RUN):
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        for offset, line in enumerate(block[2].replace("\\\n", " ").splitlines()):
            words = shlex.split(line, comments=True)
            if words:
                commands.append((first + offset, words))
    return commands


def _settings(name: str, args) -> None:
    """Resolve the command's settings as the command would; raise what it would raise."""
    from common.config import FedConfig, TrainConfig, from_args

    if getattr(args, "config", None) or getattr(args, "resume", None):
        return  # settings of a saved run, which the docs' examples do not ship
    if name in ("simulate", "compare"):
        from simulations.simulate import resolve

        resolve(args)
    elif name == "privacy":
        from simulations.commands import SWEEP_DEFAULTS
        from simulations.simulate import resolve

        resolve(args, defaults=SWEEP_DEFAULTS)
    elif name == "server":
        from_args(FedConfig, args)
    elif name == "train-local":
        from_args(TrainConfig, args)


def _runs(name: str, argv: list[str]) -> bool:
    if name not in TINY or "--config" in argv:  # a saved run, which the docs do not ship
        return False
    dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "digits"
    return dataset.split(":")[0] in BUILT_IN_DATA


def check_fedcontrast(argv: list[str], parser) -> None:
    from common.runtime.cli import main

    args = parser.parse_args(argv)  # SystemExit on a flag the command does not have
    name = argv[0]
    _settings(name, args)
    if _runs(name, argv):
        assert main([*argv, *TINY[name]]) == 0


def check(words: list[str], parser) -> None:
    program, argv = words[0], words[1:]
    if program.endswith("fedcontrast"):
        check_fedcontrast(argv, parser)
    elif program == "make":
        assert argv and not argv[0].startswith("-"), words
        subprocess.run(["make", "-n", *argv], cwd=ROOT, check=True, capture_output=True)
    elif program.split("/")[-1] in ("python", "python3") and argv[:1] == ["-m"]:
        assert importlib.util.find_spec(argv[1]) is not None, f"no module {argv[1]}"
    else:
        pytest.fail(f"{' '.join(words)}: not a command this test checks; check it here or "
                    f"mark its block {NOT_RUN} why -->")


@pytest.fixture(scope="module")
def parser():
    from common.runtime.cli import build_parser

    return build_parser()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_command_shown_works(path, parser, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # runs/... of the examples land here
    failures = []
    for line, words in shown_commands(path):
        try:
            check(words, parser)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - every failure is reported
            failures.append(f"{path.name}:{line}: {' '.join(words)}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def test_demo_runs_the_command_the_readme_names():
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    assert "fedcontrast simulate --dataset digits" in dry
    assert "`fedcontrast simulate --dataset digits`" in (ROOT / "README.md").read_text()


def test_docs_find_their_commands():
    lines = [words for path in DOCS for _, words in shown_commands(path)]
    assert ["make", "demo"] in lines
    assert any(words[:2] == [".venv/bin/fedcontrast", "train-local"] for words in lines)
    assert not any("printf" in words for words in lines)
