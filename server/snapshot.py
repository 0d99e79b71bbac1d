"""Queue snapshots: the negative queue's contents in one file, written atomically.

A snapshot is a ``torch.save`` dict: ``format`` (:data:`SNAPSHOT_FORMAT`), ``dim``,
``version``, the occupied ``rows``, their ``versions`` and ``contributors`` (oldest
insertion first), ``quota_used`` ((m, 3) int64: contributor, version, rows),
``counters`` and ``checksum``, the SHA-256 of all of them (:func:`state_digest`). The
queue's configuration is not in it: a restored queue keeps its own.

A snapshot is read like a request from a stranger: loaded with ``weights_only`` (no
code runs), every field's type, shape and range checked, the checksum compared. Any
fault is a :class:`SnapshotError` of one line that names the file. Format 1, from
before the checksum, has none to compare (:func:`read_snapshot` says so, and the
queue warns once it has validated the rows). The rows themselves (finite, unit norm)
and the quotas are checked by :meth:`server.queue.NegativeQueue.restore`, which knows
the tolerance and today's quota.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.runtime.text import brief

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 2
#: Formats :func:`read_snapshot` reads: 1 (no checksum) and today's.
READABLE_FORMATS = (1, SNAPSHOT_FORMAT)
_TMP_SUFFIX = ".pt.tmp"
_INT_FIELDS = ("dim", "version")


class SnapshotError(ValueError):
    """A file that is no valid queue snapshot; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(brief(f"queue snapshot {path}: {problem}", 300))


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a snapshot's contents: every field but ``format`` and ``checksum``."""
    h = hashlib.sha256()
    for key in _INT_FIELDS:
        h.update(f"{key}={int(state[key])};".encode())
    for key in ("rows", "versions", "contributors", "quota_used"):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for key, value in sorted(state["counters"].items()):
        h.update(f"{key}={int(value)};".encode())
    return h.hexdigest()


def write_snapshot(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save ``state`` with its checksum to ``path``: a temporary file next to it, fsynced
    and renamed over it, so a crash leaves either the old snapshot or the new one (and
    perhaps a temporary file, which :func:`remove_stale_temporaries` clears)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": SNAPSHOT_FORMAT, **state, "checksum": state_digest(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a save to ``path`` left when its process was killed;
    returns them. Call it before a process starts saving to ``path``."""
    path = Path(path)
    stale = sorted(path.parent.glob(f"{path.name}.*{_TMP_SUFFIX}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
        logger.warning("removed %s, left by a snapshot save that did not finish", tmp)
    return stale


def read_snapshot(path: str | os.PathLike, dim: int) -> dict[str, Any]:
    """The snapshot at ``path``, its structure checked for rows of dimension ``dim``.

    The returned state's ``checksum`` is ``None`` for a format-1 snapshot (none was
    written); otherwise it matched the contents.

    Raises:
        SnapshotError: the file cannot be read, is no queue snapshot of a readable
            format, holds fields of the wrong type, shape or range, another dim, or
            contents that do not match its checksum.
    """
    path = Path(path)
    if path.is_dir():
        raise SnapshotError(path, "is a directory, not a snapshot file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise SnapshotError(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - whatever torch makes of a damaged file
        # The exception's text is left out: it can be long, and torch's advises loading
        # with weights_only=False, which would run code from the file.
        raise SnapshotError(
            path, f"is not a readable snapshot (empty, truncated or damaged: {type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise SnapshotError(path, f"is not a queue snapshot of format {READABLE_FORMATS}")
    problem = _structure_problem(state, dim)
    if problem:
        raise SnapshotError(path, problem)
    if state["format"] == 1:
        state["checksum"] = None
    elif state.get("checksum") != state_digest(state):
        raise SnapshotError(path, "checksum does not match its contents (changed or damaged "
                                  "since it was written)")
    return state


def _structure_problem(state: dict[str, Any], dim: int) -> str | None:
    """What is wrong with the fields of ``state``, or None."""
    for key in _INT_FIELDS:
        if type(state.get(key)) is not int or state[key] < 0:
            return f"{key!r} is not an int >= 0"
    if state["dim"] != dim:
        return f"holds rows of dim {state['dim']}, this queue has dim {dim}"
    tensors = {
        "rows": (2, (torch.float32, torch.float16)),
        "versions": (1, (torch.int64,)),
        "contributors": (1, (torch.int64,)),
        "quota_used": (2, (torch.int64,)),
    }
    for key, (rank, dtypes) in tensors.items():
        t = state.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != rank or t.dtype not in dtypes:
            return f"{key!r} is not a {rank}-D tensor of {' or '.join(map(str, dtypes))}"
    rows, versions, contributors = state["rows"], state["versions"], state["contributors"]
    n = rows.shape[0]
    if not (rows.shape == (n, dim) and versions.shape == (n,) and contributors.shape == (n,)):
        return "has inconsistent row, version and contributor shapes"
    if n and not (0 <= int(versions.min()) and int(versions.max()) <= state["version"]):
        return f"has row versions outside 0..{state['version']}"
    if n and int(contributors.min()) < 0:
        return "has a negative contributor slot"
    used = state["quota_used"]
    if used.shape[1] != 3 or (used.numel() and int(used.min()) < 0):
        return "'quota_used' is not (m, 3) counts >= 0"
    if used.numel() and int(used[:, 1].max()) > state["version"]:
        return f"'quota_used' names a version after {state['version']}"
    counters = state.get("counters")
    if not isinstance(counters, dict) or not all(
        type(k) is str and type(v) is int and v >= 0 for k, v in counters.items()
    ):
        return "'counters' is not a dict of names to ints >= 0"
    return None
