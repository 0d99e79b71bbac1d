"""``fedcontrast queue-server``: run the negative queue service on its own, outside a
Flower run (what for: the command's description in :mod:`server.commands`). Stops
gracefully on Ctrl-C or SIGTERM and writes the snapshot.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import signal
import socket
import stat
import time
from pathlib import Path

import torch

from common.config import resolve_device
from common.errors import UsageError
from server.commands import STORAGE_DTYPE_NAMES
from server.queue import NegativeQueue
from server.service import QueueServer, ServerTLS
from server.snapshot import remove_stale_temporaries

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPE_NAMES}
#: How often the serving loop looks for a stop signal (Ctrl-C, SIGTERM), in seconds.
STOP_POLL_S = 0.1


def read_tokens_file(path: str | Path) -> tuple[dict[str, int], set[str]]:
    """Parse a tokens file into (contributor tokens -> slot, admin tokens)."""
    path = Path(path)
    tokens: dict[str, int] = {}
    admins: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise UsageError(f"{path}:{number}: expected 'TOKEN SLOT', got {len(fields)} fields")
        token, slot = fields
        if token in tokens or token in admins:
            raise UsageError(f"{path}:{number}: token listed twice")
        if slot == "admin":
            admins.add(token)
        elif slot.isdigit():
            tokens[token] = int(slot)
        else:
            raise UsageError(
                f"{path}:{number}: slot must be a number >= 0 or 'admin', got {slot!r}"
            )
    if not tokens and not admins:
        raise UsageError(f"{path} lists no tokens")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users; chmod 600 it", path)
    return tokens, admins


def _tls(args: argparse.Namespace) -> ServerTLS | None:
    if args.insecure:
        if args.tls_cert or args.tls_key:
            raise UsageError("--insecure and --tls-cert/--tls-key exclude each other")
        if not _is_loopback(args.host):
            logger.warning(
                "serving without TLS on %s: tokens and embeddings travel in clear", args.host
            )
        return None
    if not (args.tls_cert and args.tls_key):
        raise UsageError("pass --tls-cert and --tls-key, or --insecure on loopback")
    return ServerTLS.from_files(args.tls_cert, args.tls_key)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: gRPC's message size limits are C ints: at most 2 GiB - 1 bytes.
MAX_MESSAGE_MB = 2047


def _check_flags(args: argparse.Namespace) -> torch.device:
    """The device for the rows; UsageError for a flag that would otherwise fail later,
    with a traceback."""
    if args.snapshot_every < 0:
        raise UsageError(f"--snapshot-every must be >= 0, got {args.snapshot_every}")
    if args.torch_threads < 1:
        raise UsageError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if not 0 < args.max_message_mb <= MAX_MESSAGE_MB:
        raise UsageError(
            f"--max-message-mb must be in (0, {MAX_MESSAGE_MB}] (gRPC's limit), "
            f"got {args.max_message_mb}"
        )
    if args.max_calls_per_token < 0:
        raise UsageError(f"--max-calls-per-token must be >= 0, got {args.max_calls_per_token}")
    if args.snapshot is not None:
        snapshot = Path(args.snapshot)
        if snapshot.is_dir():
            raise UsageError(f"--snapshot {snapshot} is a directory; name a file in it")
    try:
        return resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_port_free(host: str, port: int) -> None:
    """UsageError when ``host:port`` cannot be bound (in use, or no such address), said in
    one line before gRPC tries and logs its own multi-line error."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC binds: a port whose last connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})"
            ) from None


def run(args: argparse.Namespace) -> int:
    device = _check_flags(args)
    tls = _tls(args)
    tokens, admins = read_tokens_file(args.tokens_file)
    torch.set_num_threads(args.torch_threads)
    queue = NegativeQueue(
        args.capacity,
        args.dim,
        max_age=args.max_age,
        quota_per_version=args.quota,
        device=device,
        storage_dtype=STORAGE_DTYPES[args.storage_dtype],
    )
    _check_port_free(args.host, args.port)
    snapshot = Path(args.snapshot) if args.snapshot else None
    if snapshot is not None:
        remove_stale_temporaries(snapshot)
        if snapshot.exists():
            queue.restore(snapshot)
    server = QueueServer(
        queue,
        tokens,
        admin_tokens=admins,
        host=args.host,
        port=args.port,
        tls=tls,
        max_message_bytes=int(args.max_message_mb * 2**20),
        max_calls_per_token=args.max_calls_per_token or None,
    )
    try:
        server.start()
    except OSError as exc:
        raise UsageError(f"--host {args.host} --port {args.port}: {exc}") from None

    # The handler only appends to a list. Setting a threading.Event there could deadlock: the
    # handler runs in the main thread between two bytecodes, which may be inside Event.wait
    # while that thread holds the event's lock (seen as a hang on SIGTERM under load).
    requested: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: requested.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        print(f"queue-server listening on {server.address} (pid {os.getpid()})", flush=True)
        every = args.snapshot_every or math.inf
        due = time.monotonic() + every
        while not requested:
            time.sleep(STOP_POLL_S)
            if snapshot is not None and time.monotonic() >= due:
                queue.snapshot(snapshot)
                due = time.monotonic() + every
    finally:
        server.stop(grace=2.0)
        if snapshot is not None:
            queue.snapshot(snapshot)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("queue-server stopped", flush=True)
    return 0
