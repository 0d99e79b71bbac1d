"""The round driver: FedContrast's own round loop around a Flower strategy.

Flower's ``Strategy.start`` cannot begin at an arbitrary round, hands every node
the same config record, and samples nodes by waiting forever for its minimums.
:class:`RoundDriver` therefore drives the rounds itself and uses the wrapped
strategy for what it is good at: sampling (``configure_train``) and combining
weights (``aggregate_train``: FedAvg, FedTrimmedAvg, FedMedian, Krum).

Message contract (one TRAIN message per sampled node and round r)
-----------------------------------------------------------------

Server to node, a RecordDict built anew for every node (``configure_train``
shares one record among its messages, and each node's token is its own)::

    "arrays": ArrayRecord   the global encoder's state_dict (version r - 1 of the weights),
                            with --optimizer-state federated also the aggregated optimiser
                            state under "optimizer.*" keys (common/optim_state.py)
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

    "arrays":  ArrayRecord   the locally trained weights, and the optimiser state after
                             training when the message carried one (same keys and shapes)
    "metrics": MetricRecord  exactly the keys of REPLY_METRIC_KEYS, on every reply

With ``--push-timing before``, a push phase precedes the TRAIN messages: one QUERY
message per node about to train, with the same "arrays" and "config"; the node pushes
keys of those weights (version r) to the queue and replies with a MetricRecord
"metrics" holding exactly PUSH_REPLY_METRIC_KEYS. Only then are the TRAIN messages
sent, so every node's pulls can find version-r rows of every other node from its
first step; its TRAIN reply then reports 0 pushed rows. A failed push phase is logged
and the node still trains.

With ``--client-sampling seeded`` (the default) and a ``--fraction-train`` that leaves
nodes out, the driver samples, not the strategy: before a node is first sampled from, it
gets one QUERY message of type :data:`IDENTIFY` (a "config" ConfigRecord holding only
"server-round") and replies with a ConfigRecord "identity" holding "client-id", its
stable identity from the node config. Each round then draws ``max(1, int(online x fraction))`` of the online
nodes with :func:`seeded_sample` over their client ids, by ``--seed`` and the round, so
the same run repeated, and every method ``compare`` runs, trains the same clients in the
same rounds; Flower's node ids are random per run and cannot serve. A node that does not
identify itself is drawn after the identified ones, by node id (not reproducible), and
asked again the next round; the round row's ``sampled_clients`` names the clients drawn.
With ``--client-sampling seeded``, nodes are identified the same way when the clients
use the queue, whatever the fraction (without a draw, each node is asked once): each
client then keeps one contributor slot across SuperNode restarts and resumed runs
(:class:`NodeTokens`; the checkpoint holds client id -> slot), so the queue recognises
the rows it pushed before as its own.

A reply with an error (the ClientApp raised), a missing record, another key set,
other array shapes or a non-finite value is dropped and logged with its reason;
the round goes on with the others. A round counts when at least ``min_nodes``
valid replies arrived; otherwise the global weights stay as they were.

Replies are aggregated in the order of their contents' SHA-256 digests
(:func:`reply_digest`), not in the order they arrived: a float sum depends on its
order, and a round's result should depend on what the nodes sent, not on when. With the
nodes' pulls reproducible too (``--pull-mode reproducible``: only rows of finished rounds,
seeded draws), what a node sends does not depend on when the others ran either, so a run
repeats exactly. The round rows count the rows a full queue overwrote
(``queue_overwritten_rows_total``), which breaks that, and the driver warns of them.

Aggregation of the metrics: weighted means (by ``num-examples``) from the
wrapped strategy for losses and geometry, sums for counts (:data:`SUMMED_KEYS`),
the maximum for privacy spent (:data:`MAX_KEYS`).

Privacy in the round rows (``--dp true``): ``epsilon`` is the largest epsilon a client
reported this round, ``epsilon_max`` the largest over every client seen so far in the
run (a resumed run continues from its rows), ``pushes_private`` is 0 when pushed rows
are not noised and so not covered by any epsilon. Statistics that DP clients withhold
(:data:`common.accounting.WITHHELD_UNDER_DP`) are left out of the rows. With
``--epsilon-budget``, the round whose ``epsilon_max`` reaches it is the last.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.accounting import ADJACENCY, WITHHELD_UNDER_DP
from common.config import FedConfig
from common.optim_state import PREFIX as OPTIMIZER_PREFIX
from common.rundir import RunDir
from common.schedule import cosine_lr
from server.queue import NegativeQueue

logger = logging.getLogger(__name__)
T = TypeVar("T")

TRAIN_CONFIG_KEYS = ("server-round", "lr", "queue-address", "queue-tls", "queue-token",
                     "queue-version")
REPLY_METRIC_KEYS = (
    "num-examples", "train-loss", "global-hits", "global-misses", "pushed-rows",
    "push-failures", "negatives-per-step", "alignment", "uniformity", "epsilon",
)
WEIGHT_KEY = "num-examples"
#: The message type of the query asking a node for its client id (seeded sampling).
IDENTIFY = f"{MessageType.QUERY}.identify"
#: The reply to a push-phase QUERY (``--push-timing before``): rows pushed, pushes that failed.
PUSH_REPLY_METRIC_KEYS = ("pushed-rows", "push-failures")
SUMMED_KEYS = ("num-examples", "global-hits", "global-misses", "pushed-rows", "push-failures")
MAX_KEYS = ("epsilon",)
#: Round-row keys plotted in curves.png.
PLOTTED = ("train_loss", "knn_backbone", "uniformity_head", "alignment_head", "uniformity",
           "global_hits", "global_misses", "pushed_rows", "queue_size")


def build_strategy(cfg: FedConfig) -> FedAvg:
    """The Flower strategy named by ``cfg.aggregation``.

    Its node minimums are 1: the driver waits for ``cfg.min_nodes`` itself, with a
    deadline, and hands the strategy only nodes that are online (Flower's
    ``sample_nodes`` would otherwise wait forever for its minimums).
    """
    common: dict[str, Any] = {
        # Seeded sampling happens in the driver, which hands the strategy the drawn nodes.
        "fraction_train": 1.0 if cfg.client_sampling == "seeded" else cfg.fraction_train,
        "min_train_nodes": 1, "min_available_nodes": 1,
        "min_evaluate_nodes": 1, "weighted_by_key": WEIGHT_KEY,
    }
    if cfg.aggregation == "fedavg":
        return FedAvg(**common)
    if cfg.aggregation == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if cfg.aggregation == "fedmedian":
        return FedMedian(**common)
    if cfg.aggregation == "krum":
        return WeightsKrum(**common, num_malicious_nodes=cfg.krum_f)
    raise ValueError(f"unknown aggregation {cfg.aggregation!r}")


class WeightsKrum(Krum):
    """Krum whose distances between replies count the model weights only.

    With ``--optimizer-state federated`` a reply also carries the node's optimiser state
    (``optimizer.*`` arrays, :mod:`common.optim_state`). Flower's Krum would measure
    distances over everything: Adam's step count alone differs between nodes by their
    number of local steps, and its square dwarfs the weights' distances, so Krum would
    pick the node with the median data size rather than the one nearest the others.
    Here the choice is made on the weights; the chosen reply is then taken whole,
    optimiser state included.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        weights_only = [RecordDict({
            "arrays": ArrayRecord({k: v for k, v in c["arrays"].items()
                                   if not k.startswith(OPTIMIZER_PREFIX)}),
            "metrics": c["metrics"],
        }) for c in contents]
        chosen = select_multikrum(weights_only, num_malicious_nodes=self.num_malicious_nodes,
                                  num_nodes_to_select=self.num_nodes_to_select)
        whole = {id(w): c for w, c in zip(weights_only, contents, strict=True)}
        picked = [whole[id(w)] for w in chosen]
        return (aggregate_arrayrecords(picked, self.weighted_by_key),
                self.train_metrics_aggr_fn(picked, self.weighted_by_key))


def uses_queue(cfg: FedConfig) -> bool:
    """Whether the clients of a run with ``cfg`` pull from or push to the global queue."""
    return cfg.global_negatives > 0 or cfg.push_fraction > 0


class NotEnoughNodes(RuntimeError):
    """Fewer than ``min_nodes`` nodes were online when the wait for them ended."""


class NodeTokens:
    """One queue token per Flower node id and one contributor slot per client, for one run.

    A node that identified itself (its client id, see :meth:`RoundDriver.identify`) gets
    the slot its client had before: in this run, when its SuperNode restarted under a new
    node id, or in the run a resume continues (``client_slots`` from the checkpoint). The
    queue then keeps recognising the rows that client pushed before as its own
    (``--pull-scope``). A node that did not identify itself gets a slot of its own. Tokens
    are never reused: a restarted SuperNode gets a new one, and a token never outlives
    the process it was handed to by more than the run.

    Client ids are the nodes' own word: two nodes that report one client id share its
    slot (the driver warns of them).

    Args:
        register: hands a new ``(token, slot)`` to the queue service
            (``QueueServer.add_token``).
        first_slot: the first new slot to give out (above the slots of a restored queue).
        client_slots: client id -> slot, of the run a resume continues.
    """

    def __init__(self, register: Callable[[str, int], None], first_slot: int = 0,
                 client_slots: Mapping[str, int] | None = None) -> None:
        self._register = register
        self._tokens: dict[int, str] = {}
        #: node id -> slot, for the nodes given a token in this run.
        self.slots: dict[int, int] = {}
        #: client id -> slot, for every identified client of this run and the runs it resumes.
        self.client_slots: dict[str, int] = {str(c): int(s) for c, s in (client_slots or {}).items()}
        self.next_slot = max([first_slot, *(s + 1 for s in self.client_slots.values())])

    def token_for(self, node_id: int, client_id: str | None = None) -> str:
        """The token of ``node_id``: on its first call a new one, registered with the slot of
        ``client_id`` (a new slot for a client not seen before, or for ``None``). A node
        that names its client only later leaves that client its slot."""
        if node_id in self._tokens:
            if client_id is not None and client_id not in self.client_slots:
                # identified only after its token was handed out: its slot is its client's
                self.client_slots[client_id] = self.slots[node_id]
        else:
            slot = self.client_slots.get(client_id) if client_id is not None else None
            if slot is None:
                slot = self.next_slot
                self.next_slot += 1
                if client_id is not None:
                    self.client_slots[client_id] = slot
            token = secrets.token_urlsafe(32)
            self._register(token, slot)
            self._tokens[node_id] = token
            self.slots[node_id] = slot
        return self._tokens[node_id]

    def client_of(self) -> dict[int, str]:
        """Slot -> client id, for the slots of identified clients."""
        return {s: c for c, s in self.client_slots.items()}


class _OnlineNodes:
    """The grid as the strategy's sampler sees it: a fixed list of online node ids."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def check_reply(msg: Message, reference: ArrayRecord) -> str | None:
    """Why ``msg`` cannot be aggregated against the global ``reference``; None if it can."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if set(content.keys()) != {"arrays", "metrics"}:
        return f"records {sorted(content.keys())}, expected ['arrays', 'metrics']"
    arrays, metrics = content["arrays"], content["metrics"]
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return "'arrays' must be an ArrayRecord and 'metrics' a MetricRecord"
    if set(metrics.keys()) != set(REPLY_METRIC_KEYS):
        return f"metric keys {sorted(metrics.keys())}, expected {sorted(REPLY_METRIC_KEYS)}"
    values = [metrics[k] for k in REPLY_METRIC_KEYS]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return "a metric is not a finite number"
    if metrics[WEIGHT_KEY] <= 0:
        return f"{WEIGHT_KEY} must be positive, got {metrics[WEIGHT_KEY]}"
    if list(arrays.keys()) != list(reference.keys()):
        return "array keys differ from the global model's"
    for key in reference.keys():
        mine, ref = arrays[key], reference[key]
        if tuple(mine.shape) != tuple(ref.shape) or mine.dtype != ref.dtype:
            return f"array {key!r} is {mine.dtype}{list(mine.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if not np.isfinite(mine.numpy()).all():
            return f"array {key!r} has a NaN or infinite value"
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


def seeded_sample(pool: Sequence[T], k: int, seed: int, rnd: int) -> list[T]:
    """``k`` items of ``pool`` (all if it holds fewer) for round ``rnd`` of a run seeded
    ``seed``: the same draw for the same pool order, seed and round in any process (a
    string seed is hashed with SHA-512, not Python's per-process hash)."""
    rng = random.Random(f"fedcontrast-client-sampling:{seed}:{rnd}")
    return rng.sample(list(pool), min(k, len(pool)))


def check_identity_reply(msg: Message) -> str | None:
    """Why the reply to an identify QUERY is unusable; None if it is fine."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    identity = msg.content.get("identity")
    if not isinstance(identity, ConfigRecord) or not isinstance(identity.get("client-id"), str) \
            or not identity["client-id"]:
        return "expected a ConfigRecord 'identity' with a non-empty string 'client-id'"
    return None


def check_push_reply(msg: Message) -> str | None:
    """Why the reply to a push-phase QUERY is unusable; None if it is fine."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    metrics = msg.content.get("metrics")
    if not isinstance(metrics, MetricRecord) or set(metrics.keys()) != set(PUSH_REPLY_METRIC_KEYS):
        return f"expected a MetricRecord 'metrics' with keys {sorted(PUSH_REPLY_METRIC_KEYS)}"
    if not all(isinstance(metrics[k], int) and metrics[k] >= 0 for k in PUSH_REPLY_METRIC_KEYS):
        return "a count is not a non-negative integer"
    return None


def combine_metrics(contents: Sequence[RecordDict], means: MetricRecord | None) -> dict[str, float | int]:
    """Round metrics from valid replies: the strategy's weighted ``means``, sums, maxima."""
    out: dict[str, float] = {}
    for key in REPLY_METRIC_KEYS:
        values = [c["metrics"][key] for c in contents]
        if key in SUMMED_KEYS:
            out[key] = sum(values)
        elif key in MAX_KEYS:
            out[key] = float(max(values))
        elif means is not None and key in means:
            out[key] = float(means[key])
        else:  # a strategy that selects (Krum) still reports; fall back to the plain mean
            out[key] = float(sum(values) / len(values))
    return out


def collapse_suspected(uniformity: float, bound: float, losses: Sequence[float]) -> bool:
    """Uniformity above ``bound`` while the training loss still falls: a sign of collapse.

    A collapsing encoder lowers the InfoNCE loss against stale negatives by moving every
    embedding to one place; the loss alone looks healthy (see DESIGN.md, evidence).
    ``losses`` are the counted rounds' training losses, oldest first.
    """
    return uniformity > bound and len(losses) >= 2 and losses[-1] < losses[-2]


def pushes_private(cfg: FedConfig) -> bool:
    """Whether every pushed row is covered by the clients' epsilon: DP with noised pushes, or none."""
    return cfg.dp and (cfg.push_noise > 0 or cfg.push_fraction == 0)


def row_key(key: str) -> str:
    """Metric key as written to the run directory (``train-loss`` -> ``train_loss``)."""
    return key.replace("-", "_")


@dataclass
class RoundResult:
    """What one round produced."""

    round: int
    arrays: ArrayRecord
    counted: bool
    row: dict[str, Any]
    pushed_by_node: dict[int, int] = field(default_factory=dict)


class RoundDriver:
    """Runs rounds ``first..last`` over a Flower grid, writing the run directory as it goes.

    Args:
        grid: Flower's grid (the ServerApp's, or a fake in unit tests).
        strategy: the Flower strategy that samples and aggregates (:func:`build_strategy`).
        cfg: the run's settings (rounds, min_nodes, timeouts, eval and collapse settings).
        queue: the global negative queue, advanced to round r before round r.
        tokens: the run's per-node queue tokens.
        queue_address: ``host:port`` that nodes connect to.
        queue_tls: whether the queue service is served with TLS (told to every node).
        run_dir: where metrics, checkpoints and the queue snapshot go.
        save_checkpoint: ``(arrays, round)`` -> writes ``encoder.pt``.
        evaluate: ``arrays`` -> server-side eval metrics; ``None`` when the server has
            no labelled data.
    """

    def __init__(
        self,
        grid: Grid,
        strategy: FedAvg,
        cfg: FedConfig,
        *,
        queue: NegativeQueue,
        tokens: NodeTokens,
        queue_address: str,
        queue_tls: bool = False,
        run_dir: RunDir,
        save_checkpoint: Callable[[ArrayRecord, int], None],
        evaluate: Callable[[ArrayRecord], dict[str, float]] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.grid = grid
        self.strategy = strategy
        self.cfg = cfg
        self.queue = queue
        self.tokens = tokens
        self.queue_address = queue_address
        self.queue_tls = queue_tls
        self.run_dir = run_dir
        self.save_checkpoint = save_checkpoint
        self.evaluate = evaluate
        self.poll_interval = poll_interval
        self.lr_at = cosine_lr(cfg.lr, cfg.rounds)
        self.losses: list[float] = []
        self.pushed_by_slot: dict[int, int] = {}
        # The queue's overwritten_rows counter at the last round's end (a resumed queue
        # brings its own).
        self.overwritten_seen = queue.stats()["counters"]["overwritten_rows"]
        self.last_eval: dict[str, float] = {}
        self.stopped_early: str | None = None
        #: node id -> client id, for the nodes that answered the identify QUERY.
        self.client_ids: dict[int, str] = {}
        #: node ids sent an identify QUERY, answered or not.
        self.asked: set[int] = set()
        # Clients' epsilons only grow, so the largest ever reported is the largest now.
        self.epsilon_max = max((float(r.get("epsilon_max", r.get("epsilon", -1.0)))
                                for r in run_dir.read_metrics()), default=-1.0)
        if cfg.dp and cfg.push_fraction > 0 and cfg.push_noise == 0:
            logger.warning("--dp true with --push-noise 0: pushed rows are un-noised embeddings of "
                           "the clients' data and are NOT covered by the reported epsilon")

    # ------------------------------------------------------------------ the loop

    def run(self, arrays: ArrayRecord, first_round: int, last_round: int) -> ArrayRecord:
        """Rounds ``first_round..last_round`` (inclusive); returns the final global weights."""
        for rnd in range(first_round, last_round + 1):
            result = self.run_round(rnd, arrays, final=rnd == last_round)
            arrays = result.arrays
            if self.stopped_early:
                break
        return arrays

    def run_round(self, rnd: int, arrays: ArrayRecord, *, final: bool = False) -> RoundResult:
        """One round: sample, send, screen, aggregate, evaluate, write."""
        start = time.monotonic()
        online = self.wait_for_nodes()
        self.queue.advance(rnd)
        lr = self.lr_at(rnd - 1)
        messages = self.messages_for(rnd, arrays, lr, online)
        phase_pushed = (self.push_phase(rnd, messages)
                        if self.cfg.push_timing == "before" and self.cfg.push_fraction > 0 else {})
        logger.info("round %d: sending to %d of %d online nodes (lr %.4g)",
                    rnd, len(messages), len(online), lr)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))

        valid: list[Message] = []
        failed = dropped = 0
        addressed = addressees(messages)
        for msg in replies:
            reason = check_reply(msg, arrays)
            if reason is None:
                valid.append(msg)
            else:
                failed += msg.has_error()
                dropped += not msg.has_error()
                logger.warning("round %d: reply for node %d not used: %s",
                               rnd, answering_node(msg, addressed), reason)
        answered = {answering_node(m, addressed) for m in replies}
        missing = sorted(m.metadata.dst_node_id for m in messages
                         if m.metadata.dst_node_id not in answered)
        if missing:
            logger.warning("round %d: no reply within %.0f s from nodes %s",
                           rnd, self.cfg.round_timeout, missing)

        # Replies arrive in whatever order the nodes finish, and a float sum depends on its
        # order: aggregating in an order fixed by the replies' contents makes a round's
        # result a function of what the nodes sent, not of when.
        valid.sort(key=reply_digest)
        contents = [m.content for m in valid]
        pushed = {node_id: rows for node_id, (rows, _failed) in phase_pushed.items()}
        for m in valid:
            node_id = m.metadata.src_node_id
            pushed[node_id] = pushed.get(node_id, 0) + int(m.content["metrics"]["pushed-rows"])
        new_arrays, means = None, None
        if len(valid) >= self.cfg.min_nodes:
            try:
                new_arrays, means = self.strategy.aggregate_train(rnd, valid)
            except (InconsistentMessageReplies, AggregationError, ValueError) as exc:
                logger.error("round %d: aggregation failed, weights unchanged: %s", rnd, exc)
        else:
            logger.warning("round %d: %d valid replies, fewer than --min-nodes %d: not counted",
                           rnd, len(valid), self.cfg.min_nodes)
        counted = new_arrays is not None
        if counted:
            arrays = new_arrays
        for node_id, rows in pushed.items():
            slot = self.tokens.slots.get(node_id)
            if slot is not None:
                self.pushed_by_slot[slot] = self.pushed_by_slot.get(slot, 0) + rows

        row: dict[str, Any] = {
            "round": rnd, "counted": int(counted), "lr": lr, "sampled": len(messages),
            "replied": len(valid), "failed": failed, "dropped": dropped, "timed_out": len(missing),
        }
        if self.cfg.client_sampling == "seeded" and len(messages) < len(online):
            row["sampled_clients"] = " ".join(sorted(
                self.client_ids.get(m.metadata.dst_node_id, f"node-{m.metadata.dst_node_id}")
                for m in messages))
        metrics = combine_metrics(contents, means) if contents else {}
        if self.cfg.dp:
            metrics = {k: v for k, v in metrics.items() if k not in WITHHELD_UNDER_DP}
        row.update({row_key(k): v for k, v in metrics.items()})
        if self.cfg.push_timing == "before":  # the rows came in the push phase, not with the weights
            for i, key in enumerate(("pushed_rows", "push_failures")):
                row[key] = int(row.get(key, 0)) + sum(v[i] for v in phase_pushed.values())
            row["push_phase_replied"] = len(phase_pushed)
        if counted and "train-loss" in metrics:
            self.losses.append(float(metrics["train-loss"]))
        self._privacy(rnd, row, metrics)
        stats = self.queue.stats()
        overwritten = stats["counters"]["overwritten_rows"]
        row.update({"queue_size": stats["size"], "queue_version": stats["version"],
                    "queue_pushed_rows_total": stats["counters"]["pushed_rows"],
                    "queue_pulled_rows_total": stats["counters"]["pulled_rows"],
                    "queue_overwritten_rows_total": overwritten,
                    "queue_overwritten_rows": overwritten - self.overwritten_seen})
        if overwritten > self.overwritten_seen and self.cfg.pull_mode == "reproducible":
            logger.warning(
                "round %d: the queue, full at %d rows, overwrote %d rows that pulls could still "
                "have found; which ones went depended on arrival order, so this run will not "
                "repeat exactly (--pull-mode reproducible): raise --queue-capacity to at least "
                "(--max-age + 1) x the rows pushed per round (%d this round)",
                rnd, stats["capacity"], overwritten - self.overwritten_seen,
                int(row.get("pushed_rows", 0)))
        self.overwritten_seen = overwritten

        if self.evaluate is not None and (final or (self.cfg.eval_every and rnd % self.cfg.eval_every == 0)):
            self.last_eval = self.evaluate(arrays)
            row.update(self.last_eval)
            self._collapse_guard(rnd, row)
        row["round_seconds"] = time.monotonic() - start

        self.run_dir.append_metrics(row)
        self.save_checkpoint(arrays, rnd)
        self.queue.snapshot(self.run_dir.file("queue.pt"))
        logger.info("round %d done in %.1f s: %s", rnd, row["round_seconds"],
                    ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                              if k in ("train_loss", "global_hits", "pushed_rows", "knn_backbone")))
        return RoundResult(rnd, arrays, counted, row, pushed)

    # ------------------------------------------------------------------ pieces

    def wait_for_nodes(self) -> list[int]:
        """Online node ids once at least ``min_nodes`` are connected; NotEnoughNodes after the deadline."""
        deadline = time.monotonic() + self.cfg.wait_nodes_timeout
        while True:
            online = sorted(self.grid.get_node_ids())
            if len(online) >= self.cfg.min_nodes:
                return online
            if time.monotonic() >= deadline:
                raise NotEnoughNodes(
                    f"{len(online)} node(s) online after waiting {self.cfg.wait_nodes_timeout:.0f} s, "
                    f"--min-nodes is {self.cfg.min_nodes}: start more clients or lower --min-nodes"
                )
            logger.info("waiting for nodes: %d of %d online", len(online), self.cfg.min_nodes)
            time.sleep(self.poll_interval)

    def push_phase(self, rnd: int, messages: Sequence[Message]) -> dict[int, tuple[int, int]]:
        """``--push-timing before``: one QUERY message to every node about to train, each
        pushing keys of the round's global encoder to the queue (version ``rnd``) before
        any node trains. Returns (rows pushed, pushes failed) per node id that replied; a
        node whose push phase fails is logged and still trains (its pulls find the others'
        rows)."""
        queries = [Message(
            content=RecordDict({"arrays": m.content["arrays"], "config": m.content["config"]}),
            dst_node_id=m.metadata.dst_node_id, message_type=MessageType.QUERY,
            group_id=f"{rnd}-push", ttl=self.cfg.round_timeout + 10.0,
        ) for m in messages]
        start = time.monotonic()
        replies = list(self.grid.send_and_receive(queries, timeout=self.cfg.round_timeout))
        pushed: dict[int, tuple[int, int]] = {}
        addressed = addressees(queries)
        for msg in replies:
            reason = check_push_reply(msg)
            if reason is None:
                m = msg.content["metrics"]
                pushed[answering_node(msg, addressed)] = (int(m["pushed-rows"]), int(m["push-failures"]))
            else:
                logger.warning("round %d: push phase of node %d failed: %s",
                               rnd, answering_node(msg, addressed), reason)
        logger.info("round %d: push phase, %d rows from %d of %d nodes in %.1f s", rnd,
                    sum(r for r, _ in pushed.values()), len(pushed), len(queries),
                    time.monotonic() - start)
        return pushed

    def sample(self, rnd: int, online: Sequence[int]) -> list[int]:
        """The nodes round ``rnd`` may train: all of ``online``, or with ``--client-sampling
        seeded`` and a fraction that leaves some out, the round's seeded draw over their
        client ids. With ``--client-sampling seeded``, the nodes not yet identified are
        asked for their client ids first when the draw needs them or the clients use the
        queue (which gives each client the same contributor slot across node restarts
        and resumes, see :class:`NodeTokens`)."""
        k = max(1, int(len(online) * self.cfg.fraction_train))
        if self.cfg.client_sampling != "seeded":
            return list(online)
        if k < len(online):  # the draw needs every id: ask again who did not answer
            self.identify(rnd, [n for n in online if n not in self.client_ids])
        else:
            if uses_queue(self.cfg):  # for the slots only: ask each node once
                self.identify(rnd, [n for n in online if n not in self.asked])
            return list(online)
        order = sorted(online, key=self._by_client_id)
        return sorted(seeded_sample(order, k, self.cfg.seed, rnd))

    def _by_client_id(self, node_id: int) -> tuple[bool, str, int]:
        """Sort key: identified nodes by client id, then the others by node id."""
        return node_id not in self.client_ids, self.client_ids.get(node_id, ""), node_id

    def identify(self, rnd: int, nodes: Sequence[int]) -> None:
        """Ask ``nodes`` for their client ids (one QUERY each), into :attr:`client_ids`."""
        if not nodes:
            return
        self.asked.update(nodes)
        queries = [Message(
            content=RecordDict({"config": ConfigRecord({"server-round": rnd})}),
            dst_node_id=n, message_type=IDENTIFY, group_id=f"{rnd}-identify",
            ttl=self.cfg.round_timeout + 10.0,
        ) for n in nodes]
        start = time.monotonic()
        replies = list(self.grid.send_and_receive(queries, timeout=self.cfg.round_timeout))
        addressed = addressees(queries)
        for msg in replies:
            node_id = answering_node(msg, addressed)
            reason = check_identity_reply(msg)
            if reason is not None:
                logger.warning("round %d: node %d did not identify itself (%s): a sampling "
                               "draw takes it after the identified nodes, by node id, and "
                               "its queue slot does not pass to a restarted node or a "
                               "resumed run", rnd, node_id, reason)
                continue
            client_id = str(msg.content["identity"]["client-id"])
            twins = [n for n, c in self.client_ids.items() if c == client_id and n != node_id]
            if twins:
                logger.warning("round %d: nodes %d and %s both report client id %r: which of "
                               "them a round samples is not reproducible", rnd, node_id,
                               ", ".join(map(str, twins)), client_id)
            self.client_ids[node_id] = client_id
        logger.info("round %d: %d of %d nodes identified in %.1f s", rnd,
                    sum(n in self.client_ids for n in nodes), len(nodes), time.monotonic() - start)

    def messages_for(self, rnd: int, arrays: ArrayRecord, lr: float, online: Sequence[int]) -> list[Message]:
        """One TRAIN message per node the strategy samples (from :meth:`sample`'s nodes),
        each with its own RecordDict."""
        sampled = self.strategy.configure_train(
            rnd, arrays, ConfigRecord({"lr": lr}), _OnlineNodes(self.grid, self.sample(rnd, online))
        )
        # New slots in client-id order, not in the strategy's random order: a repeated run
        # numbers its clients alike, and its checkpoints are the same bytes.
        for node_id in sorted((t.metadata.dst_node_id for t in sampled), key=self._by_client_id):
            self.tokens.token_for(node_id, self.client_ids.get(node_id))
        messages = []
        for template in sampled:
            node_id = template.metadata.dst_node_id
            config = ConfigRecord(dict(template.content["config"]))
            config.update({
                "server-round": rnd, "lr": lr, "queue-address": self.queue_address,
                "queue-tls": self.queue_tls, "queue-token": self.tokens.token_for(node_id),
                "queue-version": rnd,
            })
            messages.append(Message(
                content=RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(rnd),
                # A message a node has not picked up by the deadline expires rather
                # than being trained on late, against a newer queue.
                ttl=self.cfg.round_timeout + 10.0,
            ))
        return messages

    def _privacy(self, rnd: int, row: dict[str, Any], metrics: dict[str, float | int]) -> None:
        """Running maximum epsilon, the pushes flag, and the budget stop."""
        if "epsilon" in metrics:
            self.epsilon_max = max(self.epsilon_max, float(metrics["epsilon"]))
        row["epsilon_max"] = self.epsilon_max
        row["pushes_private"] = int(pushes_private(self.cfg))
        budget = self.cfg.epsilon_budget
        if budget > 0 and self.epsilon_max >= budget:
            self.stopped_early = (f"privacy budget reached at round {rnd}: epsilon "
                                  f"{self.epsilon_max:.4g} >= --epsilon-budget {budget:g}")
            logger.warning("round %d: %s; stopping", rnd, self.stopped_early)

    def privacy_summary(self) -> dict[str, Any]:
        """The run's privacy for ``summary.json``.

        ``dp``; ``delta`` of the epsilons (None without DP); ``adjacency``, the datasets
        the epsilons tell apart (None without DP); ``epsilon_max``, the largest
        epsilon any client reported in the run (-1: nothing accounted);
        ``pushes_private``, whether pushed rows are covered by it; ``epsilon_budget``
        (0: no limit); ``note``, in plain words what the epsilon does not cover (None when
        it covers every release).
        """
        private = pushes_private(self.cfg)
        if not self.cfg.dp:
            note = ("no differential privacy (--dp false): nothing is accounted, and the "
                    "weights and any pushed rows are released without noise")
        elif not private:
            note = ("pushed rows are un-noised embeddings of the clients' data and are NOT "
                    "covered by epsilon_max, which accounts the DP-SGD steps only "
                    "(--push-noise > 0 noises the pushes and accounts them)")
        else:
            note = None
        return {"dp": self.cfg.dp, "delta": self.cfg.delta if self.cfg.dp else None,
                "adjacency": ADJACENCY if self.cfg.dp else None,
                "epsilon_max": self.epsilon_max, "pushes_private": private,
                "epsilon_budget": self.cfg.epsilon_budget, "note": note}

    def _collapse_guard(self, rnd: int, row: dict[str, Any]) -> None:
        uniformity = row.get("uniformity_head")
        if uniformity is None:
            return
        suspected = collapse_suspected(float(uniformity), self.cfg.collapse_uniformity, self.losses)
        row["collapse_warning"] = int(suspected)
        if suspected:
            logger.warning(
                "round %d: possible collapse: eval uniformity %.3f is above %.3f while the "
                "training loss fell (%.4f -> %.4f)%s", rnd, uniformity, self.cfg.collapse_uniformity,
                self.losses[-2], self.losses[-1],
                "; stopping (--stop-on-collapse)" if self.cfg.stop_on_collapse else "",
            )
            if self.cfg.stop_on_collapse:
                self.stopped_early = f"collapse suspected at round {rnd}"
