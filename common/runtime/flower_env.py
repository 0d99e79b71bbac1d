"""Starting and stopping Flower's processes: environment, connection config, process trees.

Used by ``fedcontrast server`` (SuperLink, ``flwr run``), ``fedcontrast client``
(SuperNode) and the end-to-end tests. Nothing here imports Flower: these are the
operating-system facts Flower 1.41 depends on.

- Flower's processes start their helpers by name (``flower-superexec``,
  ``flwr-serverapp``, ``flwr-clientapp``), so the directory of this interpreter's
  scripts must be on ``PATH``.
- ``flwr`` reads ``$FLWR_HOME/config.toml`` to find a SuperLink; when the file is
  missing it writes a default that starts a local SuperLink on its own. Every
  caller therefore gets a private ``FLWR_HOME`` with an explicit config.
- The SuperLink starts ``flower-superexec`` in a new session, and Ray helpers can
  outlive their parent. Stopping "everything we started" therefore means every
  process in the sessions of our processes and of all their descendants
  (:class:`ProcessTree`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


def scripts_dir() -> Path:
    """The directory holding this interpreter's console scripts (``.venv/bin``)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: private ``FLWR_HOME``, no telemetry, our scripts."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(scripts_dir()), env.get("PATH", "")])
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def toml_value(value: bool | int | float | str) -> str:
    """One TOML value (strings as basic strings: JSON escaping is valid TOML for them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_superlink_config(
    flwr_home: str | Path,
    name: str,
    address: str,
    *,
    root_certificates: str | Path | None = None,
) -> Path:
    """Write ``FLWR_HOME/config.toml`` naming one SuperLink connection, the default.

    Without ``root_certificates`` the connection is insecure (loopback, tests).
    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {toml_value(name)}", "", f"[superlink.{name}]",
             f"address = {toml_value(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once something accepts TCP connections on ``host:port`` (False after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) of every live process we can read in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces and parentheses):
        # state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":  # zombies are gone already; only their parent's wait() is due
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """``roots`` and every live process below them (``table``: :func:`_proc_table`'s view)."""
    table = _proc_table() if table is None else table
    keep = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _sid) in table.items():
            if pid not in keep and ppid in keep:
                keep.add(pid)
                changed = True
    return keep


def _signal_sessions(sessions: set[int], sig: int) -> None:
    me = os.getpid()
    for pid, (_ppid, sid) in _proc_table().items():
        if sid in sessions and pid != me:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _alive(sessions: set[int]) -> bool:
    return any(sid in sessions for _ppid, sid in _proc_table().values())


#: The signals that stop a command and, through its ``finally``, what it started.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def catch_stop_signals() -> dict[int, Any]:
    """Make SIGTERM and SIGINT raise ``KeyboardInterrupt`` in the main thread, so the
    caller's ``finally`` stops its process tree; returns the handlers to put back with
    :func:`restore_signal_handlers`.

    SIGINT is set too, not left to Python: a shell starts background jobs with SIGINT
    ignored, Python then installs no handler, and ``kill -INT`` would do nothing.
    """
    return {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}


def restore_signal_handlers(previous: Mapping[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """Ignore SIGTERM and SIGINT until the handlers are set again."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    # Once: the stop is under way, and a second signal (Ctrl-C pressed again, or a wrapper
    # such as `timeout` passing on the one the terminal sent it) must not cut short the
    # clean-up that follows, or what the command started would be left running.
    ignore_stop_signals()
    raise KeyboardInterrupt


@contextmanager
def stopped_on_exit(tree: ProcessTree) -> Iterator[ProcessTree]:
    """Run the block with SIGTERM and SIGINT raising ``KeyboardInterrupt`` (the first one
    only); however the block ends, stop ``tree`` with both signals ignored, so that more of
    them cannot interrupt the stop, then put the previous handlers back."""
    previous = catch_stop_signals()
    try:
        yield tree
    finally:
        ignore_stop_signals()
        try:
            tree.stop()
        finally:
            restore_signal_handlers(previous)


class ProcessTree:
    """Processes started in their own sessions, stopped together with everything they started.

    Usage::

        with ProcessTree() as procs:
            procs.start(["flower-superlink", ...], log=path, env=env)
            ...
        # every process in the sessions of those processes and their descendants is gone
    """

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self._logs: list[IO[bytes]] = []
        self._seen: set[int] = set()

    def start(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: str | Path | None = None,
        cwd: str | Path | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` in a new session; its output goes to ``log`` (appended) or ``stdout``."""
        out: IO[bytes] | int | None = stdout
        if log is not None:
            handle = open(log, "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(handle)
            out = handle
        proc = subprocess.Popen(
            list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
            stdout=out, stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.processes.append(proc)
        logger.debug("started %s (pid %d)", cmd[0], proc.pid)
        return proc

    def sessions(self, roots: Sequence[subprocess.Popen] | None = None) -> set[int]:
        """Session ids of ``roots`` (default: all our processes) and of their live descendants.

        Sessions seen once are remembered, so helpers orphaned by a crashed parent are
        still found by :meth:`stop`.
        """
        roots = self.processes if roots is None else roots
        table = _proc_table()
        keep = descendants({p.pid for p in roots if p.pid in table}, table)
        found = {table[pid][1] for pid in keep} | {p.pid for p in roots}
        # Children were started in new sessions, so ours is never among them; guard anyway
        # so that a mistake cannot signal the caller.
        found.discard(os.getsid(0))
        self._seen |= found
        return found if roots is not self.processes else set(self._seen)

    def stop(self, grace: float = 5.0, roots: Sequence[subprocess.Popen] | None = None) -> None:
        """SIGTERM the sessions of ``roots`` (default: all), wait ``grace`` s, SIGKILL the rest."""
        sessions = self.sessions(roots)
        _signal_sessions(sessions, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(sessions):
            time.sleep(0.1)
        _signal_sessions(sessions, signal.SIGKILL)
        for proc in self.processes if roots is None else roots:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("process %d did not exit after SIGKILL", proc.pid)
        if roots is None:
            for handle in self._logs:
                handle.close()
            self._logs.clear()

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL ``proc`` and everything in its sessions at once (a crash, for tests)."""
        sessions = self.sessions([proc])
        _signal_sessions(sessions, signal.SIGKILL)
        proc.wait(timeout=10)

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def route_logs_to_flower(names: Sequence[str] = ("common", "client", "server")) -> None:
    """In a Flower app process, show our packages' INFO logs where Flower's own logs go.

    ``flwr-serverapp`` ships what its ``flwr`` logger prints to ``flwr log`` and
    ``flwr run --stream``; a logger without handlers would print nothing below WARNING.
    """
    flower = logging.getLogger("flwr")
    for name in names:
        ours = logging.getLogger(name)
        if not ours.handlers:
            for handler in flower.handlers:
                ours.addHandler(handler)
            # Flower's handlers show it once; the simulation engine also gives the root
            # logger a handler, which would print every line a second time.
            ours.propagate = not flower.handlers
        ours.setLevel(logging.INFO)
