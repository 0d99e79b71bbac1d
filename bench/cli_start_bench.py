"""What ``fedcontrast --help`` costs a user: every command's module imported to build
the parser (as before cf18402) against the light command modules, which hold the
commands' names and flags and import their code only to run them (now), side by side;
``fedcontrast train-local --help`` and a command's own code imported beside them.

Each arm is one fresh interpreter, timed from start to exit (what a user waits); the
arms alternate, ``--repeats`` times each. Both help arms must print the same list of
commands, or the benchmark fails.

    python -m bench.cli_start_bench       # about a minute; results in bench/results/
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_result

ROOT = Path(__file__).resolve().parents[1]

_EAGER = "every command module imported (fedcontrast --help before cf18402)"
_LAZY = "fedcontrast --help (light command modules)"
_ONE = "fedcontrast train-local --help (flags from the light module)"
_CODE = "train-local's code imported (what running it adds first)"
#: The modules the entry points named before cf18402: the commands' code.
COMMAND_CODE = ("client.train_local", "client.node", "server.queue_server", "server.deploy",
                "simulations.simulate", "simulations.compare", "simulations.privacy")
_ARMS = {
    # The old path: every entry point's module imported (they held the commands and their
    # flags), then the parser with every command's flags.
    _EAGER: f"import {', '.join(COMMAND_CODE)}\n"
            "from common.runtime.cli import build_parser, discover_commands\n"
            "build_parser(discover_commands(), arguments=True).print_help()",
    _LAZY: "from common.runtime.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass",
    _ONE: "from common.runtime.cli import main\ntry: main(['train-local', '--help'])\nexcept SystemExit: pass",
    _CODE: "import client.train_local",
}


def _one(code: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=300)
    return time.perf_counter() - start, out.stdout


def _listing(help_text: str) -> list[str]:
    """The command names of a top-level help, in order."""
    return [line.split()[0] for line in help_text.splitlines()
            if line.startswith("    ") and not line.startswith("     ")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per arm (default: 5)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in _ARMS}
    listings: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, code in _ARMS.items():
            seconds, stdout = _one(code)
            times[name].append(seconds)
            listings[name] = _listing(stdout)
    if listings[_EAGER] != listings[_LAZY] or not listings[_LAZY]:
        raise SystemExit(f"the help arms list different commands: {listings[_EAGER]} "
                         f"against {listings[_LAZY]}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = medians[_EAGER]
    rows = [[name, m * 1e3, min(times[name]) * 1e3, m / baseline] for name, m in medians.items()]
    write_result(
        "cli_start_bench",
        ["command line", "median ms", "min ms", "ratio to every module imported"],
        rows,
        summary={"help_speedup": round(baseline / medians[_LAZY], 1), "repeats": args.repeats,
                 "commands_listed": len(listings[_LAZY])},
        notes="Each time is one fresh interpreter, start to exit. Both help arms list the same "
              "commands; the eager arm's time is mostly importing torch, Flower and gRPC, which "
              "only the command that runs needs (the last row: what running train-local "
              "imports before it starts work).",
    )


if __name__ == "__main__":
    main()
