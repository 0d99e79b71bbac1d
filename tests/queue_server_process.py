"""``fedcontrast queue-server`` as a child process for tests: start it, read its address,
stop it (also when the test fails), and run it with bad flags."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The `fedcontrast` entry point as a user runs it: one-line errors, exit status 2.
_MAIN = "import sys; from common.runtime.cli import main; sys.exit(main(sys.argv[1:]))"


def fedcontrast(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``fedcontrast ARGS`` to completion (for commands that must refuse their flags)."""
    return subprocess.run(
        [sys.executable, "-c", _MAIN, *args], env=_env(), capture_output=True, text=True,
        timeout=timeout, check=False,
    )


class QueueServerProcess:
    """``fedcontrast [-v] queue-server ARGS`` until :meth:`stop`; its log is kept in a file.

    Use as a context manager, which stops it whatever happens in the block.
    """

    def __init__(self, args: list[str], *, verbose: bool = False) -> None:
        self.errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe nobody drains
        self.process = subprocess.Popen(
            [sys.executable, "-c", _MAIN, *(["-v"] if verbose else []), "queue-server", *args],
            env=_env(), stdout=subprocess.PIPE, stderr=self.errors, text=True,
        )
        try:  # also when the test times out while waiting for the first line
            line = self.process.stdout.readline()
            if "listening on" not in line:
                raise AssertionError(f"queue-server did not start: {line!r} {self.log()}")
        except BaseException:
            self.process.kill()
            self.process.wait()
            self.errors.close()
            raise
        self.address = line.split("listening on ", 1)[1].split()[0]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the server has written to stderr so far."""
        self.errors.seek(0)
        return self.errors.read()

    def stop(self) -> None:
        """SIGTERM and wait for a clean exit (status 0); killed if it does not come."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            assert self.process.wait(timeout=20) == 0, self.log()
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> QueueServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (its peak) of a Linux process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}
