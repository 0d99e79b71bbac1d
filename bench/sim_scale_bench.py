"""How does the simulation harness scale with the number of virtual clients?

For 10, 100 and 1,000 virtual clients on tiny synthetic data (50 examples per client),
``fedcontrast simulate`` runs 3 rounds with 10 clients sampled per round, so every
configuration does the same training work and differences are the harness's cost of
a larger federation; a last configuration samples 5% of 1,000 clients (50 per round).
Reported: wall time per round (median of rounds 2-3; round 1 includes Ray's actor
start), total wall time, and peak resident memory of every process the run started
(SuperLink, ServerApp, Ray, ClientApp actors), sampled every 0.5 s. The baseline is
the 10-client federation, measured in the same invocation.

What a sampled client costs at 1,000 registered: the round time it adds (1,000 clients
at 5% against 1,000 with 10 sampled, per extra client), split into its training (one
client's local round timed in this process, over the engine's parallel actors), the
ClientApp's per-message set-up (:func:`bench.sim_overhead_bench.message_setup`: run
config, node settings, state directory, the node's data, records) and the rest, which
is Flower's per message (engine dispatch, Ray, link state). Flower's cost per
registered node (its dispatcher polls every registered node) is the 10-sampled rows'
difference, per node.

    python -m bench.sim_scale_bench [--clients 10 100 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import write_result
from bench.sim_overhead_bench import message_setup
from client.data import local_images
from client.round import train_round
from client.settings import NodeSettings
from common.config import FedConfig
from common.model import build_model
from common.runtime.flower_env import _proc_table, descendants
from simulations.simulate import Simulation, simulate

EXAMPLES_PER_CLIENT = 50


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> int:
    """Resident memory of ``root``'s descendants and of every process in their sessions."""
    table = _proc_table()
    keep = descendants({root}, table)
    sessions = {table[p][1] for p in keep if p in table} - {os.getsid(0)}
    keep |= {pid for pid, (_ppid, sid) in table.items() if sid in sessions}
    keep.discard(root)
    return sum(_rss_bytes(pid) for pid in keep)


class PeakMemory:
    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(me))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def workload(num_clients: int, fraction: float, rounds: int) -> FedConfig:
    return FedConfig(
        dataset=f"synthetic:{num_clients * EXAMPLES_PER_CLIENT}", rounds=rounds, local_epochs=1,
        fraction_train=fraction, min_nodes=1, width=8, embedding_dim=16, batch_size=25,
        global_negatives=256, queue_capacity=1024, eval_every=0, device="cpu", round_timeout=600,
    )


def client_compute(cfg: FedConfig, num_clients: int, repeats: int = 5) -> float:
    """Median seconds of one client's local round in this process, without a queue (no
    pulls, no pushes), on one torch thread as an engine actor with one CPU trains."""
    x = local_images(cfg, NodeSettings(client_id="partition-0", state_dir=Path("unused"),
                                       partition_id=0, num_partitions=num_clients))
    cfg = replace(cfg, global_negatives=0, push_fraction=0.0)
    model = build_model(cfg, x.shape[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            train_round(cfg, x, model.state_dict(), lr=cfg.lr, queue_address="127.0.0.1:1",
                        queue_token="", queue_version=1, seed=0)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def run_one(num_clients: int, fraction: float, rounds: int, workdir: Path) -> dict[str, float]:
    cfg = workload(num_clients, fraction, rounds)
    out = workdir / f"n{num_clients}-f{fraction}"
    start = time.perf_counter()
    with PeakMemory() as mem:
        status = simulate(cfg, Simulation(num_clients=num_clients), out, timeout=1800)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"simulation of {num_clients} clients failed: see {out / 'server.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = [r["round_seconds"] for r in rows[1:]] or [rows[0]["round_seconds"]]
    return {"clients": num_clients, "sampled": rows[-1]["sampled"], "round_s": statistics.median(later),
            "first_round_s": rows[0]["round_seconds"], "wall_s": wall, "peak_gib": mem.peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sampled", type=int, default=10, help="clients sampled per round")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="sim-scale-") as tmp:
        for n in args.clients:
            results.append(run_one(n, min(1.0, args.sampled / n), args.rounds, Path(tmp)))
            print(results[-1], flush=True)
        largest = max(args.clients)
        results.append(run_one(largest, 0.05, args.rounds, Path(tmp)))
        print(results[-1], flush=True)
    base = results[0]
    rows = [[r["clients"], r["sampled"], f"{r['round_s']:.1f}", f"{r['round_s'] / base['round_s']:.2f}",
             f"{r['first_round_s']:.1f}", f"{r['wall_s']:.0f}", f"{r['peak_gib']:.2f}",
             f"{r['peak_gib'] / base['peak_gib']:.2f}"] for r in results]
    same_work = [r for r in results if r["sampled"] == base["sampled"]]
    big = same_work[-1]
    per_client_ms = ((big["round_s"] - base["round_s"]) / max(1, big["clients"] - base["clients"])) * 1e3
    fivepct = results[-1]
    tenth = [r for r in results if r["clients"] == largest and r["sampled"] == base["sampled"]][-1]
    per_sampled = (fivepct["round_s"] - tenth["round_s"]) / max(1, fivepct["sampled"] - tenth["sampled"])
    actors = min(fivepct["sampled"], os.cpu_count() or 1)
    big_cfg = workload(largest, 0.05, args.rounds)
    with tempfile.TemporaryDirectory(prefix="sim-scale-setup-") as tmp:
        setup = sum(message_setup(big_cfg, 20, Path(tmp)).values()) / actors
    compute = client_compute(big_cfg, largest) / actors
    write_result(
        "sim_scale_bench",
        ["clients", "sampled/round", "s/round", "ratio to 10", "round 1 s", "wall s", "peak GiB",
         "memory ratio"],
        rows,
        summary={
            "harness_overhead_ms_per_registered_client_per_round": round(per_client_ms, 2),
            "seconds_per_sampled_client_per_round_at_5pct": round(fivepct["round_s"] / fivepct["sampled"], 2),
            f"marginal_ms_per_sampled_client_per_round_at_{largest}": round(per_sampled * 1e3, 1),
            "  of_which_training_ms (in process, over actors)": round(compute * 1e3, 1),
            "  of_which_clientapp_setup_ms (project's own, over actors)": round(setup * 1e3, 1),
            "  of_which_flower_per_message_ms (rest)": round((per_sampled - compute - setup) * 1e3, 1),
            "peak_gib_1000_clients_5pct": round(fivepct["peak_gib"], 2),
            "memory_limit_gib": 24,
        },
        notes=(f"synthetic data, {EXAMPLES_PER_CLIENT} examples per client (batch 25, 1 local epoch), "
               "CNN width 8, embedding 16, 256 global negatives, no server evaluation; 1 CPU per "
               "virtual client (2 actors on 2 cores). Memory: sum of VmRSS over the processes "
               "the run started, sampled every 0.5 s (shared pages counted once per process, so "
               "an upper bound). A sampled client's cost is split as the module docstring says; "
               "the upstream change Flower's per-node cost needs: the simulation engine's "
               "dispatcher (flwr/server/superlink/fleet/vce/vce_api.py, add_messages_to_queue) "
               "asks the link state for each registered node's messages every 0.1 s; one "
               "query for all nodes' pending messages (LinkState.get_message_ins over every "
               "node), or a notification when the ServerApp pushes, would make it cost per "
               "message instead of per registered node."),
    )


if __name__ == "__main__":
    main()
