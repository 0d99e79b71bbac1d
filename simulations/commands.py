"""The simulations package's ``fedcontrast`` commands: names, help and where their code is.

Their flags and defaults are defined here too. Kept free of heavy imports (torch, Flower,
Ray), so that ``fedcontrast --help`` and ``fedcontrast NAME --help`` answer at once and a
mistyped flag is refused at once; each command's code is imported when it runs.
"""

import argparse
from pathlib import Path
from typing import Any

from common.config import DP_LOSS, FedConfig, add_config_arguments
from common.runtime.cli import Command, deferred
from simulations.scenario import scenario_names

#: The simulation's own defaults where they differ from FedConfig's. Ten clients of
#: ~145 digits each need small batches and several local epochs to learn within 10
#: rounds (at batch 128 and 2 local epochs the encoder barely moved).
SIMULATION_DEFAULTS: dict[str, Any] = {"rounds": 10, "local_epochs": 5, "batch_size": 32, "min_nodes": 1}
#: The methods ``compare`` runs side by side (see :mod:`simulations.compare`).
METHODS = ("local", "fedavg", "fedmoco", "fedcontrast", "fedcontrast-key", "fedbyol", "fedu",
           "fedema", "centralized", "centralized-skewed")
#: Formulations under measurement (docs/experiments.md): run when named, not by default.
EXPERIMENTAL_METHODS = ("fedcontrast-key",)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in EXPERIMENTAL_METHODS)
#: What every run of the sweep shares so that DP-SGD applies (see :mod:`simulations.privacy`).
PRIVATE_LOSS = {"in_batch": False, "queue_size": 0}
#: The sweep's defaults: a DP configuration (each run then sets its own target and noise).
#: The loss is the one ``--dp true`` selects (``DP_LOSS``: ``--objective moment``, which holds
#: its embeddings apart under DP; docs/privacy.md). No queue rows: on the privacy benchmark
#: (bench/results/privacy_bench.md; from random init at 6a07da1) 256 rows per step, pushed
#: at rate 0.05 with noise 24, tied the same runs without them at epsilon 8 (from the
#: pretrained start too) and, un-noised without DP, pulled the non-private run below
#: random init on kNN. ``--global-negatives``, ``--push-fraction`` and
#: ``--push-noise`` turn them on (and with them the push axis).
SWEEP_DEFAULTS: dict[str, Any] = {**SIMULATION_DEFAULTS, **PRIVATE_LOSS, **DP_LOSS, "dp": True,
                                  "target_epsilon": 8.0, "push_noise": 0.0,
                                  "push_fraction": 0.0, "global_negatives": 0}


def add_simulation_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the simulated federation (shared by ``simulate``, ``compare`` and ``privacy``)."""
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--scenario", default=None, metavar="NAME|FILE",
                     help=f"start from a scenario: a TOML file or one of {', '.join(scenario_names())} "
                          "(flags override it)")
    sim.add_argument("--num-clients", type=int, default=None,
                     help="virtual clients, each one partition of --dataset (default: 10)")
    sim.add_argument("--client-cpus", type=int, default=None,
                     help="CPU cores reserved per virtual client; clients running at once = "
                          "cores / this (default: 1)")
    sim.add_argument("--client-gpus", type=float, default=None,
                     help="GPU share per virtual client, e.g. 0.25: four clients per GPU "
                          "(default: 0, CPU only)")
    sim.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="stop the simulation after this many seconds (default: no limit)")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="run directory (default: --resume's directory, or runs/sim-DATASET-TIME)")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR",
                     help="continue this simulation's run directory up to --rounds")
    run.add_argument("--config", type=Path, default=None, metavar="PATH",
                     help="start from a saved config.json (or a run directory); flags override it")
    add_simulation_arguments(parser)
    add_config_arguments(parser, FedConfig, defaults=SIMULATION_DEFAULTS)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("comparison")
    run.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="directory for the table, plot and one run per method and seed; "
                          "the same command again with the same --out reuses the methods and "
                          "seeds it finished (default: runs/compare-DATASET-TIME)")
    run.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help=f"comma-separated subset of {', '.join(METHODS)} (default: all but "
                          f"{', '.join(EXPERIMENTAL_METHODS)})")
    run.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1 (default: 0)")
    run.add_argument("--config", type=Path, default=None, metavar="PATH",
                     help="start from a saved config.json (or a run directory); flags override it")
    add_simulation_arguments(parser)
    add_config_arguments(parser, FedConfig, defaults=SIMULATION_DEFAULTS)


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("privacy sweep")
    run.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="directory for the table, plot and runs; the same command again with "
                          "the same --out reuses the runs it finished (default: runs/privacy-DATASET-TIME)")
    run.add_argument("--epsilons", default="1,2,4,8,inf",
                     help="comma-separated target epsilons; inf = the same federation without DP "
                          "(default: 1,2,4,8,inf)")
    run.add_argument("--push-axis-epsilon", type=float, default=0.0,
                     help="the budget at which pushes with and without noise are compared; "
                          "needs pushes (--push-fraction and --push-noise above 0) "
                          "(default: 0, no such axis)")
    run.add_argument("--default-loss-reference", action=argparse.BooleanOptionalAction, default=True,
                     help="also run the federation without DP and with the default loss "
                          "(in-batch negatives, as `fedcontrast simulate` trains): what giving up "
                          "the per-example loss costs on top of the noise (default: on)")
    run.add_argument("--config", type=Path, default=None, metavar="PATH",
                     help="start from a saved config.json (or a run directory); flags override it")
    add_simulation_arguments(parser)
    add_config_arguments(parser, FedConfig, defaults=SWEEP_DEFAULTS)


simulate_command = Command(
    name="simulate",
    help="run a whole federation on this machine (Flower's simulation engine)",
    description=(
        "Simulate --num-clients FedContrast clients on one host with Flower's simulation "
        "engine (Ray): per-client CPU and fractional GPU resources, the real gRPC negative "
        "queue on 127.0.0.1, per-round progress, and the same run directory as a deployment."
    ),
    add_arguments=add_simulate_arguments,
    run=deferred("simulations.simulate:run_simulate"),
)

compare_command = Command(
    name="compare",
    help="run local, fedavg, fedmoco, fedcontrast, fedbyol, fedu, fedema and both centralized "
         "methods side by side (fedcontrast-key when named)",
    description=(
        "Train every method on the same data, partition, encoder and number of sample-epochs "
        "(federated ones through the simulation engine), then write a Markdown table "
        "(linear probe, kNN, retrieval, alignment, uniformity, megabytes each client sends per "
        "round, wall time; mean and spread over "
        "--seeds) and a plot of kNN accuracy per round."
    ),
    add_arguments=add_compare_arguments,
    run=deferred("simulations.compare:run_compare"),
)

privacy_command = Command(
    name="privacy",
    help="what a privacy budget costs: the same simulated federation at several epsilons",
    description=(
        "Run the same simulated federation at each target epsilon of --epsilons (DP-SGD, "
        "and noised pushes when --push-fraction is above 0, one accountant per client; inf = "
        "no DP), at --push-axis-epsilon with and without push noise, and without DP with the "
        "default loss (in-batch "
        "negatives); write a table (epsilon, delta, noise multipliers, negatives, linear "
        "probe, kNN, retrieval, alignment, uniformity) and a plot of accuracy against epsilon."
    ),
    add_arguments=add_privacy_arguments,
    run=deferred("simulations.privacy:run_privacy"),
)
