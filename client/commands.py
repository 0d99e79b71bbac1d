"""The client package's ``fedcontrast`` commands: names, help and where their code is.

Kept free of heavy imports (torch, Flower, gRPC) so that ``fedcontrast --help`` can
list every command quickly; each command's module is imported when it is used.
"""

from common.cli import Command, deferred

train_local_command = Command(
    name="train-local",
    help="contrastive training on one dataset (building block and centralized upper bound)",
    description=(
        "Train an encoder with InfoNCE on one dataset and write a run directory with the "
        "resolved config, per-epoch metrics (CSV and JSON lines), the encoder checkpoint, "
        "summary.json (trained vs random-init encoder) and curves.png."
    ),
    add_arguments=deferred("client.cli:add_train_local_arguments"),
    run=deferred("client.cli:run_train_local"),
)

evaluate_command = Command(
    name="evaluate",
    help="kNN and linear probe of a saved encoder on a labelled dataset",
    description=(
        "Evaluate a trained encoder (a run directory of train-local, server or simulate, or an "
        "encoder.pt) on held-out data: kNN, linear probe, instance retrieval, alignment and "
        "uniformity at the backbone and the head, beside the same architecture at random init."
    ),
    add_arguments=deferred("client.cli:add_evaluate_arguments"),
    run=deferred("client.cli:run_evaluate"),
)

client_command = Command(
    name="client",
    help="join a federation: a Flower SuperNode training on this machine's data",
    description=(
        "Run a Flower SuperNode that trains FedContrast on this machine's data: a partition "
        "of a dataset (--partition-id/--num-partitions) or the client's own file "
        "(--data-path). The node gets its own FLWR_HOME and ClientAppIo port, so several "
        "clients can share a host. Ctrl-C and SIGTERM stop the SuperNode and every ClientApp "
        "it started; the command exits with the SuperNode's status."
    ),
    add_arguments=deferred("client.node:add_arguments"),
    run=deferred("client.node:run_node"),
)
