"""The client package's ``fedcontrast`` commands: names, help and where their code is.

Their flags are defined here too. Kept free of heavy imports (torch, Flower, gRPC), so
that ``fedcontrast --help`` and ``fedcontrast NAME --help`` answer at once and a
mistyped flag is refused at once; each command's code is imported when it runs.
"""

import argparse
from pathlib import Path

from common.config import TrainConfig, add_config_arguments
from common.runtime.cli import Command, deferred, port_number


def add_train_local_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="run directory to write (default: runs/train-local-DATASET-TIME)")
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help="start from a saved config.json (or a run directory); flags override it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser, TrainConfig)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN_DIR",
                        help="a run directory (its encoder.pt) or an encoder checkpoint file")
    parser.add_argument("--dataset", default=None,
                        help="dataset to evaluate on (default: the run's own, from config.json)")
    parser.add_argument("--views", default=None,
                        help="view generator of the retrieval and alignment pairs (default: the "
                             "run's own, from config.json)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the data split and the views (default: the run's own)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT",
                        help="the SuperLink to connect to (what `fedcontrast server` listens on)")
    data = parser.add_argument_group("data (a share of the run's dataset, or a local file)")
    data.add_argument("--partition-id", type=int, default=None, help="this node's partition")
    data.add_argument("--num-partitions", type=int, default=None, help="partitions of the dataset")
    data.add_argument("--data-path", default=None,
                      help="a local .npz file with the arrays x_train, y_train, x_test and "
                           "y_test (see docs/plugins.md), or a dataset plug-in "
                           "package.module:name[:ARG] (used instead of a partition)")
    ident = parser.add_argument_group("identity")
    ident.add_argument("--client-id", default=None,
                       help="stable name of this client (default: partition-ID)")
    ident.add_argument("--state-dir", type=Path, default=None,
                       help="where the client keeps its state (default: $FLWR_HOME/fedcontrast/"
                            "clients/ID or ~/.fedcontrast/clients/ID)")
    sec = parser.add_argument_group("connection")
    sec.add_argument("--insecure", action="store_true", help="no TLS (loopback and tests only)")
    sec.add_argument("--root-certificates", type=Path, metavar="PEM", default=None,
                     help="CA certificate (PEM) that signed the SuperLink's certificate; it also "
                          "verifies the negative queue, which is then reached over TLS only")
    sec.add_argument("--auth-supernode-private-key", type=Path, default=None, metavar="KEY",
                     help="this node's OpenSSH ECDSA private key, when the SuperLink authenticates "
                          "nodes (`ssh-keygen -t ecdsa -b 384 -N '' -f KEY`; the server registers "
                          "KEY.pub). Needs TLS")
    sec.add_argument("--port", type=port_number, default=0,
                     help="the SuperNode's local ClientAppIo port (0: a free one)")
    sec.add_argument("--flwr-home", type=Path, default=None, metavar="DIR",
                     help="the SuperNode's FLWR_HOME (default: STATE_DIR/flwr-home)")
    sec.add_argument("--reconnect-attempts", type=int, default=10, metavar="N",
                     help="when the SuperLink ends this node (a restarted server), join it again "
                          "as a new node, at most N times in a row; 0: exit 1 instead, to be "
                          "started again")


train_local_command = Command(
    name="train-local",
    help="contrastive training on one dataset (building block and centralized upper bound)",
    description=(
        "Train an encoder with InfoNCE on one dataset and write a run directory with the "
        "resolved config, per-epoch metrics (CSV and JSON lines), the encoder checkpoint, "
        "summary.json (trained vs random-init encoder) and curves.png."
    ),
    add_arguments=add_train_local_arguments,
    run=deferred("client.train_local:run_train_local"),
)

evaluate_command = Command(
    name="evaluate",
    help="kNN and linear probe of a saved encoder on a labelled dataset",
    description=(
        "Evaluate a trained encoder (a run directory of train-local, server or simulate, or an "
        "encoder.pt) on held-out data: kNN, linear probe, instance retrieval, alignment and "
        "uniformity at the backbone and the head, beside the same architecture at random init."
    ),
    add_arguments=add_evaluate_arguments,
    run=deferred("client.train_local:run_evaluate"),
)

client_command = Command(
    name="client",
    help="join a federation: a Flower SuperNode training on this machine's data",
    description=(
        "Run a Flower SuperNode that trains FedContrast on this machine's data: a partition "
        "of a dataset (--partition-id/--num-partitions) or the client's own file "
        "(--data-path). The node gets its own FLWR_HOME and ClientAppIo port, so several "
        "clients can share a host. Ctrl-C and SIGTERM stop the SuperNode and every ClientApp "
        "it started. When the server restarts, the client joins the new SuperLink by itself "
        "(--reconnect-attempts)."
    ),
    add_arguments=add_client_arguments,
    run=deferred("client.node:run_node"),
)
