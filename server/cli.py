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

from common.cli import UsageError
from server.queue import NegativeQueue
from server.service import DEFAULT_MAX_MESSAGE_BYTES, QueueServer, ServerTLS

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TOKENS_FILE_HELP = (
    "tokens file: one 'TOKEN SLOT' pair per line, SLOT a contributor number >= 0 or the word "
    "'admin' (may call Advance and Stats, owns no rows); '#' starts a comment; keep it private "
    "(mode 600)"
)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (printed)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--capacity", type=int, default=4096, help="rows kept (ring buffer)")
    parser.add_argument("--max-age", type=int, default=2, help="rounds a row is kept")
    parser.add_argument(
        "--quota",
        type=int,
        default=None,
        help="most rows one contributor may push per version; unset: no quota",
    )
    parser.add_argument("--device", default="cpu", help="torch device holding the rows")
    parser.add_argument(
        "--storage-dtype",
        choices=sorted(STORAGE_DTYPES),
        default="float32",
        help="precision of the stored rows; float16 halves memory and the cost of float16 pulls",
    )
    parser.add_argument("--tokens-file", required=True, help=TOKENS_FILE_HELP)
    parser.add_argument("--tls-cert", help="PEM server certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM server private key (with --tls-cert)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve without TLS (loopback only; warns on other hosts)",
    )
    parser.add_argument(
        "--snapshot",
        metavar="PATH",
        help="restore from PATH at start if it exists; save to it at stop",
    )
    parser.add_argument(
        "--snapshot-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also save the snapshot this often (0: only at stop)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads; concurrency comes from the RPC threads, and "
        "more intra-op threads only oversubscribe the cores",
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
        help="largest gRPC message accepted or sent, in MiB",
    )


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
