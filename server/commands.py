"""The server package's ``fedcontrast`` commands: names, help and where their code is.

Their flags are defined here too. Kept free of heavy imports (torch, Flower, gRPC), so
that ``fedcontrast --help`` and ``fedcontrast NAME --help`` answer at once and a
mistyped flag is refused at once; each command's code is imported when it runs.
"""

import argparse
from pathlib import Path

from common.config import (
    DEFAULT_MAX_CALLS_PER_TOKEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    FedConfig,
    add_config_arguments,
)
from common.runtime.cli import Command, deferred, port_number

#: The queue's storage precisions: torch dtype names (``server.queue_server`` maps them).
STORAGE_DTYPE_NAMES = ("float16", "float32")
TOKENS_FILE_HELP = (
    "tokens file: one 'TOKEN SLOT' pair per line, SLOT a contributor number >= 0 or the word "
    "'admin' (may call Advance and Stats only: no Push, no Pull); '#' starts a comment; keep it "
    "private (mode 600)"
)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="run directory (default: --resume's directory, or runs/fed-DATASET-TIME)")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR",
                     help="continue this run directory up to --rounds; its config.json is the base")
    run.add_argument("--config", type=Path, default=None, metavar="PATH",
                     help="start from a saved config.json (or a run directory); flags override it")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="stop the run after this many seconds (default: no limit)")
    link = parser.add_argument_group("superlink")
    link.add_argument("--host", default="127.0.0.1",
                      help="address the SuperLink listens on (SuperNodes and flwr connect here)")
    link.add_argument("--port", type=port_number, default=9092, help="the SuperLink's port")
    link.add_argument("--superlink", default=None, metavar="HOST:PORT",
                      help="use this running SuperLink instead of starting one")
    link.add_argument("--insecure", action="store_true",
                      help="no TLS and no node authentication (loopback and tests only)")
    link.add_argument("--ssl-ca-certfile", type=Path, metavar="PEM",
                      help="CA certificate (PEM) of the SuperLink's certificate")
    link.add_argument("--ssl-certfile", type=Path, metavar="PEM",
                      help="the SuperLink's certificate (PEM); also the negative queue's unless "
                           "--queue-ssl-certfile, so it must name --queue-host too (a SAN for "
                           "that IP or DNS name)")
    link.add_argument("--ssl-keyfile", type=Path, metavar="PEM",
                      help="the SuperLink's private key (PEM); also the negative queue's unless "
                           "--queue-ssl-keyfile")
    link.add_argument("--auth-list-public-keys", type=Path, nargs="+", metavar="FILE",
                      help="authenticate SuperNodes (needs TLS): only nodes holding these keys may "
                           "join. Each FILE holds OpenSSH ECDSA public keys (`ssh-keygen -t ecdsa "
                           "-b 384` writes KEY.pub), one or several separated by commas or newlines. "
                           "They are registered once the SuperLink is up: start the clients after "
                           "the server logs that the keys are registered")
    link.add_argument("--flwr-home", type=Path, default=None, metavar="DIR",
                      help="Flower's working directory (default: a temporary one, removed at exit)")
    queue = parser.add_argument_group("negative queue (served by the ServerApp)")
    queue.add_argument("--queue-ssl-certfile", type=Path, metavar="PEM", default=None,
                       help="the queue's TLS certificate (PEM), signed by the CA the clients "
                            "trust, naming --queue-host (default: --ssl-certfile). Read where "
                            "the ServerApp runs (with --superlink: that machine)")
    queue.add_argument("--queue-ssl-keyfile", type=Path, metavar="PEM", default=None,
                       help="the queue's private key (PEM; default: --ssl-keyfile)")
    add_config_arguments(parser, FedConfig)


def add_queue_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=port_number, default=0, help="port; 0 picks a free one (printed)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--capacity", type=int, default=4096, help="rows kept (ring buffer)")
    parser.add_argument("--max-age", type=int, default=2, help="rounds a row is kept")
    parser.add_argument("--quota", type=int, default=None,
                        help="most rows one contributor may push per version; unset: no quota")
    parser.add_argument("--device", default="cpu",
                        help="torch device holding the rows: cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--storage-dtype",
        choices=STORAGE_DTYPE_NAMES,
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
        help="largest gRPC message accepted or sent, in MiB (at most 2047, gRPC's limit)",
    )
    parser.add_argument(
        "--max-calls-per-token",
        type=int,
        default=DEFAULT_MAX_CALLS_PER_TOKEN,
        help="calls one token may have in flight at once; one more is refused with "
        "RESOURCE_EXHAUSTED, so one token holder keeps at most this many of the 8 RPC "
        "threads busy (0: no limit)",
    )


server_command = Command(
    name="server",
    help="run a federation: a Flower SuperLink and the FedContrast ServerApp",
    description=(
        "Start a Flower SuperLink (or use --superlink), run FedContrast on the SuperNodes "
        "that connect to it (start them with `fedcontrast client`), show per-round "
        "progress and write the run directory."
    ),
    add_arguments=add_server_arguments,
    run=deferred("server.deploy:deploy"),
)

queue_server_command = Command(
    name="queue-server",
    help="serve the global negative queue on its own (gRPC, token auth, optional TLS)",
    description=(
        "Inside a Flower run the ServerApp owns the queue and starts the service itself; "
        "this command is for operating one outside a run (a long-lived queue, tests of a "
        "deployment, benchmarks). It serves until Ctrl-C or SIGTERM, then stops "
        "gracefully and writes the snapshot."
    ),
    add_arguments=add_queue_server_arguments,
    run=deferred("server.queue_server:run"),
)
