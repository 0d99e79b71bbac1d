"""``fedcontrast client``: one Flower SuperNode that trains FedContrast on this machine's data.

Runs ``flower-supernode`` with the node config the ClientApp reads (see
:mod:`client.settings`): ``partition-id``/``num-partitions`` or ``data-path``,
``client-id``, an absolute ``state-dir`` and, with ``--root-certificates``,
``queue-root-certificates`` (the same CA verifies the negative queue's TLS). The
SuperNode gets its own ``FLWR_HOME`` (inside the state directory unless
``--flwr-home`` says otherwise) and its own ClientAppIo port, so several clients can
share a host. Ctrl-C and SIGTERM stop the SuperNode and every ClientApp it started.

A SuperNode ends by itself, with status 0 (or of its own SIGINT), when the SuperLink no longer knows its node:
the server was restarted (a new SuperLink answers the old node with UNAUTHENTICATED).
The command then starts a new SuperNode, which joins the new SuperLink as a new node
with the same client id and state, ``--reconnect-attempts`` times in a row at most (a
SuperNode that served a minute starts the count afresh); ``--reconnect-attempts 0``
exits 1 instead, saying to start the client again. A SuperNode that fails at its first
start (a bad key, say) ends the command with its status.

A local data file is loaded once before the SuperNode starts, so a malformed one is
refused at once (exit 2) rather than failing every round.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path
from typing import Any

from client.state import check_client_id, default_state_dir
from common import plugins
from common.datasets import load_dataset
from common.errors import UsageError
from common.runtime.flower_env import (
    ProcessTree,
    flower_env,
    free_port,
    stopped_on_exit,
    toml_value,
)

logger = logging.getLogger(__name__)


def node_config(args: argparse.Namespace) -> dict[str, Any]:
    """The node config the ClientApp reads, with absolute paths."""
    values: dict[str, Any] = {}
    if args.data_path is not None:
        path = Path(args.data_path).expanduser().resolve()
        if path.is_file():
            values["data-path"] = str(path)
        elif plugins.parse("dataset", args.data_path) is not None:
            try:
                plugins.check("dataset", args.data_path)
            except ValueError as exc:
                raise UsageError(f"--data-path {args.data_path}: {exc}") from exc
            values["data-path"] = args.data_path
        else:
            raise UsageError(f"--data-path {args.data_path}: no such file, and not a dataset "
                             "plug-in package.module:name[:ARG]")
    elif args.partition_id is None or args.num_partitions is None:
        raise UsageError("give --partition-id and --num-partitions, or --data-path")
    if args.partition_id is not None or args.num_partitions is not None:
        if args.partition_id is None or args.num_partitions is None:
            raise UsageError("--partition-id and --num-partitions go together")
        if args.num_partitions < 1 or not 0 <= args.partition_id < args.num_partitions:
            raise UsageError(f"--partition-id must be in [0, --num-partitions {args.num_partitions})")
        values.update({"partition-id": args.partition_id, "num-partitions": args.num_partitions})
    client_id = args.client_id or (f"partition-{args.partition_id}" if args.partition_id is not None
                                   else None)
    if client_id is None:
        raise UsageError("--client-id is required with --data-path (it names the client's state)")
    values["client-id"] = check_client_id(client_id)
    state_dir = (args.state_dir.expanduser().resolve() if args.state_dir
                 else default_state_dir(client_id).resolve())
    values["state-dir"] = str(state_dir)
    if args.root_certificates is not None and not args.insecure:
        values["queue-root-certificates"] = str(args.root_certificates.expanduser().resolve())
    for key, value in values.items():
        # Flower parses `k="v"` pairs with a regex that cannot skip an escaped quote.
        if isinstance(value, str) and '"' in value:
            raise UsageError(f"{key} {value!r} may not contain a double quote")
    if args.data_path is not None and Path(values["data-path"]).is_file():
        try:  # a file: the ClientApp loads it every round, so a malformed one would fail them all
            load_dataset(values["data-path"])
        except ValueError as exc:
            raise UsageError(f"--data-path {args.data_path}: {exc}") from exc
    return values


def supernode_command(args: argparse.Namespace, config: dict[str, Any], port: int) -> list[str]:
    """``flower-supernode`` with the node config, transport security and node key asked for."""
    cmd = ["flower-supernode", "--superlink", args.superlink, "--port", str(port),
           "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())]
    if args.insecure:
        if args.root_certificates:
            raise UsageError("--insecure and --root-certificates exclude each other")
        cmd.append("--insecure")
    elif args.root_certificates:
        if not args.root_certificates.is_file():
            raise UsageError(f"--root-certificates {args.root_certificates}: no such file")
        cmd += ["--root-certificates", str(args.root_certificates.resolve())]
    else:
        raise UsageError("give --root-certificates (TLS) or --insecure (loopback and tests only)")
    key = args.auth_supernode_private_key
    if key is not None:
        # Flower 1.41 derives the public key from the private one (its
        # --auth-supernode-public-key is deprecated) and authenticates nodes only over TLS.
        if args.insecure:
            raise UsageError("--auth-supernode-private-key needs TLS: give --root-certificates, not --insecure")
        if not key.is_file():
            raise UsageError(f"--auth-supernode-private-key {key}: no such file")
        cmd += ["--auth-supernode-private-key", str(key.resolve())]
    return cmd


#: A SuperNode that ran this long had joined the federation: its end starts a new count
#: of reconnect attempts.
SERVED_S = 60.0
#: How a SuperNode ends when the SuperLink no longer knows it: it sends itself SIGINT, and
#: exits 0, or dies of the signal when it arrives during its own shutdown. (This command
#: stops it with SIGTERM.)
ENDED_BY_SUPERLINK = frozenset({0, -signal.SIGINT, 128 + signal.SIGINT})
#: Seconds between a SuperNode's end and the start of the next one.
RECONNECT_PAUSE_S = 2.0


def run_node(args: argparse.Namespace) -> int:
    config = node_config(args)
    state_dir = Path(config["state-dir"])
    home = (args.flwr_home.expanduser().resolve() if args.flwr_home else state_dir / "flwr-home")
    home.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(args, config, args.port or free_port())
    with stopped_on_exit(ProcessTree()) as tree:
        return supervise(tree, cmd, flower_env(home), home, args, config)


def supervise(tree: ProcessTree, cmd: list[str], env: dict[str, str], home: Path,
              args: argparse.Namespace, config: dict[str, Any]) -> int:
    """Run the SuperNode; start a new one when the SuperLink ended it (see the module doc)."""
    client_id = config["client-id"]
    attempts = 0
    while True:
        started = time.monotonic()
        node = tree.start(cmd, env=env, cwd=home)
        logger.info("client %s: SuperNode (pid %d) connecting to %s; state in %s",
                    client_id, node.pid, args.superlink, config["state-dir"])
        status = node.wait()
        tree.stop(roots=[node])  # the ClientApps it started too
        if time.monotonic() - started >= SERVED_S:
            attempts = 0
        if status not in ENDED_BY_SUPERLINK and attempts == 0:
            return _failed(status, args)
        if attempts >= args.reconnect_attempts:
            logger.error(
                "client %s: the SuperLink at %s ended this node %s (the server was restarted, or "
                "stopped the node); start the client again once the server is up",
                client_id, args.superlink,
                f"{attempts + 1} times in a row" if attempts else f"(status {status})")
            return 1
        attempts += 1
        logger.warning("client %s: the SuperNode ended (status %d): the SuperLink at %s no longer "
                       "knows this node (a restarted server); joining it again as a new node "
                       "(attempt %d of %d)", client_id, status, args.superlink, attempts,
                       args.reconnect_attempts)
        time.sleep(RECONNECT_PAUSE_S)


def _failed(status: int, args: argparse.Namespace) -> int:
    """Log why a SuperNode failed at its start; its status."""
    if args.auth_supernode_private_key is not None:
        logger.error("the SuperNode exited with status %d; if it could not activate, the "
                     "SuperLink does not know this node's public key: have the server register "
                     "it (`fedcontrast server --auth-list-public-keys`), then start the client",
                     status)
    else:
        logger.error("the SuperNode exited with status %d (its output above says why)", status)
    return status
