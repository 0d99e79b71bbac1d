"""Queue snapshots read as input from a stranger: refused in one line naming the file,
or validated like a push; a killed save's temporary file is cleared."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from server.queue import NegativeQueue
from server.snapshot import SnapshotError, remove_stale_temporaries, write_snapshot

DIM = 4


def unit(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture
def saved(tmp_path):
    """A queue at version 1 with rows of two contributors, and its snapshot."""
    queue = NegativeQueue(16, DIM, max_age=2, quota_per_version=8)
    queue.push(0, unit(3), version=0)
    queue.advance(1)
    queue.push(1, unit(5, seed=1), version=1)
    return queue, queue.snapshot(tmp_path / "queue.pt")


def _refusal(path) -> str:
    before = NegativeQueue(16, DIM)
    before.push(0, unit(2, seed=7), version=0)
    stats = before.stats()
    with pytest.raises(SnapshotError) as info:
        before.restore(path)
    assert before.stats() == stats  # a refused snapshot changes nothing
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) < 400
    assert "weights_only" not in message
    return message


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes"])
def test_an_unreadable_snapshot_is_refused_in_one_line_naming_the_file(saved, damage):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "random bytes": os.urandom(len(data))}[damage])
    assert "not a readable snapshot" in _refusal(path)


def test_a_directory_is_refused_as_a_snapshot(tmp_path):
    assert "directory" in _refusal(tmp_path)


def test_a_flipped_byte_in_the_rows_fails_the_checksum(saved):
    queue, path = saved
    rows = torch.load(path, weights_only=True)["rows"]
    data = bytearray(path.read_bytes())
    at = data.find(rows.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))
    assert "checksum" in _refusal(path)


def _legacy(path, state: dict) -> None:
    """A snapshot of format 1, from before the checksum."""
    torch.save({"format": 1, **state}, path)


def _state(queue: NegativeQueue, path) -> dict:
    state = torch.load(queue.snapshot(path), weights_only=True)
    del state["format"], state["checksum"]
    return state


@pytest.mark.parametrize("fault, message", [
    ("nan row", "NaN"), ("norm 20", "norm 20"), ("version ahead", "row versions"),
    ("negative version", "row versions"), ("negative slot", "contributor"),
    ("float64 rows", "'rows'"), ("counters", "'counters'"), ("negative queue version", "version"),
])
def test_a_legacy_snapshot_is_validated_like_a_push(saved, tmp_path, fault, message):
    queue, _ = saved
    state = _state(queue, tmp_path / "fresh.pt")
    if fault == "nan row":
        state["rows"][1, 0] = float("nan")
    elif fault == "norm 20":
        state["rows"][2] *= 20
    elif fault == "version ahead":
        state["versions"][0] = 5
    elif fault == "negative version":
        state["versions"][0] = -1
    elif fault == "negative slot":
        state["contributors"][0] = -3
    elif fault == "float64 rows":
        state["rows"] = state["rows"].double()
    elif fault == "counters":
        state["counters"]["pushed_rows"] = "many"
    elif fault == "negative queue version":
        state["version"] = -1
    _legacy(tmp_path / "legacy.pt", state)
    assert message in _refusal(tmp_path / "legacy.pt")


def test_a_valid_legacy_snapshot_loads_with_a_warning(saved, tmp_path, caplog):
    queue, _ = saved
    _legacy(tmp_path / "legacy.pt", _state(queue, tmp_path / "fresh.pt"))
    restored = NegativeQueue(16, DIM, max_age=2, quota_per_version=8)
    with caplog.at_level(logging.WARNING, logger="server.queue"):
        restored.restore(tmp_path / "legacy.pt")
    assert restored.stats() == queue.stats()
    assert any("no checksum" in r.getMessage() for r in caplog.records)


def test_rows_over_todays_quota_are_dropped_with_a_warning(saved, caplog):
    _, path = saved  # contributor 1 has 5 rows at version 1, contributor 0 has 3 at 0
    stricter = NegativeQueue(16, DIM, max_age=2, quota_per_version=4)
    with caplog.at_level(logging.WARNING, logger="server.queue"):
        stricter.restore(path)
    assert len(stricter) == 3 + 4
    assert stricter.quota_remaining(1, 1) == 0
    assert any("over today's quota" in r.getMessage() for r in caplog.records)


def test_a_killed_save_leaves_a_temporary_file_that_the_next_start_removes(saved):
    queue, path = saved
    stale = path.parent / f"{path.name}.abc123.pt.tmp"  # what a kill during a save leaves
    stale.write_bytes(b"half a snapshot")
    other = path.parent / "other.pt.tmp"
    other.write_bytes(b"not ours")
    assert remove_stale_temporaries(path) == [stale]
    assert not stale.exists() and other.exists() and path.exists()


def test_the_checksum_covers_what_was_saved(tmp_path):
    state = {"dim": DIM, "version": 0, "rows": unit(2), "versions": torch.zeros(2, dtype=torch.int64),
             "contributors": torch.zeros(2, dtype=torch.int64),
             "quota_used": torch.zeros(0, 3, dtype=torch.int64), "counters": {"push_calls": 1}}
    path = write_snapshot(state, tmp_path / "q.pt")
    restored = NegativeQueue(4, DIM)
    restored.restore(path)
    assert len(restored) == 2 and restored.stats()["counters"]["push_calls"] == 1
