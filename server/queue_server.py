"""``fedcontrast queue-server``: run the negative queue service on its own, outside a
Flower run (what for: the command's description in :mod:`server.commands`). Stops
gracefully on Ctrl-C or SIGTERM and writes the snapshot.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import stat
import threading
from pathlib import Path

import torch

from common.errors import UsageError
from server.commands import STORAGE_DTYPE_NAMES
from server.queue import NegativeQueue
from server.service import QueueServer, ServerTLS

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPE_NAMES}


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


def run(args: argparse.Namespace) -> int:
    tls = _tls(args)
    tokens, admins = read_tokens_file(args.tokens_file)
    if args.snapshot_every < 0:
        raise UsageError(f"--snapshot-every must be >= 0, got {args.snapshot_every}")
    if args.torch_threads < 1:
        raise UsageError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    torch.set_num_threads(args.torch_threads)
    queue = NegativeQueue(
        args.capacity,
        args.dim,
        max_age=args.max_age,
        quota_per_version=args.quota,
        device=args.device,
        storage_dtype=STORAGE_DTYPES[args.storage_dtype],
    )
    snapshot = Path(args.snapshot) if args.snapshot else None
    if snapshot is not None and snapshot.exists():
        queue.restore(snapshot)
    server = QueueServer(
        queue,
        tokens,
        admin_tokens=admins,
        host=args.host,
        port=args.port,
        tls=tls,
        max_message_bytes=int(args.max_message_mb * 2**20),
    )

    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.start()
        print(f"queue-server listening on {server.address} (pid {os.getpid()})", flush=True)
        while not stop.wait(args.snapshot_every or None):
            if snapshot is not None:
                queue.snapshot(snapshot)
    finally:
        server.stop(grace=2.0)
        if snapshot is not None:
            queue.snapshot(snapshot)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("queue-server stopped", flush=True)
    return 0
