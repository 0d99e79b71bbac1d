"""A federation's rounds in one process: the clients' own round, FedAvg, the real queue.

For a machine where Flower's engine cannot run (a GPU host with torch alone, as
``bench/gpu_bench.py`` expects) and for measuring the engine's overhead: every round,
each client runs :func:`client.round.train_round` (or, for the BYOL methods,
:func:`client.byol_round.train_byol_round`, its BYOL state kept here between its rounds)
from the global weights, one after the other on the same device, and the server
averages the replies weighted by their examples (FedAvg over weights, optimiser
state and, with ``--key-sync server``, the key encoder). With the
global queue in use, the real queue service serves on loopback: a
:class:`~server.queue.NegativeQueue` behind :class:`~server.service.QueueServer`, one
token and contributor slot per client, advanced to each round's version as the
ServerApp does. Client seeds are :func:`client.state.round_seed`'s, so each client's
random stream is a federated node's.

With ``--dp true`` each client keeps its :class:`~client.state.ClientState` here, in
memory, and plans every round with :func:`client.privacy.plan_round` (its noise derived
for ``--target-epsilon`` and its releases accounted before it trains), as a federated
node does with its state directory; each round's record holds the largest epsilon of its
clients (``extra["epsilon"]``).

What it leaves out of the federation: client sampling (every client trains every round),
robust aggregation, checkpoints and the run directory.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from client.byol_round import train_byol_round
from client.divergence import LocalBYOL
from client.privacy import plan_round
from client.round import train_round
from client.state import ClientState, round_seed
from common import key_state, optim_state
from common.config import FedConfig, push_quota
from common.model import build_model
from common.schedule import cosine_lr
from common.synthetic import pretrain
from server.queue import NegativeQueue
from server.service import QueueServer

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def fedavg(replies: Sequence[tuple[State, int]]) -> State:
    """The mean of every array of the replies, weighted by their example counts."""
    total = sum(n for _, n in replies)
    return {k: sum(s[k].double() * (n / total) for s, n in replies).to(replies[0][0][k].dtype)
            for k in replies[0][0]}


@dataclass
class RoundRecord:
    """What one in-process round did."""

    round: int
    seconds: float
    train_loss: float
    examples: int
    pushed_rows: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def uses_queue(cfg: FedConfig) -> bool:
    return cfg.global_negatives > 0 or cfg.push_fraction > 0


@contextmanager
def queue_service(cfg: FedConfig, clients: int) -> Iterator[tuple[NegativeQueue | None, str, list[str]]]:
    """The run's queue on loopback with one token per client, or nothing without a queue;
    stopped on exit."""
    if not uses_queue(cfg):
        yield None, "127.0.0.1:1", [""] * clients
        return
    queue = NegativeQueue(cfg.queue_capacity, cfg.embedding_dim, max_age=cfg.max_age,
                          quota_per_version=push_quota(cfg))
    tokens = [secrets.token_hex(16) for _ in range(clients)]
    server = QueueServer(queue, {t: slot for slot, t in enumerate(tokens)}, host="127.0.0.1", port=0)
    server.start()
    try:
        yield queue, server.address, tokens
    finally:
        server.stop()


def run_federation(cfg: FedConfig, xs: Sequence[torch.Tensor], in_channels: int,
                   on_round: Callable[[RoundRecord, torch.nn.Module], bool] | None = None,
                   ) -> tuple[torch.nn.Module, list[RoundRecord]]:
    """``cfg.rounds`` rounds of every client in ``xs`` (one tensor of items each); returns
    the global model and a record per round. ``on_round`` sees each record and the global
    model after the round's aggregation; when it returns True, no further round runs."""
    model = build_model(cfg, in_channels)
    if cfg.pretrain_epochs:  # as the ServerApp's round 1 (common.model.initial_model)
        pretrain(model, cfg, tuple(xs[0].shape[1:]))
    arrays = {**model.state_dict(), **optim_state.initial_arrays(model, cfg),
              **key_state.initial_arrays(model, cfg)}
    lr_at = cosine_lr(cfg.lr, cfg.rounds)
    ids = [f"partition-{i}" for i in range(len(xs))]
    byol: dict[str, LocalBYOL | None] = dict.fromkeys(ids)
    states = {cid: ClientState(cid) for cid in ids}  # --dp true: each client's accountant
    records = []
    with queue_service(cfg, len(xs)) as (queue, address, tokens):
        for rnd in range(1, cfg.rounds + 1):
            start = time.perf_counter()
            if queue is not None:
                queue.advance(rnd)
            rest, key = key_state.split(arrays)
            weights, opt = optim_state.split(rest)
            replies, losses, pushed, epsilons = [], [], 0, []
            for cid, token, x in zip(ids, tokens, xs, strict=True):
                seed = round_seed(cfg.seed, cid, rnd)
                if cfg.objective == "byol":
                    new, metrics, byol[cid] = train_byol_round(
                        cfg, x, weights, lr=lr_at(rnd - 1), seed=seed, run_id=0, local=byol[cid],
                        optimizer_state=opt or None)
                else:
                    privacy = (plan_round(cfg, states[cid], x.shape[0], rnd, queue_token=token,
                                          queue_version=rnd) if cfg.dp else None)
                    new, metrics = train_round(
                        cfg, x, weights, lr=lr_at(rnd - 1), queue_address=address, queue_token=token,
                        queue_version=rnd, seed=seed, privacy=privacy, optimizer_state=opt or None,
                        key_arrays=key or None)
                    states[cid].record_round(0, rnd)
                    if privacy is not None:
                        epsilons.append(privacy.epsilon)
                replies.append((new, int(metrics["num-examples"])))
                losses.append(float(metrics["train-loss"]))
                pushed += int(metrics.get("pushed-rows", 0))
            arrays = fedavg(replies)
            model.load_state_dict(optim_state.split(key_state.split(arrays)[0])[0])
            record = RoundRecord(rnd, time.perf_counter() - start, sum(losses) / len(losses),
                                 sum(n for _, n in replies), pushed,
                                 {"epsilon": max(epsilons)} if epsilons else {})
            records.append(record)
            logger.info("round %d of %d: %.1f s, loss %.4f, %d rows pushed", rnd, cfg.rounds,
                        record.seconds, record.train_loss, pushed)
            if on_round is not None and on_round(record, model):
                break
    return model, records
