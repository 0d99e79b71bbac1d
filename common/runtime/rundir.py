"""The run directory every FedContrast run writes.

Layout::

    RUN_DIR/
      config.json       resolved settings, re-runnable as they are
      versions.json     python, package versions, git commit, command line
      metrics.csv       one row per epoch (local) or round (federated)
      metrics.jsonl     the same rows as JSON lines
      encoder.pt        latest encoder checkpoint (common.checkpoint format)
      summary.json      final figures
      curves.png        plots of the metric curves
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from common.config import save_config

PACKAGES = ("fedcontrast", "torch", "flwr", "grpcio", "protobuf", "opacus", "numpy", "scikit-learn")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the source tree this code runs from (None outside a git checkout)."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


#: Flags whose value is a secret: their values never reach a run file (a process's command
#: line, e.g. Flower's ``flwr-serverapp --token``, is recorded in versions.json).
#: A flag naming a file or folder (``--tokens-file``) holds a path, not the secret.
SECRET_FLAG = re.compile(r"^--?[\w-]*(token|password|passwd|secret|api-?key|private-?key)[\w-]*(?<!-file)(?<!-path)(?<!-dir)$", re.I)
REDACTED = "<redacted>"


def redact_argv(argv: list[str]) -> list[str]:
    """``argv`` with the value of every secret flag (``--token X``, ``--token=X``) replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        flag, eq, _value = arg.partition("=")
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif SECRET_FLAG.match(flag) and eq:
            out.append(f"{flag}={REDACTED}")
        else:
            out.append(arg)
            hide_next = bool(SECRET_FLAG.match(arg))
    return out


class RunDir:
    """Writes one run's outputs under ``path`` (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_csv = self.path / "metrics.csv"
        self.metrics_jsonl = self.path / "metrics.jsonl"

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, cfg: Any) -> None:
        save_config(cfg, self.path / "config.json")

    def write_versions(self, **extra: Any) -> None:
        info = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": package_versions(),
            "git_commit": git_commit(),
            "command": redact_argv(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        self.write_json("versions.json", info)

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``data`` as JSON atomically (temp file + rename)."""
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
        os.replace(tmp, target)
        return target

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_jsonl.exists():
            return []
        return [json.loads(line) for line in self.metrics_jsonl.read_text().splitlines() if line]

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one row to both metric files; the CSV header grows when new keys appear."""
        row = {k: _plain(v) for k, v in row.items()}
        with self.metrics_jsonl.open("a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        rows = self.read_metrics()
        header: list[str] = []
        for r in rows:
            header += [k for k in r if k not in header]
        tmp = self.metrics_csv.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_csv)

    def truncate_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the rows for which ``keep(row)`` holds (used when resuming a run)."""
        rows = [r for r in self.read_metrics() if keep(r)]
        self.metrics_jsonl.unlink(missing_ok=True)
        self.metrics_csv.unlink(missing_ok=True)
        for r in rows:
            self.append_metrics(r)

    def plot(self, x_key: str, metric_keys: Iterable[str], name: str = "curves.png",
             title: str = "", random_init: Mapping[str, float] | None = None) -> Path | None:
        """One panel per metric against ``x_key``; metrics absent from every row are skipped.

        ``random_init`` holds the untrained encoder's figures: each panel with one draws it
        as a dashed line labelled "random init", the level training has to beat.
        """
        rows = self.read_metrics()
        keys = [k for k in metric_keys if any(_finite(r.get(k)) for r in rows)]
        if not rows or not keys:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            pts = [(r[x_key], r[key]) for r in rows if x_key in r and _finite(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
            if random_init is not None and _finite(random_init.get(key)):
                ax.axhline(random_init[key], color="grey", linestyle="--", label="random init")
                ax.legend(loc="best", fontsize="small")
            ax.set_title(key)
            ax.set_xlabel(x_key)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        target = self.path / name
        fig.savefig(target, dpi=110)
        plt.close(fig)
        return target


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
