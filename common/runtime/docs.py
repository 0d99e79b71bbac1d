"""Generate the README's reference of commands, flags and settings from the code.

``python -m common.runtime.docs`` rewrites the part of README.md between the markers
below; ``tests/test_docs.py`` fails when that part is stale. Settings are listed
once (flag and Flower run-config key side by side); each command then lists only
its own flags and which settings it takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from common.config import FedConfig, TrainConfig, flag_name, key_name
from common.runtime.cli import build_parser, discover_commands

BEGIN = "<!-- BEGIN GENERATED REFERENCE (python -m common.runtime.docs) -->"
END = "<!-- END GENERATED REFERENCE -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _shown(value: object) -> str:
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def settings_table() -> str:
    local = {f.name: f for f in dataclasses.fields(TrainConfig)}
    rows = ["| flag | run-config key | default | scope | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(FedConfig):
        default = _shown(f.default)
        if f.name in local and local[f.name].default != f.default:
            default = f"{_shown(local[f.name].default)}, federated: {default}"
        meaning = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            meaning += f" (one of: {', '.join(f.metadata['choices'])})"
        scope = "all" if f.name in local else "federated"
        rows.append(f"| `{flag_name(f.name)}` | `{key_name(f.name)}` | {default} | {scope} | "
                    f"{_escape(meaning)} |")
    return "\n".join(rows)


def _command_flags(parser: argparse.ArgumentParser) -> tuple[list[str], int]:
    """Markdown rows for a command's own flags; also the count of settings flags it takes."""
    settings = {flag_name(f.name) for f in dataclasses.fields(FedConfig)}
    rows, n_settings = [], 0
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.option_strings[0] in settings:
            n_settings += 1
            continue
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.metavar:
            flags += f" `{action.metavar}`"
        elif action.nargs != 0:
            flags += f" `{action.dest.upper()}`"
        rows.append(f"| {flags} | {_escape(action.help or '')} |")
    return rows, n_settings


def commands_reference() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = discover_commands()
    parts = []
    for name, command in commands.items():
        rows, n_settings = _command_flags(sub.choices[name])
        parts.append(f"#### `fedcontrast {name}`\n\n{command.description or command.help}\n")
        if rows:
            parts.append("| flag | meaning |\n|---|---|\n" + "\n".join(rows) + "\n")
        if n_settings:
            parts.append(f"Also takes {n_settings} settings flags (table below).\n")
    return "\n".join(parts)


def reference() -> str:
    return "\n".join([
        BEGIN,
        "",
        "### Commands",
        "",
        commands_reference(),
        "### Settings",
        "",
        "One table for the command line and the Flower run config "
        "(`[tool.flwr.app.config]`, `flwr run --run-config`). "
        "Defaults live in `common/config.py`.",
        "",
        settings_table(),
        "",
        END,
    ])


def render(readme_text: str) -> str:
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = readme_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + reference() + tail


def main() -> int:
    text = README.read_text()
    new = render(text)
    if new != text:
        README.write_text(new)
        print(f"updated {README}")
    else:
        print(f"{README} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
