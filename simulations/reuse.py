"""Runs that ``compare`` and ``privacy`` finished, kept so a rerun goes on from them.

Both commands run many simulations into one ``--out``, one directory a run. A run that
finished leaves :data:`RECORD` there: the settings that decide its figures and the
figures. The same command into the same ``--out`` then reuses every run whose record
has the same settings, and trains the rest. Before anything trains, every record is
checked: one with other settings is refused with the differences named, so one table
never mixes settings. A directory without a readable record (a run that failed or was
interrupted) is moved aside to ``NAME.unfinished-K``, kept for its logs, and trained
again.

The settings compared: the run's config except what does not change the figures
(:data:`NOT_TRAINING`), the number of clients and GPU share, the device the command
resolves, a SHA-256 of the data as loaded (so a copy under another path is the same
data), and the code (the package version and git commit, with a digest of uncommitted
changes). Plug-in code outside this checkout is not part of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from common.config import FedConfig, resolve_device
from common.datasets import Dataset
from common.errors import UsageError
from common.runtime.rundir import RunDir, git_commit, package_versions

logger = logging.getLogger(__name__)

#: Written into a run's directory once it finished and was evaluated.
RECORD = "arm.json"
#: Settings that do not change what a run trains or how it is evaluated: a rerun may
#: change them and still reuse finished runs.
NOT_TRAINING = ("round_timeout", "wait_nodes_timeout", "queue_port", "queue_host")


@functools.cache
def code_identity() -> str:
    """This code: the package version, the git commit when run from a checkout, and a
    digest of the checkout's uncommitted changes to tracked files."""
    identity = f"fedcontrast {package_versions(['fedcontrast'])['fedcontrast']}"
    commit = git_commit()
    if commit is None:
        return identity
    identity += f" {commit}"
    if commit.endswith("-dirty"):
        try:
            diff = subprocess.run(["git", "diff", "HEAD"], cwd=Path(__file__).resolve().parent,
                                  capture_output=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            diff = b"unknown"
        identity += f" changes {hashlib.sha256(diff).hexdigest()[:16]}"
    return identity


def data_digest(data: Dataset) -> str:
    """SHA-256 over a dataset's examples, labels and class names (train and held-out)."""
    h = hashlib.sha256(json.dumps(list(data.class_names)).encode())
    for tensor in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reuse_key(kind: str, cfg: FedConfig, num_clients: int, client_gpus: float,
                 data: str) -> dict[str, Any]:
    """What decides one run's figures (see the module doc); ``data`` is its
    :func:`data_digest`, which stands in for the dataset's path."""
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_TRAINING and k != "dataset"}
    settings = {"kind": kind, "config": config, "num_clients": num_clients,
                "client_gpus": float(client_gpus), "device": str(resolve_device(cfg.device)),
                "data": data, "code": code_identity()}
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the record


def _read(run_out: Path) -> dict[str, Any] | None:
    """The record in ``run_out``; None when there is none or it cannot be read (a run
    stopped while writing it)."""
    try:
        saved = json.loads((run_out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not {"settings", "result"} <= saved.keys():
        return None
    return saved


def refuse_other_settings(planned: Iterable[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse, before anything trains or moves, a plan whose runs were finished with other
    settings."""
    for run_out, settings in planned:
        saved = _read(run_out)
        if saved is None or saved["settings"] == settings:
            continue
        before, now = _flat(saved["settings"]), _flat(settings)
        changed = [f"{_name(k)} {before.get(k)} -> {now.get(k)}"
                   for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
        raise UsageError(
            f"{run_out} holds a finished run with other settings ({'; '.join(changed)}): "
            "choose another --out, or rerun with the settings it had to go on with it")


def run_or_reuse(label: str, run_out: Path, settings: dict[str, Any],
                 train: Callable[[], dict[str, Any]], console: Console,
                 kept_in: Path | None) -> dict[str, Any]:
    """One run: its figures from the record of a finished run with these settings in
    ``run_out`` (marked ``reused``), else from ``train()``, then recorded.

    When it fails or is interrupted, the message says where the finished runs are kept
    (``kept_in``, the ``--out`` to give again; None: they were in a temporary directory).
    """
    saved = _read(run_out)
    if saved is not None and saved["settings"] == settings:
        console.print(f"[bold]{label}[/bold]: finished before in {run_out}; reused")
        return {**saved["result"], "reused": label}
    refuse_other_settings([(run_out, settings)])
    if run_out.exists():
        k = 1
        while (aside := run_out.with_name(f"{run_out.name}.unfinished-{k}")).exists():
            k += 1
        run_out.rename(aside)
        logger.warning("%s holds no finished run; moved aside to %s, training it again", run_out, aside)
    console.print(f"[bold]{label}[/bold] -> {run_out}")
    hint = (f"the runs finished so far are kept in {kept_in}: the same command with --out "
            f"{kept_in} goes on from {label}" if kept_in is not None else
            "the runs finished so far were in a temporary directory, which is removed")
    try:
        result = train()
    except UsageError as exc:
        raise UsageError(f"{exc}\n{hint}") from exc
    except KeyboardInterrupt:
        console.print(f"interrupted during {label}; {hint}", markup=False, highlight=False)
        raise
    except Exception:
        console.print(f"{label} failed; {hint}", markup=False, highlight=False)
        raise
    RunDir(run_out).write_json(RECORD, {"settings": settings, "result": result})
    return result


def reused_note(results: Iterable[dict[str, Any]]) -> str:
    """A sentence naming the runs a table took from an earlier command (``""`` if none)."""
    labels = [r["reused"] for r in results if r.get("reused")]
    if not labels:
        return ""
    return (f"Reused from an earlier command into the same directory, their figures and wall "
            f"times those runs': {', '.join(labels)}.")


def _name(key: str) -> str:
    """``config.lr`` -> ``--lr``; the others by what they are."""
    if key.startswith("config.") or key in ("num_clients", "client_gpus", "device"):
        return "--" + key.removeprefix("config.").replace("_", "-")
    return {"data": "data (SHA-256)"}.get(key, key)


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
