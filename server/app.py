"""The ServerApp: the queue service for the run's lifetime, and the round driver.

Run config: every :class:`~common.config.FedConfig` key, plus

- ``run-dir``: absolute path of the run directory to write (required);
- ``resume``: ``""``, or a run directory to continue: its ``encoder.pt`` (weights and
  last round), ``queue.pt`` (the queue) and metrics; numbering continues with the
  next round, up to ``rounds``;
- ``queue-ssl-certfile`` and ``queue-ssl-keyfile``: absolute paths of the PEM
  certificate and private key the queue service is served with (TLS; the certificate
  must name ``queue-host``, the address nodes dial), or both ``""``: an insecure queue,
  for loopback (simulation, tests). ``fedcontrast server`` sets them to the SuperLink's
  certificate and key unless ``--insecure``. Every TRAIN message tells the node whether
  the queue is TLS (``queue-tls``).

Run directory (see :mod:`common.runtime.rundir`)::

    config.json  versions.json  metrics.csv  metrics.jsonl  (one row per round)
    encoder.pt   (every round; common.checkpoint format with "round", "next_slot",
                  "client_slots", "optimizer_state" and "key_state": the server-averaged
                  key encoder under "key.*", empty unless --key-sync server)
    queue.pt     (NegativeQueue.snapshot, every round)
    summary.json (status, rounds, final_eval and random_init: the same figures of the
                  initial encoder, measured before round 1; queue, queue_tls, privacy,
                  dropped_replies: replies refused by kind over the run
                  (server.contract.REFUSAL_KINDS), and contributors: slot -> the client id it belongs to, null for a
                  node that did not identify itself, and the rows it pushed in this run
                  and the runs it resumes)
    curves.png   (each metric per round, the random-init level dashed)

The final status (``summary.json`` ``status``, see docs/operations.md) is ``completed``,
``completed with uncounted rounds: ...`` when some round had fewer than ``min_nodes``
valid replies, ``stopped early: ...``, or ``failed: ...``. A run in which no round
counted has only the initial encoder: it is ``failed`` and the ServerApp raises
:class:`NoRoundCounted`, so that Flower reports the run as failed too.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import key_state, optim_state
from common.checkpoint import read_checkpoint, save_encoder
from common.config import FedConfig, from_run_config, push_quota, resolve_device
from common.datasets import Dataset, load_dataset
from common.encoders import ContrastiveModel
from common.evaluation import evaluate_encoder
from common.model import build_model, initial_model, model_spec
from common.plugins import make_views
from common.runtime.flower_env import route_logs_to_flower
from common.runtime.rundir import RunDir
from server.aggregation import build_strategy
from server.grid import prompt_grid
from server.queue import NegativeQueue
from server.rounds import PLOTTED, RoundDriver, dropped_totals
from server.sampling import NodeTokens
from server.service import QueueServer, ServerTLS

logger = logging.getLogger(__name__)

#: Run-config keys of the app besides FedConfig's (pyproject [tool.flwr.app.config]).
EXTRA_RUN_CONFIG = {"run-dir": "", "resume": "", "queue-ssl-certfile": "",
                    "queue-ssl-keyfile": ""}
QUEUE_SNAPSHOT = "queue.pt"

app = ServerApp()

#: The queue and its service, from the lifespan to main (same process, one run).
_service: dict[str, Any] = {}


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    """Serve the negative queue before the first round; stop it after the last, also on failure."""
    route_logs_to_flower()
    cfg = from_run_config(FedConfig, context.run_config)
    tls = queue_tls(context.run_config)
    queue = NegativeQueue(cfg.queue_capacity, cfg.embedding_dim, max_age=cfg.max_age,
                          quota_per_version=push_quota(cfg))
    server = QueueServer(queue, {}, host=cfg.queue_host, port=cfg.queue_port, tls=tls)
    server.start()
    _service.update(queue=queue, server=server, tls=tls is not None)
    try:
        yield
    finally:
        # Flower runs this after main() returns or raises (it never throws into the generator).
        server.stop()
        _service.clear()


def absolute_path(run_config: Mapping[str, Any], key: str) -> Path | None:
    """The absolute path named by run-config ``key`` (None when empty); ValueError when relative."""
    value = str(run_config.get(key, "") or "")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"run config {key}={value!r} must be an absolute path: the ServerApp runs in "
            "another working directory (fedcontrast server makes its paths absolute)"
        )
    return path


def queue_tls(run_config: Mapping[str, Any]) -> ServerTLS | None:
    """The queue service's certificate and key from the run config; None (insecure) when unset."""
    cert = absolute_path(run_config, "queue-ssl-certfile")
    key = absolute_path(run_config, "queue-ssl-keyfile")
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError(
            "run config queue-ssl-certfile and queue-ssl-keyfile go together: give both to "
            "serve the queue with TLS, or neither for an insecure queue (loopback only)"
        )
    try:
        return ServerTLS.from_files(cert, key)
    except OSError as exc:
        raise ValueError(
            f"cannot read the queue's TLS file {exc.filename}: {exc.strerror} (run config "
            "queue-ssl-certfile / queue-ssl-keyfile must be readable where the ServerApp runs)"
        ) from exc


def server_dataset(cfg: FedConfig) -> Dataset:
    """The labelled data the server builds the encoder for and evaluates it on."""
    try:
        return load_dataset(cfg.dataset, seed=cfg.seed)
    except ValueError as exc:
        raise ValueError(
            f"the server needs --dataset {cfg.dataset!r} to shape the encoder and evaluate it: {exc}"
        ) from None  # the message holds the cause: one traceback in the log, not two


class NoRoundCounted(RuntimeError):
    """Every round of the run had too few valid replies: the encoder is still the initial one."""


def final_status(rows: list[dict[str, Any]], min_nodes: int, stopped_early: str | None) -> str:
    """The run's status from its round rows (those of the runs it resumes included)."""
    uncounted = [int(r["round"]) for r in rows if not int(r.get("counted", 0))]
    if rows and len(uncounted) == len(rows):
        return (f"failed: NoRoundCounted: none of the {len(rows)} rounds counted (each had fewer "
                f"than --min-nodes {min_nodes} valid replies), so the encoder is the initial one: "
                "see server.log for the nodes' errors, fix or start more clients, or lower "
                "--min-nodes, then run again")
    if stopped_early:
        return "stopped early: " + stopped_early
    if uncounted:
        return (f"completed with uncounted rounds: round(s) {', '.join(map(str, uncounted))} of "
                f"{len(rows)} had fewer than --min-nodes {min_nodes} valid replies and left the "
                "weights as they were (see server.log)")
    return "completed"


class _Model:
    """The global encoder as a torch module: checkpoints and evaluation."""

    def __init__(self, cfg: FedConfig, data: Dataset, run_dir: RunDir, *,
                 pretrain: bool = True) -> None:
        self.cfg = cfg
        self.data = data
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        self.spec = model_spec(cfg, data.in_channels)
        # --pretrain-epochs: round 1 sends the encoder pretrained on synthetic images (not
        # for a resume, which loads its trained weights instead).
        self.module: ContrastiveModel = (initial_model(cfg, data, self.device) if pretrain
                                         else build_model(cfg, data.in_channels))
        self.tokens: NodeTokens | None = None
        #: contributor slot -> rows pushed, this run's and those of the runs it resumes.
        self.pushed_by_slot: dict[int, int] = {}
        # --optimizer-state federated: the nodes' optimiser state, aggregated with the
        # weights; zeros (a fresh optimiser) until round 1 is aggregated or a resume sets it.
        self.optimizer_state = (optim_state.initial_arrays(self.module, cfg)
                                if cfg.optimizer_state == "federated" else {})
        # --key-sync server: the server-averaged key encoder ("key.*" arrays), a copy of the
        # initial model until round 1 is aggregated or a resume sets it.
        self.key_state = key_state.initial_arrays(self.module, cfg)

    def arrays(self) -> ArrayRecord:
        """What round 1 (or a resumed run's next round) sends: weights, optimiser state, key
        encoder."""
        return ArrayRecord({**self.module.state_dict(), **self.optimizer_state, **self.key_state})

    def load(self, arrays: ArrayRecord) -> ContrastiveModel:
        state = arrays.to_torch_state_dict()
        self.key_state = {k: v for k, v in state.items() if k.startswith(key_state.PREFIX)}
        weights, self.optimizer_state = optim_state.split(key_state.split(state)[0])
        self.module.load_state_dict(weights)
        return self.module

    def save(self, arrays: ArrayRecord, rnd: int) -> None:
        next_slot = self.tokens.next_slot if self.tokens else 0
        client_slots = dict(sorted(self.tokens.client_slots.items())) if self.tokens else {}
        save_encoder(self.load(arrays), self.spec, self.run_dir.file("encoder.pt"),
                     round=rnd, next_slot=next_slot, client_slots=client_slots,
                     pushed_by_slot=dict(sorted(self.pushed_by_slot.items())),
                     optimizer_state=self.optimizer_state, key_state=self.key_state)

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        return evaluate_encoder(self.load(arrays).to(self.device), self.data, device=self.device,
                                views=make_views(self.cfg), seed=self.cfg.seed)

    def evaluate_random_init(self) -> dict[str, float]:
        """The encoder as ``cfg.seed`` initialises it, measured as every round is: the level
        training has to beat (``summary.json`` ``random_init``)."""
        logger.info("measuring the random-init encoder before round 1, the level training "
                    "has to beat")
        return evaluate_encoder(build_model(self.cfg, self.data.in_channels).to(self.device),
                                self.data, device=self.device, views=make_views(self.cfg),
                                seed=self.cfg.seed)

    def evaluate_initial(self) -> dict[str, float]:
        """The encoder round 1 sends, measured as every round is (``summary.json``
        ``pretrained_init`` with ``--pretrain-epochs``). Call it before a resume loads
        trained weights."""
        logger.info("measuring the encoder pretrained on synthetic images, where round 1 starts")
        return evaluate_encoder(copy.deepcopy(self.module).to(self.device), self.data,
                                device=self.device, views=make_views(self.cfg), seed=self.cfg.seed)


def _resume(source: Path, run_dir: RunDir, model: _Model,
            queue: NegativeQueue) -> tuple[int, int, dict[str, int]]:
    """Load weights, queue, metrics and the rows each slot pushed of ``source``; return the
    last round done, the next free contributor slot and the clients' slots (client id ->
    slot; empty for a checkpoint written before 24d6180 (2026-12-02), whose clients then
    get new slots)."""
    payload = read_checkpoint(source / "encoder.pt")
    if payload["spec"] != model.spec:
        raise ValueError(
            f"cannot resume {source}: its encoder {payload['spec']} differs from this run's "
            f"{model.spec} (use the settings in {source / 'config.json'})"
        )
    model.module.load_state_dict(payload["state_dict"])
    model.pushed_by_slot = {int(s): int(n) for s, n in dict(payload.get("pushed_by_slot") or {}).items()}
    saved = dict(payload.get("optimizer_state") or {})
    if model.optimizer_state:
        if set(saved) == set(model.optimizer_state) and all(
                saved[k].shape == v.shape for k, v in model.optimizer_state.items()):
            model.optimizer_state = saved
        else:
            logger.warning("resuming %s: it holds no optimiser state for --optimizer %s; the "
                           "nodes' optimisers start afresh", source, model.cfg.optimizer)
    _resume_key(source, payload, model)
    last = int(payload.get("round", 0))
    if (source / QUEUE_SNAPSHOT).exists():
        queue.restore(source / QUEUE_SNAPSHOT)
    if source.resolve() == run_dir.path:
        run_dir.truncate_metrics(lambda row: int(row.get("round", 0)) <= last)
    else:  # rows of an earlier start of this same resume (a retried engine) go first
        run_dir.truncate_metrics(lambda _row: False)
        for row in RunDir(source).read_metrics():
            if int(row.get("round", 0)) <= last:
                run_dir.append_metrics(row)
    client_slots = {str(c): int(slot) for c, slot in dict(payload.get("client_slots") or {}).items()}
    if not client_slots and len(queue):
        logger.warning(
            "resuming %s: its checkpoint names no client's contributor slot (a run with "
            "--client-sampling flower, or one written before 24d6180), so the nodes get new "
            "slots and, for --max-age rounds, the %d restored queue rows are no node's own "
            "(--pull-scope others may pull a client's own rows, own finds none)",
            source, len(queue))
    logger.info("resuming %s after round %d (%d clients keep their contributor slots)",
                source, last, len(client_slots))
    return last, int(payload.get("next_slot", 0)), client_slots


def _resume_key(source: Path, payload: Mapping[str, Any], model: _Model) -> None:
    """The checkpoint's server-averaged key encoder (``--key-sync server``); without one that
    fits, the key encoder restarts as a copy of the resumed weights."""
    if not model.key_state:
        return
    saved = dict(payload.get("key_state") or {})
    if set(saved) == set(model.key_state) and all(
            saved[k].shape == v.shape for k, v in model.key_state.items()):
        model.key_state = saved
    else:
        model.key_state = key_state.initial_arrays(model.module, model.cfg)
        logger.warning("resuming %s: it holds no key encoder (a run with --key-sync local); "
                       "the key encoder restarts as a copy of its weights", source)


def write_summary(summary: dict[str, Any], run_dir: RunDir, cfg: FedConfig, driver: RoundDriver,
                  *, first_round: int, wall_time_s: float, random_init: dict[str, float]) -> None:
    """``summary.json`` (``summary`` completed with the run's figures, the random-init
    encoder's beside the final ones) and ``curves.png``."""
    rows = run_dir.read_metrics()
    client_of = driver.tokens.client_of()
    slots = set(driver.tokens.slots.values()) | set(driver.pushed_by_slot)
    summary.update({
        "rounds": cfg.rounds,
        "first_round": first_round,
        "last_round": rows[-1]["round"] if rows else first_round - 1,
        "counted_rounds": sum(int(r.get("counted", 0)) for r in rows),
        "dropped_replies": dropped_totals(rows),
        "wall_time_s": wall_time_s,
        "final_eval": driver.last_eval,
        "random_init": random_init,
        "queue": driver.queue.stats(),
        "queue_tls": driver.queue_tls,
        "contributors": {str(slot): {"client_id": client_of.get(slot),
                                     "pushed_rows": driver.pushed_by_slot.get(slot, 0)}
                         for slot in sorted(slots)},
        "privacy": driver.privacy_summary(),
    })
    run_dir.write_json("summary.json", summary)
    run_dir.plot("round", PLOTTED, title=f"FedContrast on {cfg.dataset}", random_init=random_init)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Rounds ``1..rounds`` (or the rest of a resumed run), writing the run directory."""
    route_logs_to_flower()
    cfg = from_run_config(FedConfig, context.run_config)
    out = absolute_path(context.run_config, "run-dir")
    if out is None:
        raise ValueError("run config run-dir is required: the absolute path of the run directory")
    resume = absolute_path(context.run_config, "resume")
    queue: NegativeQueue = _service["queue"]
    server: QueueServer = _service["server"]

    run_dir = RunDir(out)
    if resume is None and run_dir.read_metrics():
        raise ValueError(f"{run_dir.path} already holds a run: resume it or choose another run-dir")
    run_dir.write_config(cfg)
    run_dir.write_versions(run_id=context.run_id, resumed_from=str(resume) if resume else None)
    model = _Model(cfg, server_dataset(cfg), run_dir, pretrain=resume is None)
    random_init = model.evaluate_random_init()
    pretrained_init = (model.evaluate_initial() if cfg.pretrain_epochs and resume is None
                       else None)
    last_done, first_slot, client_slots = (_resume(resume, run_dir, model, queue) if resume
                                           else (0, 0, {}))
    tokens = NodeTokens(server.add_token, first_slot=first_slot, client_slots=client_slots)
    model.tokens = tokens
    driver = RoundDriver(
        prompt_grid(grid), build_strategy(cfg), cfg, queue=queue, tokens=tokens, queue_address=server.address,
        queue_tls=_service["tls"], run_dir=run_dir, save_checkpoint=model.save, evaluate=model.evaluate,
        pushed_by_slot=model.pushed_by_slot,
    )
    logger.info("run %d: rounds %d..%d, queue at %s (%s), run directory %s",
                context.run_id, last_done + 1, cfg.rounds, server.address,
                "TLS" if driver.queue_tls else "insecure", run_dir.path)
    start = time.monotonic()
    summary: dict[str, Any] = {"run_id": context.run_id, "status": "running"}
    if pretrained_init is not None:
        summary["pretrained_init"] = pretrained_init
    arrays = model.arrays()
    try:
        arrays = driver.run(arrays, last_done + 1, cfg.rounds)
        summary["status"] = final_status(run_dir.read_metrics(), cfg.min_nodes, driver.stopped_early)
    except Exception as exc:
        summary["status"] = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        write_summary(summary, run_dir, cfg, driver, first_round=last_done + 1,
                      wall_time_s=time.monotonic() - start, random_init=random_init)
    logger.info("run %d %s: %s", context.run_id, summary["status"],
                json.dumps({k: summary[k] for k in ("last_round", "counted_rounds", "final_eval")}))
    if summary["status"].startswith("failed: NoRoundCounted"):
        raise NoRoundCounted(summary["status"].removeprefix("failed: NoRoundCounted: "))
