"""The server package's ``fedcontrast`` commands: names, help and where their code is.

Kept free of heavy imports (torch, Flower, gRPC) so that ``fedcontrast --help`` can
list every command quickly; each command's module is imported when it is used.
"""

from common.cli import Command, deferred

server_command = Command(
    name="server",
    help="run a federation: a Flower SuperLink and the FedContrast ServerApp",
    description=(
        "Start a Flower SuperLink (or use --superlink), run FedContrast on the SuperNodes "
        "that connect to it (start them with `fedcontrast client`), show per-round "
        "progress and write the run directory."
    ),
    add_arguments=deferred("server.deploy:add_arguments"),
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
    add_arguments=deferred("server.cli:add_arguments"),
    run=deferred("server.cli:run"),
)
