"""Queue snapshots: the negative queue's contents in one file, written atomically.

A snapshot is a ``torch.save`` dict: ``format`` (:data:`SNAPSHOT_FORMAT`), ``dim``,
``version``, the occupied ``rows``, their ``versions`` and ``contributors`` (oldest
insertion first), ``quota_used`` ((m, 3) int64: contributor, version, rows) and
``counters``. The queue's configuration is not in it: a restored queue keeps its own.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SNAPSHOT_FORMAT = 1


def write_snapshot(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save ``state`` to ``path``: a temporary file next to it, fsynced and renamed over
    it, so a crash leaves either the old snapshot or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".pt.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": SNAPSHOT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_snapshot(path: str | os.PathLike, dim: int) -> dict[str, Any]:
    """The snapshot at ``path``, checked to hold rows of dimension ``dim``.

    Raises:
        ValueError: the file is not a queue snapshot, its dim differs, or its row,
            version and contributor shapes disagree.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a queue snapshot (format {SNAPSHOT_FORMAT})")
    if state["dim"] != dim:
        raise ValueError(f"{path} holds rows of dim {state['dim']}, this queue has dim {dim}")
    rows, versions, contributors = state["rows"], state["versions"], state["contributors"]
    n = rows.shape[0]
    if not (rows.shape == (n, dim) and versions.shape == (n,) and contributors.shape == (n,)):
        raise ValueError(f"{path} has inconsistent row, version and contributor shapes")
    return state
