"""A run stopped after a round and resumed ends exactly where the run never stopped ends.

The real ServerApp (``server.app.app``: its lifespan serving the negative queue over
gRPC on loopback, its main with the round driver, checkpoints and ``--resume``) and the
real ClientApp (``client.app.app``, dispatching TRAIN and the identify QUERY). Only
Flower's grid is a stand-in: it hands each message to the ClientApp in this process,
as a SuperNode would, with node ids of its own per run (the SuperLink gives new ones),
and it can stop the ServerApp at a round, as a crash or Ctrl-C would. The deployment
and simulation tests run the same apps in real Flower processes.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client import app as client_app
from common.checkpoint import read_checkpoint
from common.config import FedConfig, to_run_config
from common.runtime.rundir import RunDir
from server import app as server_app

pytestmark = pytest.mark.usefixtures("flower_task_identity", "one_thread")

CLIENTS = ("c0", "c1", "c2")
CFG = FedConfig(dataset="digits", rounds=3, width=8, embedding_dim=16, batch_size=32,
                global_negatives=64, push_fraction=0.5, max_age=1, partitioner="dirichlet",
                dirichlet_alpha=0.3, min_nodes=3, eval_every=0, device="cpu", seed=5)


class Stopped(RuntimeError):
    """The stand-in grid stopped the ServerApp, as a crash would."""


class InProcessGrid:
    """Flower's grid for one run: ``nodes`` maps node id -> client id; each message goes
    to the real ClientApp with that client's node config. ``stop_at``: the round whose
    first message stops the run instead."""

    def __init__(self, cfg: FedConfig, nodes: dict[int, str], root: Path,
                 stop_at: int | None = None) -> None:
        self.cfg = cfg
        self.nodes = nodes
        self.root = root
        self.stop_at = stop_at
        self.run_id = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            if int(msg.content["config"]["server-round"]) == self.stop_at:
                raise Stopped(f"stopped at round {self.stop_at}")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the grid does
            client_id = self.nodes[msg.metadata.dst_node_id]
            node_config = {"partition-id": CLIENTS.index(client_id), "num-partitions": len(CLIENTS),
                           "client-id": client_id, "state-dir": str(self.root / "state" / client_id)}
            context = Context(run_id=self.run_id, node_id=msg.metadata.dst_node_id,
                              node_config=node_config, state=RecordDict(),
                              run_config=to_run_config(self.cfg))
            replies.append(client_app.app(msg, context))
        return replies


def run_server(grid: InProcessGrid, run_dir: Path, run_id: int, resume: Path | None = None) -> None:
    """The ServerApp as Flower's ServerApp process calls it: lifespan, then main."""
    grid.run_id = run_id
    run_config = {**to_run_config(grid.cfg), "run-dir": str(run_dir), "resume": str(resume or "")}
    server_app.app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=run_config))


@pytest.fixture
def our_loggers():
    """The ServerApp routes our loggers to Flower's handlers; put them back afterwards."""
    loggers = [logging.getLogger(n) for n in ("common", "client", "server")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    yield
    for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "encoder.pt")["state_dict"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("settings", [
    {"pull_scope": "others"}, {"pull_scope": "own"},  # fedcontrast's and fedmoco's queues
    {"key_mode": "ema", "key_sync": "server"},  # fedcontrast-key: the key encoder resumes too
], ids=["others", "own", "key-sync-server"])
def test_a_run_stopped_after_round_two_and_resumed_ends_with_the_uninterrupted_runs_encoder(
        tmp_path, our_loggers, settings):
    # Without the clients' slots kept through the resume, round 3's loss differs (checked):
    # each client's rows of round 2 were another's, pulled (others) or missed (own).
    cfg = replace(CFG, **settings)
    whole = tmp_path / "whole"
    run_server(InProcessGrid(cfg, {11: "c0", 12: "c1", 13: "c2"}, whole), whole / "run", run_id=1)

    # The same run stopped in round 3, then resumed under other node ids, in another order.
    part = tmp_path / "part"
    with pytest.raises(Stopped):
        run_server(InProcessGrid(cfg, {21: "c0", 22: "c1", 23: "c2"}, part, stop_at=3), part / "run",
                   run_id=2)
    stopped = read_checkpoint(part / "run" / "encoder.pt")
    assert stopped["round"] == 2 and sorted(stopped["client_slots"]) == list(CLIENTS)
    run_server(InProcessGrid(cfg, {31: "c2", 32: "c0", 33: "c1"}, part), part / "run", run_id=3,
               resume=part / "run")

    rows = {name: RunDir(root / "run").read_metrics() for name, root in (("whole", whole), ("part", part))}
    assert [r["round"] for r in rows["part"]] == [1, 2, 3]
    # Round 3 trained on pulled rows, and nothing a full queue dropped made the runs differ.
    assert rows["whole"][-1]["negatives_per_step"] > 0
    assert all(r["queue_overwritten_rows_total"] == 0 for r in rows["whole"] + rows["part"])
    assert [r["train_loss"] for r in rows["part"]] == [r["train_loss"] for r in rows["whole"]]
    a, b = weights(whole / "run"), weights(part / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The whole checkpoint too: weights, optimiser state, and the clients' slots, numbered
    # in client-id order whatever node ids and order the grid had.
    assert (whole / "run" / "encoder.pt").read_bytes() == (part / "run" / "encoder.pt").read_bytes()
    assert bool(stopped["key_state"]) == (cfg.key_sync == "server")  # and the key encoder

    # Each client kept its contributor slot through the resume.
    assert read_checkpoint(part / "run" / "encoder.pt")["client_slots"] == stopped["client_slots"]
    summary = json.loads((part / "run" / "summary.json").read_text())
    assert {c["client_id"] for c in summary["contributors"].values()} == set(CLIENTS)
    assert {int(s): c["client_id"] for s, c in summary["contributors"].items()} == \
        {s: c for c, s in stopped["client_slots"].items()}
