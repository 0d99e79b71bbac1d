"""The simulations package's ``fedcontrast`` commands: names, help and where their code is.

Kept free of heavy imports (torch, Flower, Ray) so that ``fedcontrast --help`` can
list every command quickly; each command's module is imported when it is used.
"""

from common.cli import Command, deferred

simulate_command = Command(
    name="simulate",
    help="run a whole federation on this machine (Flower's simulation engine)",
    description=(
        "Simulate --num-clients FedContrast clients on one host with Flower's simulation "
        "engine (Ray): per-client CPU and fractional GPU resources, the real gRPC negative "
        "queue on 127.0.0.1, per-round progress, and the same run directory as a deployment."
    ),
    add_arguments=deferred("simulations.simulate:add_arguments"),
    run=deferred("simulations.simulate:run_simulate"),
)

compare_command = Command(
    name="compare",
    help="run local, fedavg, fedmoco, fedcontrast and both centralized methods side by side",
    description=(
        "Train every method on the same data, partition, encoder and number of sample-epochs "
        "(federated ones through the simulation engine), then write a Markdown table "
        "(linear probe, kNN, retrieval, alignment, uniformity, wall time; mean and spread over "
        "--seeds) and a plot of kNN accuracy per round."
    ),
    add_arguments=deferred("simulations.compare:add_arguments"),
    run=deferred("simulations.compare:run_compare"),
)

privacy_command = Command(
    name="privacy",
    help="what a privacy budget costs: the same simulated federation at several epsilons",
    description=(
        "Run the same simulated federation at each target epsilon of --epsilons (DP-SGD plus "
        "noised pushes, one accountant per client; inf = no DP), at --push-axis-epsilon "
        "with and without push noise, and without DP with the default loss (in-batch "
        "negatives); write a table (epsilon, delta, noise multipliers, negatives, linear "
        "probe, kNN, retrieval, alignment, uniformity) and a plot of accuracy against epsilon."
    ),
    add_arguments=deferred("simulations.privacy:add_arguments"),
    run=deferred("simulations.privacy:run_privacy"),
)
