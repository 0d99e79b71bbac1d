"""Shared fixtures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

#: A queue token as the ServerApp makes them (``secrets.token_urlsafe(32)``: 43 characters of
#: the URL-safe alphabet), standing alone. Random, so it mixes digits and both cases; asking
#: for all three keeps long identifiers in copied source files out (one token in ~1,500 has
#: no digit and goes unseen).
#: Or one of Flower's own process tokens (``flwr-serverapp --token``, ``flwr-simulation
#: --token``): a long run of hex digits, longer than any digest a run records (SHA-256: 64).
#: A token may follow an escaped newline or tab, as a log that prints a string's repr has it.
TOKEN_SHAPE = re.compile(rb"(?:(?<![A-Za-z0-9_-])|(?<=\\[nrt]))(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Z])"
                         rb"(?=[A-Za-z0-9_-]*[a-z])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"
                         rb"|(?<![0-9a-f])[0-9a-f]{96,}(?![0-9a-f])")


BASE64_BLOB = re.compile(rb"[A-Za-z0-9+/=]+")


def _in_key_material(data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` lies inside a standard-base64 blob of 64 characters or
    more that holds a ``+`` or ``/``: a PEM line, an OpenSSH key, a key a log prints with
    escaped newlines. Queue tokens are URL-safe base64 (no ``+``, ``/`` or padding), so a
    43-character run there is the blob's, cut out by chance between two of its ``+``/``/``.
    """
    lo = start
    while lo > 0 and BASE64_BLOB.fullmatch(data[lo - 1:lo]):
        lo -= 1
    blob = BASE64_BLOB.match(data, lo)
    text = blob.group() if blob else b""
    return len(text) >= 64 and blob.end() >= end and (b"+" in text or b"/" in text)


def secrets_on_disk(root: Path, secrets: list[bytes] = ()) -> list[str]:
    """Every file under ``root`` holding a token-shaped string or one of ``secrets``, with
    what it holds: run directories, logs, state and Flower's homes alike.

    Token shapes inside key material (see ``_in_key_material``) are not counted: a public
    key's base64 can hold a 43-character run between a ``+`` and a ``/`` by chance, in an
    OpenSSH ``*.pub`` file as in a log that prints the key. ``secrets`` are looked for
    everywhere.
    """
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        hits = [m.group().decode() for m in TOKEN_SHAPE.finditer(data)
                if not _in_key_material(data, *m.span())]
        hits += [f"secret #{i}" for i, secret in enumerate(secrets) if secret in data]
        if hits:
            found.append(f"{path.relative_to(root)}: {hits[:3]}")
    return found


@pytest.fixture
def flower_task_identity():
    """Let tests build Flower Messages outside a Flower process.

    Flower fills a message's run id and source task from ``TaskIdentity``, which its
    own processes set at start-up.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def one_thread():
    """One torch thread for the test: on two shared cores several times faster."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
