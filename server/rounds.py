"""The round loop: FedContrast's own rounds around a Flower strategy.

Flower's ``Strategy.start`` cannot begin at an arbitrary round, hands every node
the same config record, and samples nodes by waiting forever for its minimums.
:class:`RoundDriver` therefore drives the rounds itself and uses the wrapped
strategy for what it is good at: sampling (``configure_train``) and combining
weights (``aggregate_train``, :mod:`server.aggregation`). What travels in each
message is :mod:`server.contract`; which nodes train is :mod:`server.sampling`.

A round: wait for nodes, advance the queue, sample, send the TRAIN messages, screen
the replies, aggregate, evaluate, write the round row, the checkpoint and the queue
snapshot.

Unusable replies are dropped and logged in one line with their reason; the round goes
on with the others. The round row counts them by reason (``dropped_<kind>``, one column
per :data:`server.contract.REFUSAL_KINDS` entry that occurred), and ``summary.json``
totals them (:func:`dropped_totals`). A round counts when at least ``min_nodes`` valid replies arrived; otherwise
the global weights stay as they were.

Replies are aggregated in the order of their contents' SHA-256 digests
(:func:`server.contract.reply_digest`), not in the order they arrived: a float sum
depends on its order, and a round's result should depend on what the nodes sent, not
on when. With the nodes' pulls reproducible too (``--pull-mode reproducible``: only
rows of finished rounds, seeded draws), what a node sends does not depend on when the
others ran either, so a run repeats exactly. The round rows count the rows a full
queue overwrote (``queue_overwritten_rows_total``), which breaks that, and the driver
warns of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from common.config import FedConfig
from common.runtime.rundir import RunDir
from common.schedule import cosine_lr
from server.aggregation import combine_metrics
from server.contract import (
    REFUSAL_KINDS,
    addressees,
    answering_node,
    check_reply,
    reply_digest,
)
from server.privacy import RunPrivacy
from server.queue import NegativeQueue
from server.sampling import NodeSampler, NodeTokens, OnlineNodes

logger = logging.getLogger(__name__)

#: Round-row keys plotted in curves.png.
PLOTTED = ("train_loss", "knn_backbone", "uniformity_head", "alignment_head", "uniformity",
           "global_hits", "global_misses", "pushed_rows", "queue_size")


def collapse_suspected(uniformity: float, bound: float, losses: Sequence[float]) -> bool:
    """Uniformity above ``bound`` while the training loss still falls: a sign of collapse.

    A collapsing encoder lowers the InfoNCE loss against stale negatives by moving every
    embedding to one place; the loss alone looks healthy (see DESIGN.md, evidence).
    ``losses`` are the counted rounds' training losses, oldest first.
    """
    return uniformity > bound and len(losses) >= 2 and losses[-1] < losses[-2]


def row_key(key: str) -> str:
    """Metric key as written to the run directory (``train-loss`` -> ``train_loss``)."""
    return key.replace("-", "_")


def dropped_column(kind: str) -> str:
    """The round-row column counting the replies refused for ``kind``."""
    return row_key(f"dropped-{kind}")


def in_sent_dtypes(new: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """``new`` with every array in the dtype of the same array in ``sent``.

    A weighted mean turns an integer array (BatchNorm's ``num_batches_tracked``) into
    float64, which the next round's reply check would refuse as another dtype; it is
    rounded back. Arrays already in their dtype are left as they are, byte for byte.
    """

    got, want = new.to_torch_state_dict(), sent.to_torch_state_dict()
    changed = {k: v for k, v in got.items() if k in want and v.dtype != want[k].dtype}
    if not changed:
        return new
    for k, v in changed.items():
        got[k] = (v.round() if not want[k].is_floating_point() else v).to(want[k].dtype)
    return ArrayRecord(got)


def dropped_totals(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Replies refused over ``rows``, by kind (every kind of :data:`REFUSAL_KINDS`)."""
    return {kind: sum(int(r.get(dropped_column(kind)) or 0) for r in rows)
            for kind in REFUSAL_KINDS}


@dataclass
class RoundResult:
    """What one round produced."""

    round: int
    arrays: ArrayRecord
    counted: bool
    row: dict[str, Any]
    pushed_by_node: dict[int, int] = field(default_factory=dict)


@dataclass
class Screened:
    """A round's replies after screening: the valid ones in digest order, and the rest counted."""

    valid: list[Message]
    failed: int
    dropped: int
    missing: list[int]
    by_kind: dict[str, int] = field(default_factory=dict)


class RoundDriver:
    """Runs rounds ``first..last`` over a Flower grid, writing the run directory as it goes.

    Args:
        grid: Flower's grid (the ServerApp's, or a fake in unit tests).
        strategy: the Flower strategy that samples and aggregates
            (:func:`server.aggregation.build_strategy`).
        cfg: the run's settings (rounds, min_nodes, timeouts, eval and collapse settings).
        queue: the global negative queue, advanced to round r before round r.
        tokens: the run's per-node queue tokens.
        queue_address: ``host:port`` that nodes connect to.
        queue_tls: whether the queue service is served with TLS (told to every node).
        run_dir: where metrics, checkpoints and the queue snapshot go.
        save_checkpoint: ``(arrays, round)`` -> writes ``encoder.pt``.
        evaluate: ``arrays`` -> server-side eval metrics; ``None`` when the server has
            no labelled data.
        pushed_by_slot: contributor slot -> rows pushed before (a resumed run's); the
            driver adds each round's to it, in place.
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
        pushed_by_slot: dict[int, int] | None = None,
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
        self.nodes = NodeSampler(grid, cfg, poll_interval)
        self.lr_at = cosine_lr(cfg.lr, cfg.rounds)
        self.losses: list[float] = []
        self.pushed_by_slot: dict[int, int] = {} if pushed_by_slot is None else pushed_by_slot
        # The queue's overwritten_rows counter at the last round's end (a resumed queue
        # brings its own).
        self.overwritten_seen = queue.stats()["counters"]["overwritten_rows"]
        self.last_eval: dict[str, float] = {}
        self.stopped_early: str | None = None
        self.privacy = RunPrivacy(cfg, run_dir.read_metrics())

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
        online = self.nodes.wait_for_nodes()
        self.queue.advance(rnd)
        lr = self.lr_at(rnd - 1)
        messages = self.messages_for(rnd, arrays, lr, online)
        logger.info("round %d: sending to %d of %d online nodes (lr %.4g)",
                    rnd, len(messages), len(online), lr)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        screened = self.screen(rnd, messages, replies, arrays)
        pushed = self._pushed_by_node(screened.valid)
        new_arrays, means = self.aggregate(rnd, screened.valid, arrays)
        counted = new_arrays is not None
        if counted:
            arrays = new_arrays
        self._credit_slots(pushed)
        row: dict[str, Any] = {
            "round": rnd, "counted": int(counted), "lr": lr, "sampled": len(messages),
            "replied": len(screened.valid), "failed": screened.failed,
            "dropped": screened.dropped, "timed_out": len(screened.missing),
            **{dropped_column(kind): n for kind, n in screened.by_kind.items()},
        }
        if self.cfg.client_sampling == "seeded" and len(messages) < len(online):
            row["sampled_clients"] = " ".join(sorted(
                self.nodes.client_id(m.metadata.dst_node_id) for m in messages))
        self._reply_columns(rnd, row, screened.valid, means, counted)
        self._queue_columns(rnd, row)
        if self.evaluate is not None and (final or (self.cfg.eval_every and rnd % self.cfg.eval_every == 0)):
            self.last_eval = self.evaluate(arrays)
            row.update(self.last_eval)
            self._collapse_guard(rnd, row)
        row["round_seconds"] = time.monotonic() - start
        self._write(rnd, arrays, row)
        return RoundResult(rnd, arrays, counted, row, pushed)

    # ------------------------------------------------------------------ pieces

    def messages_for(self, rnd: int, arrays: ArrayRecord, lr: float,
                     online: Sequence[int]) -> list[Message]:
        """One TRAIN message per node the strategy samples (from the sampler's nodes),
        each with its own RecordDict."""
        sampled = self.strategy.configure_train(
            rnd, arrays, ConfigRecord({"lr": lr}), OnlineNodes(self.grid, self.nodes.sample(rnd, online))
        )
        # New slots in client-id order, not in the strategy's random order: a repeated run
        # numbers its clients alike, and its checkpoints are the same bytes.
        for node_id in sorted((t.metadata.dst_node_id for t in sampled), key=self.nodes.by_client_id):
            self.tokens.token_for(node_id, self.nodes.client_ids.get(node_id))
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

    def screen(self, rnd: int, messages: Sequence[Message], replies: Sequence[Message],
               reference: ArrayRecord) -> Screened:
        """The usable replies in digest order; the others logged and counted, as are the
        nodes that did not answer."""
        valid: list[Message] = []
        failed = dropped = 0
        by_kind: dict[str, int] = {}
        addressed = addressees(messages)
        for msg in replies:
            reason = check_reply(msg, reference)
            if reason is None:
                valid.append(msg)
            else:
                failed += msg.has_error()
                dropped += not msg.has_error()
                by_kind[reason.kind] = by_kind.get(reason.kind, 0) + 1
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
        return Screened(valid, failed, dropped, missing, by_kind)

    def aggregate(self, rnd: int, valid: list[Message], sent: ArrayRecord
                  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's new weights and metric means, each array in the dtype it was sent
        in (``sent``); ``(None, None)`` when the round does not count (too few replies, or
        the strategy refused them)."""
        if len(valid) < self.cfg.min_nodes:
            logger.warning("round %d: %d valid replies, fewer than --min-nodes %d: not counted",
                           rnd, len(valid), self.cfg.min_nodes)
            return None, None
        try:
            new, means = self.strategy.aggregate_train(rnd, valid)
        except (InconsistentMessageReplies, AggregationError, ValueError) as exc:
            logger.error("round %d: aggregation failed, weights unchanged: %s", rnd, exc)
            return None, None
        return (None if new is None else in_sent_dtypes(new, sent)), means

    @staticmethod
    def _pushed_by_node(valid: Sequence[Message]) -> dict[int, int]:
        """Rows each node pushed this round, as its reply reports them."""
        pushed: dict[int, int] = {}
        for m in valid:
            node_id = m.metadata.src_node_id
            pushed[node_id] = pushed.get(node_id, 0) + int(m.content["metrics"]["pushed-rows"])
        return pushed

    def _credit_slots(self, pushed: dict[int, int]) -> None:
        """Add each node's pushed rows to its contributor slot's total."""
        for node_id, rows in pushed.items():
            slot = self.tokens.slots.get(node_id)
            if slot is not None:
                self.pushed_by_slot[slot] = self.pushed_by_slot.get(slot, 0) + rows

    def _reply_columns(self, rnd: int, row: dict[str, Any], valid: Sequence[Message],
                       means: MetricRecord | None, counted: bool) -> None:
        """The replies' combined metrics and privacy columns into ``row``."""
        contents = [m.content for m in valid]
        metrics = combine_metrics(contents, means) if contents else {}
        metrics = self.privacy.released(metrics)
        row.update({row_key(k): v for k, v in metrics.items()})
        if counted and "train-loss" in metrics:
            self.losses.append(float(metrics["train-loss"]))
        stop = self.privacy.update(rnd, row, metrics)
        if stop is not None:
            self.stopped_early = stop

    def _queue_columns(self, rnd: int, row: dict[str, Any]) -> None:
        """The queue's size and counters into ``row``; a warning when a full queue
        overwrote rows a reproducible run's pulls could still have found."""
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

    def _write(self, rnd: int, arrays: ArrayRecord, row: dict[str, Any]) -> None:
        """The round row, the checkpoint and the queue snapshot into the run directory."""
        self.run_dir.append_metrics(row)
        self.save_checkpoint(arrays, rnd)
        self.queue.snapshot(self.run_dir.file("queue.pt"))
        logger.info("round %d done in %.1f s: %s", rnd, row["round_seconds"],
                    ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                              if k in ("train_loss", "global_hits", "pushed_rows", "knn_backbone")))

    def privacy_summary(self) -> dict[str, Any]:
        """The run's privacy for ``summary.json`` (:meth:`server.privacy.RunPrivacy.summary`)."""
        return self.privacy.summary()

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
