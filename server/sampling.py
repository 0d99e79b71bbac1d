"""Node identity and sampling: which nodes a round trains, and who each node is.

With ``--client-sampling seeded`` (the default) and a ``--fraction-train`` that leaves
nodes out, the driver samples, not the strategy: before a node is first sampled from,
it gets one QUERY message of type :data:`server.contract.IDENTIFY` and replies with its
client id, its stable identity from the node config. Each round then draws
``max(1, int(online x fraction))`` of the online nodes with :func:`seeded_sample` over
their client ids, by ``--seed`` and the round, so the same run repeated, and every
method ``compare`` runs, trains the same clients in the same rounds; Flower's node ids
are random per run and cannot serve. A node that does not identify itself is drawn
after the identified ones, by node id (not reproducible), and asked again the next
round; the round row's ``sampled_clients`` names the clients drawn.

With ``--client-sampling seeded``, nodes are identified the same way when the clients
use the queue, whatever the fraction (without a draw, each node is asked once): each
client then keeps one contributor slot across SuperNode restarts and resumed runs
(:class:`NodeTokens`; the checkpoint holds client id -> slot), so the queue recognises
the rows it pushed before as its own.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import FedConfig
from server.contract import IDENTIFY, addressees, answering_node, check_identity_reply

logger = logging.getLogger(__name__)
T = TypeVar("T")


def seeded_sample(pool: Sequence[T], k: int, seed: int, rnd: int) -> list[T]:
    """``k`` items of ``pool`` (all if it holds fewer) for round ``rnd`` of a run seeded
    ``seed``: the same draw for the same pool order, seed and round in any process (a
    string seed is hashed with SHA-512, not Python's per-process hash)."""
    rng = random.Random(f"fedcontrast-client-sampling:{seed}:{rnd}")
    return rng.sample(list(pool), min(k, len(pool)))


def uses_queue(cfg: FedConfig) -> bool:
    """Whether the clients of a run with ``cfg`` pull from or push to the global queue."""
    return cfg.global_negatives > 0 or cfg.push_fraction > 0


class NotEnoughNodes(RuntimeError):
    """Fewer than ``min_nodes`` nodes were online when the wait for them ended."""


class NodeTokens:
    """One queue token per Flower node id and one contributor slot per client, for one run.

    A node that identified itself (its client id, see :meth:`NodeSampler.identify`) gets
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


class OnlineNodes:
    """The grid as the strategy's sampler sees it: a fixed list of online node ids."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class NodeSampler:
    """The nodes of a run as the rounds see them: who is online, who each is, who trains.

    Args:
        grid: Flower's grid (the ServerApp's, or a fake in unit tests).
        cfg: the run's settings (min_nodes, fraction, sampling, seed, timeouts).
        poll_interval: seconds between looks at the grid while waiting for nodes.
    """

    def __init__(self, grid: Grid, cfg: FedConfig, poll_interval: float = 1.0) -> None:
        self.grid = grid
        self.cfg = cfg
        self.poll_interval = poll_interval
        #: node id -> client id, for the nodes that answered the identify QUERY.
        self.client_ids: dict[int, str] = {}
        #: node ids sent an identify QUERY, answered or not.
        self.asked: set[int] = set()

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
        order = sorted(online, key=self.by_client_id)
        return sorted(seeded_sample(order, k, self.cfg.seed, rnd))

    def by_client_id(self, node_id: int) -> tuple[bool, str, int]:
        """Sort key: identified nodes by client id, then the others by node id."""
        return node_id not in self.client_ids, self.client_ids.get(node_id, ""), node_id

    def client_id(self, node_id: int) -> str:
        """The client id ``node_id`` reported, or ``node-<id>`` for a node that did not."""
        return self.client_ids.get(node_id, f"node-{node_id}")

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
            self._record_identity(rnd, answering_node(msg, addressed), msg)
        logger.info("round %d: %d of %d nodes identified in %.1f s", rnd,
                    sum(n in self.client_ids for n in nodes), len(nodes), time.monotonic() - start)

    def _record_identity(self, rnd: int, node_id: int, msg: Message) -> None:
        """Keep the client id of ``node_id`` from its identify reply, warning of what is amiss."""
        reason = check_identity_reply(msg)
        if reason is not None:
            logger.warning("round %d: node %d did not identify itself (%s): a sampling "
                           "draw takes it after the identified nodes, by node id, and "
                           "its queue slot does not pass to a restarted node or a "
                           "resumed run", rnd, node_id, reason)
            return
        client_id = str(msg.content["identity"]["client-id"])
        earlier = [n for n, c in self.client_ids.items() if c == client_id and n != node_id]
        if earlier:
            # Most often a restarted SuperNode: the earlier node is gone, though the SuperLink
            # lists it until it misses its heartbeats; nothing here tells the two cases apart.
            logger.warning("round %d: node %d reports client id %r, as node %s did before: a "
                           "restarted SuperNode of that client takes over its queue slot; if both "
                           "are running, two clients share the id, and which of them a round "
                           "samples is not reproducible", rnd, node_id, client_id,
                           ", ".join(map(str, earlier)))
        self.client_ids[node_id] = client_id
