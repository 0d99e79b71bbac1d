"""Shared helpers for benchmarks: machine description and result files.

Every benchmark prints a table, then calls :func:`write_result`, which stores the
table together with the machine, the package versions and the exact command under
``bench/results/<name>.json`` and ``bench/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The CIFAR-10 benchmark file beside the checkout (``../shared/data``); a user's checkout
#: does not have it, so the benchmarks that default to it also take ``--data``.
CIFAR_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_jpeg.npz"


def add_data_arguments(parser: argparse.ArgumentParser, default: str,
                       train: int | None = None, test: int | None = None,
                       accepts: str = "digits, an .npz, a cifar10 folder or a plug-in") -> None:
    """The benchmarks' one spelling of their data flags: ``--data`` (alias ``--dataset``),
    and, for those that cut a stratified slice of an ``.npz``, ``--train`` / ``--test``
    (aliases ``--train-size`` / ``--test-size``)."""
    parser.add_argument("--data", "--dataset", dest="data", default=default,
                        help=f"the data: {accepts} (default: %(default)s)")
    if train is not None:
        parser.add_argument("--train", "--train-size", dest="train", type=int, default=train,
                            help="training images in the slice of an .npz (default: %(default)s)")
    if test is not None:
        parser.add_argument("--test", "--test-size", dest="test", type=int, default=test,
                            help="held-out images in the slice of an .npz (default: %(default)s)")


def machine_info() -> dict[str, Any]:
    """Describe the host a benchmark ran on (CPU, cores, memory, accelerator, versions)."""
    import torch

    info: dict[str, Any] = {
        "hostname_hash": abs(hash(platform.node())) % 10**8,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _invocation() -> list[str]:
    """How this benchmark was started, as a command that runs again from the repo root."""
    script = Path(sys.argv[0]).resolve()
    here = Path(__file__).resolve().parent
    if script.parent == here and script.suffix == ".py":
        return ["python", "-m", f"bench.{script.stem}"]
    return ["python", sys.argv[0]]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render rows as a GitHub Markdown table (floats with 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(
    name: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    summary: dict[str, Any] | None = None,
    notes: str = "",
    details: dict[str, Any] | None = None,
) -> Path:
    """Print the table and write ``bench/results/<name>.{json,md}``; return the JSON path.

    ``details``: kept in the JSON only (e.g. every seed's figures, for paired comparisons
    with a later run), too long for the table.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [*_invocation(), *sys.argv[1:]])
    table = markdown_table(headers, rows)
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "git_commit": git_commit(),
        "machine": machine_info(),
        "headers": list(headers),
        "rows": [list(r) for r in rows],
        "summary": summary or {},
        "notes": notes,
        **({"details": details} if details else {}),
    }
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    md = [f"# {name}", "", f"Command: `{command}`", "", f"Date: {record['date']}", "",
          "Machine: " + ", ".join(f"{k}={v}" for k, v in record["machine"].items()), "",
          table, ""]
    if summary:
        md += ["Summary:", ""] + [f"- {k}: {v}" for k, v in summary.items()] + [""]
    if notes:
        md += [notes, ""]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(md))
    print(table)
    if summary:
        for k, v in summary.items():
            print(f"{k}: {v}")
    print(f"written: {json_path}")
    return json_path
