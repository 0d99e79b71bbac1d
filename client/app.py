"""The ClientApp: Flower's messages to a node, answered by one local round.

A thin adapter (see ``server/contract.py`` for the message contract): it reads the
settings from the run config and the node's data and identity from the node config
(:mod:`client.settings`, which lists its keys), calls the round
(:mod:`client.round`, plain torch plus the queue stub) and wraps what it returns in
records.

With ``--client-sampling seeded`` and a ``--fraction-train`` below 1 the node answers one
identify QUERY (:func:`identify`) with its client id, once per run.

A node with bad data or configuration (a ``ValueError``: a partition its data cannot
give, a malformed file, a queue whose TLS disagrees) answers with an error reply that
says what is wrong and what to do, and logs that one line (:func:`answered`); the
server logs it and goes on with the other nodes. Anything else raises, and Flower
reports it with its traceback.

With ``--objective byol`` the round is :func:`client.byol_round.train_byol_round` (no
queue), from the client's own model of the run kept in its state directory.

With ``--dp true`` (see :mod:`client.privacy`) the round's releases are recorded in the
client's accountant, and saved, before training starts; the reply's ``epsilon`` is the
client's epsilon with them, and the statistics of local data that the accountant does
not cover (:data:`client.privacy.WITHHELD_UNDER_DP`) are sent as 0.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.byol_round import load_local, save_local, train_byol_round
from client.data import local_images
from client.privacy import plan_round
from client.round import train_round
from client.settings import NodeSettings, queue_root_certificates
from client.state import StateDir
from common import key_state, optim_state
from common.config import FedConfig, from_run_config

logger = logging.getLogger(__name__)

app = ClientApp()

#: Names this module held before the round moved out of it: name -> its module now.
#: (The names the handlers use, such as train_round and NodeSettings, are still here.)
_MOVED = {
    "GEOMETRY_SAMPLE": "client.round", "PUSH_CHUNK": "client.round",
    "push_keys": "client.round", "local_geometry": "client.round",
    "partition_indices": "client.data", "build_model": "common.model",
}


def __getattr__(name: str) -> Any:
    """The moved names, still importable from here for a while, with a DeprecationWarning."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"client.app.{name} moved to {_MOVED[name]}.{name}; import it from there",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)


Handler = Callable[[Message, Context], Message]


def answered(handler: Handler) -> Handler:
    """``handler`` with its ``ValueError`` answered as an error reply and one log line."""

    @functools.wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ValueError as exc:
            who = context.node_config.get("client-id") or f"node {context.node_id}"
            logger.error("client %s cannot answer the %s message: %s", who,
                         msg.metadata.message_type, exc)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    return answer


@app.query("identify")
@answered
def identify(msg: Message, context: Context) -> Message:
    """Flower's entry point for the identify QUERY (``--client-sampling seeded``): the
    node's client id, by which the server orders the nodes it samples from. Reads the
    node config only: no data, no model."""
    node = NodeSettings.from_node_config(context.node_config)
    return Message(content=RecordDict({"identity": ConfigRecord({"client-id": node.client_id})}),
                   reply_to=msg)


@app.train()
@answered
def train(msg: Message, context: Context) -> Message:
    """Flower's entry point for a TRAIN message (contract in ``server/contract.py``)."""
    cfg = from_run_config(FedConfig, context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    # Before anything is planned or recorded: a mismatch fails the round, releasing nothing.
    queue_ca = queue_root_certificates(node, bool(config.get("queue-tls", False)))
    state_dir = StateDir(node.state_dir, node.client_id)
    state = state_dir.load()
    x = local_images(cfg, node)
    privacy = None
    if cfg.dp:
        privacy = plan_round(cfg, state, x.shape[0], server_round,
                             queue_token=str(config["queue-token"]),
                             queue_version=int(config["queue-version"]))
        state_dir.save(state)  # the round's releases are on disk before any is made
    rest, key_arrays = key_state.split(msg.content["arrays"].to_torch_state_dict())
    received, optimizer_state = optim_state.split(rest)
    if cfg.objective == "byol":
        weights, metrics = _byol_round(cfg, x, received, state_dir, context.run_id,
                                       lr=float(config["lr"]), seed=state.seed(cfg.seed, server_round),
                                       optimizer_state=optimizer_state or None)
    else:
        weights, metrics = train_round(
            cfg, x, received,
            lr=float(config["lr"]),
            queue_address=str(config["queue-address"]),
            queue_token=str(config["queue-token"]),
            queue_version=int(config["queue-version"]),
            seed=state.seed(cfg.seed, server_round),
            privacy=privacy,
            queue_root_certificates=queue_ca,
            # The reply carries optimiser state exactly when the message did: its keys
            # must be those of the server's arrays.
            optimizer_state=optimizer_state or None,
            key_arrays=key_arrays or None,  # --key-sync server: the key encoder comes back too
        )
    state.record_round(context.run_id, server_round)
    state_dir.save(state)
    logger.info("client %s round %d: loss %.4f, %d rows pushed, %d queue misses, epsilon %.4g",
                node.client_id, server_round, metrics["train-loss"], metrics["pushed-rows"],
                metrics["global-misses"], metrics["epsilon"])
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _byol_round(cfg: FedConfig, x: Any, received: dict[str, Any], state_dir: StateDir,
                run_id: int, **round_args: Any) -> tuple[dict[str, Any], dict[str, float | int]]:
    """``--objective byol``: the round from the client's own model of this run, kept after it."""
    weights, metrics, kept = train_byol_round(cfg, x, received, run_id=run_id,
                                              local=load_local(state_dir, run_id), **round_args)
    save_local(state_dir, kept)
    return weights, metrics
