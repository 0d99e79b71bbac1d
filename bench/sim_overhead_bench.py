"""What does ``fedcontrast simulate`` cost beyond the training it does?

The same federated training twice, alternating, ``--repeats`` times each:

- ``in-process``: one process runs every round itself: each client's local round
  (:func:`client.round.train_round`, the ClientApp's own code) on data loaded once,
  FedAvg of weights and optimiser state, and the server's evaluation on the rounds
  ``--eval-every`` asks for (and the last).
- ``simulate``: :func:`simulations.simulate.simulate`, Flower's simulation engine (Ray)
  with one CPU per virtual client, the same clients, rounds, epochs and evaluation.

Both use the FedAvg settings of ``fedcontrast compare`` (in-batch negatives, no queue),
so nothing but the harness differs. The breakdown puts the difference where it goes:

- engine start and stop: ``simulate``'s wall time outside its rounds (SuperLink,
  ServerApp, Ray's head), on its own line; round 1's excess over the later rounds
  (Ray's actors start on the first messages) on another;
- per-message set-up in the ClientApp: the handler's steps besides training
  (run config, node settings, state directory, the node's data, records to tensors
  and back), timed here in process, per message and per round (over the engine's
  parallel actors);
- stragglers (with ``--threads 1``, one thread, as an actor with one CPU trains): the
  in-process clients' rounds taken in order by as many workers as the engine has
  actors, against their training spread evenly over them;
- waiting: the rest of a simulated round beyond its compute, stragglers and set-up:
  message transport, Ray scheduling, the ServerApp's reply polling. Its compute is
  the in-process round, or with ``--threads 1`` the in-process training spread over
  the actors plus aggregation and evaluation.

    python -m bench.sim_overhead_bench [--clients 10] [--rounds 3] [--local-epochs 2]
        [--dataset digits] [--repeats 2]

The goal size (an in-process run of at least 5 minutes) is a matter of ``--rounds``,
``--local-epochs`` and ``--dataset``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from bench.common import add_data_arguments, write_result
from client.data import local_images
from client.round import train_round
from client.settings import NodeSettings
from client.state import StateDir
from common import optim_state
from common.config import FedConfig, from_run_config, to_run_config
from common.datasets import load_dataset
from common.evaluation import evaluate_encoder
from common.model import build_model
from common.plugins import make_views
from common.schedule import cosine_lr
from simulations.in_process import fedavg
from simulations.methods import SIMCLR
from simulations.simulate import Simulation, simulate


def workload(args: argparse.Namespace) -> FedConfig:
    return replace(FedConfig(
        dataset=args.data, rounds=args.rounds, local_epochs=args.local_epochs, width=args.width,
        partitioner="dirichlet", dirichlet_alpha=args.alpha, eval_every=args.eval_every,
        min_nodes=1, device="cpu", round_timeout=1800, seed=args.seed,
    ), **SIMCLR)


def node(pid: int, clients: int, home: Path) -> NodeSettings:
    return NodeSettings(client_id=f"partition-{pid}", state_dir=home, partition_id=pid,
                        num_partitions=clients)


def makespan(seconds: list[float], workers: int) -> float:
    """When the last of ``seconds`` finishes, each job taken in order by the first free
    of ``workers`` (as the engine's actor pool takes messages)."""
    free = [0.0] * workers
    for s in seconds:
        free[free.index(min(free))] += s
    return max(free)


def run_in_process(cfg: FedConfig, clients: int, home: Path, actors: int) -> dict[str, float]:
    """The federation's rounds in this process; seconds spent in each part, and the
    median round's training as ``actors`` parallel workers would finish it."""
    t = time.perf_counter()
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    xs = [local_images(cfg, node(i, clients, home)) for i in range(clients)]
    model = build_model(cfg, data.in_channels)
    arrays = {**model.state_dict(), **optim_state.initial_arrays(model, cfg)}
    parts = {"data": time.perf_counter() - t, "train": 0.0, "aggregate": 0.0, "evaluate": 0.0}
    lr_at = cosine_lr(cfg.lr, cfg.rounds)
    rounds, makespans = [], []
    for rnd in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        weights, opt = optim_state.split(arrays)
        replies = []
        client_s = []
        for i, x in enumerate(xs):
            client_start = time.perf_counter()
            state = StateDir(home, f"partition-{i}").load()
            new, metrics = train_round(cfg, x, weights, lr=lr_at(rnd - 1), queue_address="127.0.0.1:1",
                                       queue_token="", queue_version=rnd, seed=state.seed(cfg.seed, rnd),
                                       optimizer_state=opt or None)
            replies.append((new, int(metrics["num-examples"])))
            client_s.append(time.perf_counter() - client_start)
        makespans.append(makespan(client_s, actors))
        t = time.perf_counter()
        parts["train"] += t - start
        arrays = fedavg(replies)
        parts["aggregate"] += time.perf_counter() - t
        if rnd == cfg.rounds or (cfg.eval_every and rnd % cfg.eval_every == 0):
            t = time.perf_counter()
            model.load_state_dict(optim_state.split(arrays)[0])
            evaluate_encoder(model, data, device=torch.device("cpu"), views=make_views(cfg), seed=cfg.seed)
            parts["evaluate"] += time.perf_counter() - t
        rounds.append(time.perf_counter() - start)
    parts["round_s"] = statistics.median(rounds)
    parts["makespan"] = statistics.median(makespans)
    parts["wall"] = parts["data"] + sum(rounds)
    return parts


def message_setup(cfg: FedConfig, clients: int, home: Path) -> dict[str, float]:
    """Seconds per TRAIN message of the ClientApp's steps besides training, as
    :func:`client.app.train` takes them: mean over one message per client, in a process
    that has answered one message before (as an engine's actor has)."""
    run_config = to_run_config(cfg)
    first = local_images(cfg, node(0, clients, home))
    model = build_model(cfg, first.shape[1])
    record = ArrayRecord({**model.state_dict(), **optim_state.initial_arrays(model, cfg)})
    parts = {"config": 0.0, "state": 0.0, "data": 0.0, "records": 0.0}
    for i in range(clients):
        t0 = time.perf_counter()
        from_run_config(FedConfig, run_config)
        settings = NodeSettings.from_node_config({"partition-id": i, "num-partitions": clients,
                                                  "state-dir": str(home / f"partition-{i}")})
        t1 = time.perf_counter()
        state_dir = StateDir(settings.state_dir, settings.client_id)
        state_dir.save(state_dir.load())
        t2 = time.perf_counter()
        local_images(cfg, settings)
        t3 = time.perf_counter()
        received = optim_state.split(record.to_torch_state_dict())
        ArrayRecord({**received[0], **received[1]})
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key] += dt / clients
    return parts


def run_simulated(cfg: FedConfig, clients: int, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    status = simulate(cfg, Simulation(num_clients=clients), out, timeout=3600)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"simulate failed: see {out / 'server.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["round_seconds"] for r in rows]
    later = seconds[1:] or seconds
    return {"wall": wall, "rounds_total": sum(seconds), "round_s": statistics.median(later),
            "round1_excess": seconds[0] - statistics.median(later),
            "start_stop": wall - sum(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, "digits")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the split")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the in-process arm (0: torch's default)")
    parser.add_argument("--name", default="sim_overhead_bench", help="result file name")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    cfg = workload(args)
    actors = min(args.clients, os.cpu_count() or 1)
    inproc, sims, setups, loads = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="sim-overhead-") as tmp:
        for rep in range(args.repeats):
            loads.append(os.getloadavg()[0])
            sims.append(run_simulated(cfg, args.clients, Path(tmp) / f"sim-{rep}"))
            print("simulate", sims[-1], flush=True)
            loads.append(os.getloadavg()[0])
            inproc.append(run_in_process(cfg, args.clients, Path(tmp) / f"home-{rep}", actors))
            print("in-process", inproc[-1], flush=True)
            setups.append(message_setup(cfg, args.clients, Path(tmp) / f"setup-{rep}"))
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    setup = {k: med(setups, k) for k in setups[0]}
    setup_round = sum(setup.values()) * args.clients / actors
    in_round, sim_round = med(inproc, "round_s"), med(sims, "round_s")
    # What simulate's round would take with no harness: the in-process round's training
    # spread over the actors (a fair share only when this process trains on one thread,
    # as an actor with one CPU does), and its serial aggregation and evaluation.
    train_round_s = med(inproc, "train") / args.rounds
    serial_s = (med(inproc, "aggregate") + med(inproc, "evaluate")) / args.rounds
    one_thread = torch.get_num_threads() == 1
    ideal = train_round_s / actors + serial_s if one_thread else None
    stragglers = med(inproc, "makespan") - train_round_s / actors if one_thread else None
    rows = [
        ["whole run (wall)", f"{med(inproc, 'wall'):.1f}", f"{med(sims, 'wall'):.1f}",
         f"{med(sims, 'wall') / med(inproc, 'wall'):.2f}"],
        ["engine start and stop (outside rounds)", "-", f"{med(sims, 'start_stop'):.1f}", ""],
        ["round 1 excess (actors start)", "-", f"{med(sims, 'round1_excess'):.1f}", ""],
        ["data loaded once (in-process)", f"{med(inproc, 'data'):.2f}", "-", ""],
        ["round (median of rounds 2..)", f"{in_round:.2f}", f"{sim_round:.2f}", f"{sim_round / in_round:.2f}"],
        ["  training, per round", f"{med(inproc, 'train') / args.rounds:.2f}", "", ""],
        ["  aggregation, per round", f"{med(inproc, 'aggregate') / args.rounds:.3f}", "", ""],
        ["  evaluation, per round", f"{med(inproc, 'evaluate') / args.rounds:.2f}", "", ""],
        *[[f"  per-message {k}, ms/message", "", f"{v * 1e3:.1f}", ""] for k, v in setup.items()],
        [f"  per-message set-up, per round ({args.clients} messages / {actors} actors)", "",
         f"{setup_round:.2f}", ""],
        ["  compute: training over the actors, aggregation, evaluation (one-thread arm only)", "",
         "-" if ideal is None else f"{ideal:.2f}", ""],
        ["  stragglers: the clients' uneven rounds on the actors (one-thread arm only)", "",
         "-" if stragglers is None else f"{stragglers:.2f}", ""],
        ["  waiting (transport, scheduling, reply polling)", "",
         f"{sim_round - (in_round if ideal is None else ideal + stragglers) - setup_round:.2f}", ""],
    ]
    write_result(
        args.name, ["part", "in-process s", "simulate s", "ratio"], rows,
        summary={
            "ratio_wall": round(med(sims, "wall") / med(inproc, "wall"), 2),
            "ratio_wall_without_engine_start": round(
                (med(sims, "wall") - med(sims, "start_stop")) / med(inproc, "wall"), 2),
            "ratio_round": round(sim_round / in_round, 2),
            "harness_s_per_client_per_round": round(
                (sim_round - (in_round if ideal is None else ideal)) / args.clients, 3),
            "load_average_1min_at_starts": [round(v, 1) for v in loads],
            "runs_per_arm": args.repeats,
        },
        notes=(f"{args.clients} clients, Dirichlet alpha {args.alpha}, {args.rounds} rounds x "
               f"{args.local_epochs} local epochs, CNN width {args.width}, FedAvg settings of compare "
               f"(no queue), evaluation every {args.eval_every} round(s) and at the end; medians of "
               f"{args.repeats} runs per arm, arms alternating (simulate first); the in-process arm "
               f"with {torch.get_num_threads()} torch threads. simulate: 1 CPU per "
               "virtual client, so as many Ray actors as cores. Per-message set-up is timed in "
               "process and spread over the actors; waiting is the remainder of a simulated round: "
               "beyond the in-process round, or with --threads 1 beyond the in-process training "
               "spread over the actors plus aggregation and evaluation. With more threads the "
               "in-process arm is no measure of an actor's compute (torch's threads compete with "
               "the machine's other load), and waiting can come out negative."),
    )


if __name__ == "__main__":
    main()
