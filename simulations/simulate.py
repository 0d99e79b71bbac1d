"""``fedcontrast simulate``: a whole federation on one host, through Flower's simulation engine.

The same ServerApp and ClientApp as a deployment (``fedcontrast server`` /
``fedcontrast client``), the same gRPC negative queue (on 127.0.0.1), the same run
directory. What differs is who runs the ClientApps: a SuperLink started with
``--simulation`` hands every message to Flower's simulation engine, which runs
``--num-clients`` virtual SuperNodes in Ray actors with ``--client-cpus`` CPUs and
``--client-gpus`` (a fraction: 0.25 lets four clients share one GPU) each. Only
the clients sampled in a round (``--fraction-train``) train and hold a model.

Every virtual client reads its share of ``--dataset`` from the node config Flower
gives it (``partition-id``/``num-partitions``, split with ``--partitioner``).
Client state (round counters, privacy accountants) lives under
``RUN_DIR/flower-home/fedcontrast/clients/partition-ID``, so ``--resume`` carries it on.

Ray's head gets a fixed 30 s to start, which a loaded machine can miss; when the engine
fails to start (nothing trained yet), the simulation is started again on a fresh
SuperLink, up to three times in all with a pause between, and a failure names the first
error in ``server.log``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from client.state import clients_under
from client.train_local import evaluate_run, summary_table
from common.config import FedConfig, from_args, read_config_values
from common.errors import UsageError
from common.runtime.flower_env import (
    ProcessTree,
    flower_env,
    free_port,
    stopped_on_exit,
    wait_for_port,
    write_superlink_config,
)
from common.synthetic import CACHE_ENV
from server.deploy import (
    CONNECTION,
    app_dir,
    first_error,
    follow_run,
    log_tail,
    refuse_finished_rounds,
)
from simulations.commands import SIMULATION_DEFAULTS
from simulations.scenario import load_scenario

logger = logging.getLogger(__name__)


class Simulation:
    """What a simulated federation needs besides the FedConfig: clients and their resources."""

    def __init__(self, num_clients: int = 10, client_cpus: int = 1, client_gpus: float = 0.0) -> None:
        if num_clients < 1:
            raise UsageError(f"--num-clients must be at least 1, got {num_clients}")
        if client_cpus < 1:
            raise UsageError(f"--client-cpus must be a whole number of cores >= 1, got {client_cpus}")
        if not 0.0 <= client_gpus <= 1.0:
            raise UsageError(f"--client-gpus is a share of one GPU in [0, 1], got {client_gpus}")
        self.num_clients = num_clients
        self.client_cpus = client_cpus
        self.client_gpus = client_gpus

    def as_dict(self) -> dict[str, Any]:
        return {"num_clients": self.num_clients, "client_cpus": self.client_cpus,
                "client_gpus": float(self.client_gpus)}

    def federation_config(self) -> str:
        return (f"num-supernodes={self.num_clients} client-resources-num-cpus={self.client_cpus} "
                f"client-resources-num-gpus={float(self.client_gpus)}")

    def sampled(self, cfg: FedConfig) -> int:
        """Clients trained per round: ``int(num_clients x fraction_train)``, at least 1, as
        Flower's FedAvg samples them."""
        return max(1, int(self.num_clients * cfg.fraction_train))

    def check_resources(self, cfg: FedConfig) -> None:
        """Refuse what the engine would otherwise turn into a hang or a silent CPU run."""
        cores = os.cpu_count() or 1
        if self.client_cpus > cores:
            raise UsageError(f"--client-cpus {self.client_cpus} exceeds this machine's {cores} cores: "
                             "no client could ever be scheduled")
        if self.client_gpus > 0:
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--client-gpus needs a CUDA GPU, and torch sees none here "
                                 "(use --client-gpus 0)")
            if cfg.device == "cpu":
                raise UsageError("--client-gpus with --device cpu reserves GPUs nobody uses")
        elif cfg.device.startswith("cuda"):
            raise UsageError(f"--device {cfg.device} needs --client-gpus > 0: Ray hides GPUs from "
                             "clients that reserved none")
        sampled = self.sampled(cfg)
        if cfg.min_nodes > sampled:
            raise UsageError(
                f"--min-nodes {cfg.min_nodes} can never be met: --fraction-train "
                f"{cfg.fraction_train} samples {sampled} of {self.num_clients} clients per round"
            )


def resolve(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> tuple[FedConfig, Simulation]:
    """Config and simulation from defaults < scenario < saved config < flags."""
    base: dict[str, Any] = {**SIMULATION_DEFAULTS, **(defaults or {})}
    sim_values: dict[str, Any] = {}
    if args.scenario:
        scenario = load_scenario(args.scenario)
        base.update(scenario.settings)
        sim_values.update(scenario.simulation)
    source = getattr(args, "config", None) or getattr(args, "resume", None)
    if source:
        base.update(read_config_values(source)[1])
        saved = Path(source) / "simulation.json" if Path(source).is_dir() else None
        if saved is not None and saved.exists():
            sim_values.update(json.loads(saved.read_text()))
    for name in ("num_clients", "client_cpus", "client_gpus"):
        if getattr(args, name, None) is not None:
            sim_values[name] = getattr(args, name)
    try:
        cfg = from_args(FedConfig, args, base=base)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return cfg, Simulation(**sim_values)


def simulate(
    cfg: FedConfig,
    sim: Simulation,
    out: Path,
    *,
    resume: Path | None = None,
    timeout: float | None = None,
    pretrained_dir: Path | None = None,
) -> int:
    """Run one simulated federation into ``out``; 0 when the run completed.

    ``pretrained_dir``: where the ServerApp finds the encoder pretrained for
    ``--pretrain-epochs`` by an earlier process, or keeps it (:data:`common.synthetic.CACHE_ENV`).
    """
    sim.check_resources(cfg)
    app_dir()
    out = out.expanduser().resolve()
    refuse_finished_rounds(out, resume, cfg.rounds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.json").write_text(json.dumps(sim.as_dict(), indent=2) + "\n")
    # Kept with the run: the virtual clients' state directories live in it (see module doc).
    home = out / "flower-home"
    home.mkdir(exist_ok=True)
    if resume is not None and resume != out:
        _carry_client_state(resume, out)
    env = flower_env(home)
    env.setdefault("RAY_DEDUP_LOGS", "0")
    if pretrained_dir is not None:
        env[CACHE_ENV] = str(pretrained_dir.expanduser().resolve())
    log = out / "server.log"
    deadline = None if timeout is None else time.monotonic() + timeout
    for attempt in range(1, ENGINE_START_ATTEMPTS + 1):
        log_start = log.stat().st_size if log.exists() else 0
        left = None if deadline is None else max(1.0, deadline - time.monotonic())
        status = _simulate_once(cfg, sim, out, home, env, resume=resume, timeout=left)
        cause = engine_start_failure(log, log_start) if status != 0 else None
        if cause is None or attempt == ENGINE_START_ATTEMPTS:
            return status
        # Nothing trained: Ray's head did not come up (its GCS gets a fixed 30 s to write
        # its port file, which a loaded machine can miss). A fresh SuperLink and Ray try again.
        logger.warning("the simulation engine did not start (%s); starting it again in %.0f s "
                       "(attempt %d of %d)", cause, ENGINE_RETRY_PAUSE_S * attempt, attempt + 1,
                       ENGINE_START_ATTEMPTS)
        time.sleep(ENGINE_RETRY_PAUSE_S * attempt)
    return status


def _carry_client_state(resume: Path, out: Path) -> None:
    """Copy the virtual clients' state (accountants, calibration, rounds trained) of the
    resumed run into ``out``, so a resume into another directory goes on from it."""
    source = resume / CLIENT_STATE
    target = out / CLIENT_STATE
    if source.is_dir() and not target.exists():
        shutil.copytree(source, target)
        logger.info("client state of %s copied into %s", resume, out)


#: Where the virtual clients keep their state inside a run directory.
CLIENT_STATE = clients_under(Path("flower-home"))

#: Tries at starting Flower's simulation engine before a simulation is called failed.
#: Two in a row have failed on this project's 2-core machine (a GCS port-file timeout, then
#: "node timed out during startup" straight after it), so a third comes after a longer pause.
ENGINE_START_ATTEMPTS = 3
#: Seconds to wait before the second try; the third waits twice as long. Ray's processes
#: of the failed try get that long to go before the next one starts.
ENGINE_RETRY_PAUSE_S = 5.0


def engine_start_failure(log: Path, start: int = 0) -> str | None:
    """Why Ray failed to start in ``log`` after byte ``start``; None when it did not fail so.

    Only the start of the engine is retried: past it, clients have trained and a failure
    is the run's own.
    """
    try:
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    if "Simulation Runtime crashed" not in text or "in init_ray" not in text:
        return None
    return first_error(text) or "ray.init failed"


def _simulate_once(cfg: FedConfig, sim: Simulation, out: Path, home: Path, env: dict[str, str],
                   *, resume: Path | None, timeout: float | None) -> int:
    """One SuperLink in simulation mode, one run on it; every process stopped on return."""
    port = free_port()
    with stopped_on_exit(ProcessTree()) as tree:
        link = tree.start(["flower-superlink", "--simulation", "--insecure",
                           "--disable-runtime-dependency-installation",
                           "--host", "127.0.0.1", "--port", str(port)],
                          env=env, log=out / "superlink.log", cwd=home)
        if not wait_for_port("127.0.0.1", port, timeout=60) or link.poll() is not None:
            raise UsageError(f"the simulation SuperLink did not start:\n{log_tail(out / 'superlink.log')}")
        write_superlink_config(home, CONNECTION, f"127.0.0.1:{port}")
        logger.info("starting Flower's simulation engine (Ray) for %d virtual clients (%d CPU, "
                    "%.2g GPU each; %d train at once on %d cores): ~10-40 s before round 1 starts",
                    sim.num_clients, sim.client_cpus, sim.client_gpus,
                    min(sim.num_clients, max(1, (os.cpu_count() or 1) // sim.client_cpus)),
                    os.cpu_count() or 1)
        return follow_run(tree, env, home, cfg, out, resume, timeout=timeout,
                          flwr_args=["--federation-config", sim.federation_config()])


#: Settings that decide which examples each virtual client holds.
PARTITION_SETTINGS = ("dataset", "seed", "partitioner", "dirichlet_alpha", "classes_per_client")


def refuse_repartition(cfg: FedConfig, sim: Simulation, resume: Path) -> None:
    """A resume keeps each client's data: its state (accountant, rounds) is about those
    examples. Refuse settings that would deal the data out differently."""
    saved = read_config_values(resume)[1]
    changed = [f"--{name.replace('_', '-')} {saved[name]} -> {getattr(cfg, name)}"
               for name in PARTITION_SETTINGS if name in saved and saved[name] != getattr(cfg, name)]
    saved_sim = resume / "simulation.json"
    if saved_sim.exists():
        clients = json.loads(saved_sim.read_text()).get("num_clients")
        if clients is not None and clients != sim.num_clients:
            changed.append(f"--num-clients {clients} -> {sim.num_clients}")
    if changed:
        raise UsageError(f"--resume {resume} cannot change how the data is partitioned "
                         f"({', '.join(changed)}): the clients' state and privacy accounting "
                         "belong to their examples; start a new run instead")


def run_simulate(args: argparse.Namespace) -> int:
    resume = args.resume.expanduser().resolve() if args.resume else None
    if resume is not None and not (resume / "encoder.pt").exists():
        raise UsageError(f"--resume {args.resume}: no encoder.pt there (not a FedContrast run directory)")
    cfg, sim = resolve(args)
    if resume is not None:
        refuse_repartition(cfg, sim, resume)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or resume or Path("runs") / f"sim-{Path(cfg.dataset).stem}-{stamp}"
    status = simulate(cfg, sim, out, resume=resume, timeout=args.timeout)
    if status == 0:
        logger.info("measuring the trained encoder beside its random init on held-out %s",
                    cfg.dataset)
        summary = evaluate_run(out.expanduser().resolve(), seed=cfg.seed, device=cfg.device)
        Console().print(summary_table(summary))
    return status
