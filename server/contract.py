"""The message contract between the ServerApp and a node: keys, message types, reply checks.

One TRAIN message per sampled node and round r. Server to node, a RecordDict built
anew for every node (``configure_train`` shares one record among its messages, and
each node's token is its own)::

    "arrays": ArrayRecord   the global encoder's state_dict (version r - 1 of the weights),
                            with --optimizer-state federated also the aggregated optimiser
                            state under "optimizer.*" keys (common/optim_state.py), with
                            --key-sync server also the server-averaged key encoder under
                            "key.*" keys (common/key_state.py)
    "config": ConfigRecord
        "server-round"   int    r
        "lr"             float  the round's learning rate (cosine over the run's rounds)
        "queue-address"  str    host:port of the negative queue service
        "queue-tls"      bool   whether the queue service is served with TLS: the node must
                                then verify it with the CA of its node config
                                (``queue-root-certificates``), and must hold no such CA
                                otherwise (a node trusting the queue over TLS only refuses
                                an insecure one)
        "queue-token"    str    this node's queue token (one per node id per run)
        "queue-version"  int    r: the version every row pushed this round must carry
        (+ whatever the wrapped strategy's configure_train adds, e.g. FedProx's mu)

Node to server, the reply::

    "arrays":  ArrayRecord   the locally trained weights, and the optimiser state and key
                             encoder after training when the message carried them (same
                             keys, order and shapes)
    "metrics": MetricRecord  exactly the keys of REPLY_METRIC_KEYS, on every reply

A node asked who it is (a QUERY of type :data:`IDENTIFY`, with a "config"
ConfigRecord holding only "server-round") replies with a ConfigRecord "identity"
holding "client-id", its stable identity from the node config (see
:mod:`server.sampling`).

A reply with an error (the ClientApp raised), a missing record, another key set,
a metric of another type, other array shapes or a non-finite value is unusable:
:func:`check_reply` says why, as one of :data:`REFUSAL_KINDS` and a short detail.
Valid replies are ordered by :func:`reply_digest`, the SHA-256 of their contents, so
that a round's result depends on what the nodes sent, not on when.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord

from common.runtime.text import brief

TRAIN_CONFIG_KEYS = ("server-round", "lr", "queue-address", "queue-tls", "queue-token",
                     "queue-version")
REPLY_METRIC_KEYS = (
    "num-examples", "train-loss", "global-hits", "global-misses", "pushed-rows",
    "push-failures", "negatives-per-step", "alignment", "uniformity", "epsilon",
)
WEIGHT_KEY = "num-examples"
#: The message type of the query asking a node for its client id (seeded sampling).
IDENTIFY = f"{MessageType.QUERY}.identify"


#: Why a TRAIN reply is unusable, as counted in the round rows (``dropped_<kind>``) and in
#: ``summary.json`` (``dropped_replies``).
REFUSAL_KINDS = (
    "client-error",     # the ClientApp raised: Flower sent back its error
    "records",          # other records than "arrays" and "metrics", or of other types
    "metric-keys",      # other metric keys than REPLY_METRIC_KEYS
    "metric-type",      # a metric that is no int or float (a list, say)
    "metric-value",     # a metric that is NaN or infinite, or num-examples <= 0
    "array-keys",       # other array names, or in another order, than the global model's
    "array-shape",      # an array of another shape or dtype than the global model's
    "array-data",       # an array whose bytes do not match its shape and dtype
    "array-nonfinite",  # an array holding a NaN or infinite value
)


@dataclass(frozen=True)
class Refusal:
    """Why a reply is unusable: one of :data:`REFUSAL_KINDS` and a short detail."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def check_reply(msg: Message, reference: ArrayRecord) -> Refusal | None:
    """Why ``msg`` cannot be aggregated against the global ``reference``; None if it can.

    Every detail is one short line (:func:`common.runtime.text.brief`): a node chooses what its
    reply holds, error text included.
    """
    problem = _reply_problem(msg, reference)
    return None if problem is None else Refusal(problem[0], brief(problem[1]))


def _reply_problem(msg: Message, reference: ArrayRecord) -> tuple[str, str] | None:
    if msg.has_error():
        return "client-error", str(msg.error.reason)
    content = msg.content
    if set(content.keys()) != {"arrays", "metrics"}:
        return "records", f"records {sorted(content.keys())}, expected ['arrays', 'metrics']"
    arrays, metrics = content["arrays"], content["metrics"]
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return "records", "'arrays' must be an ArrayRecord and 'metrics' a MetricRecord"
    if set(metrics.keys()) != set(REPLY_METRIC_KEYS):
        return "metric-keys", f"metric keys {sorted(metrics.keys())}, expected {sorted(REPLY_METRIC_KEYS)}"
    for key in REPLY_METRIC_KEYS:
        value = metrics[key]
        if type(value) not in (int, float):
            return "metric-type", f"metric {key!r} is a {type(value).__name__}, not a number"
        if not math.isfinite(value):
            return "metric-value", f"metric {key!r} is {value}"
    if metrics[WEIGHT_KEY] <= 0:
        return "metric-value", f"{WEIGHT_KEY} must be positive, got {metrics[WEIGHT_KEY]}"
    if list(arrays.keys()) != list(reference.keys()):
        return "array-keys", "array keys differ from the global model's"
    for key in reference.keys():
        mine, ref = arrays[key], reference[key]
        if tuple(mine.shape) != tuple(ref.shape) or mine.dtype != ref.dtype:
            return "array-shape", (f"array {key!r} is {mine.dtype}{list(mine.shape)}, "
                                   f"expected {ref.dtype}{list(ref.shape)}")
        try:
            values = mine.numpy()
        except (ValueError, TypeError):
            return "array-data", f"array {key!r}: its bytes are no {mine.dtype}{list(mine.shape)}"
        if not np.isfinite(values).all():
            return "array-nonfinite", f"array {key!r} has a NaN or infinite value"
    return None


def addressees(sent: Sequence[Message]) -> dict[str, int]:
    """Message id -> destination node, for messages the grid has sent (it sets their ids)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def answering_node(reply: Message, addressed: Mapping[str, int]) -> int:
    """The node ``reply`` answers for: the addressee of the message it replies to.

    Usually the reply's sender. But when a node stops sending heartbeats, the SuperLink
    answers in its place with a "Node Unavailable" error whose sender is the SuperLink
    itself; only ``reply_to_message_id`` ties it to the node. Counting it by sender would
    count that node twice: once failed, once silent.
    """
    return addressed.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def reply_digest(msg: Message) -> bytes:
    """SHA-256 of a valid reply's arrays (name, dtype, shape, bytes) and metrics: a sort
    key that orders replies by what they hold."""
    h = hashlib.sha256()
    for key, array in msg.content["arrays"].items():
        values = np.ascontiguousarray(array.numpy())
        h.update(f"{key}|{values.dtype}|{values.shape}|".encode())
        h.update(values.tobytes())
    for key, value in sorted(msg.content["metrics"].items()):
        h.update(f"{key}={value!r};".encode())
    return h.digest()


def check_identity_reply(msg: Message) -> str | None:
    """Why the reply to an identify QUERY is unusable; None if it is fine."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    identity = msg.content.get("identity")
    if not isinstance(identity, ConfigRecord) or not isinstance(identity.get("client-id"), str) \
            or not identity["client-id"]:
        return "expected a ConfigRecord 'identity' with a non-empty string 'client-id'"
    return None
