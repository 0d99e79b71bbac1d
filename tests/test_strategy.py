"""The round driver's own logic, over a fake grid whose nodes are plain functions."""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import FedConfig
from common.optim_state import STEP_KEY
from common.runtime.rundir import RunDir
from server.aggregation import WeightsKrum, build_strategy
from server.contract import IDENTIFY, REFUSAL_KINDS, REPLY_METRIC_KEYS, TRAIN_CONFIG_KEYS
from server.deploy import progress_line
from server.queue import NegativeQueue
from server.rounds import RoundDriver, collapse_suspected, dropped_column, dropped_totals
from server.sampling import NodeTokens, NotEnoughNodes, seeded_sample

pytestmark = pytest.mark.usefixtures("flower_task_identity")

Node = Callable[[Message], Message | None]


class FakeGrid:
    """Nodes are functions from the TRAIN message to the reply (None: no reply).

    The grid answers a node's identify QUERY with the client id ``node-<node id>``, as a
    real ClientApp would with its own, unless the node's function answers it itself
    (``handles_identify``)."""

    def __init__(self, nodes: dict[int, Node], *, reply_order: list[int] | None = None) -> None:
        self.nodes = nodes
        self.reply_order = reply_order  # node ids in the order their replies arrive
        self.sent: list[list[Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:  # as Flower's grids do when they push a message
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        self.sent.append(messages)
        if self.reply_order is not None:
            messages = sorted(messages, key=lambda m: self.reply_order.index(m.metadata.dst_node_id))
        replies = [self._reply(m) for m in messages]
        return [r for r in replies if r is not None]

    def _reply(self, msg: Message) -> Message | None:
        node = self.nodes[msg.metadata.dst_node_id]
        if msg.metadata.message_type == IDENTIFY and not getattr(node, "handles_identify", False):
            client_id = f"node-{msg.metadata.dst_node_id}"
            return Message(content=RecordDict({"identity": ConfigRecord({"client-id": client_id})}),
                           reply_to=msg)
        return node(msg)

    def of_type(self, message_type: str) -> list[list[Message]]:
        """The batches sent of one message type."""
        return [b for b in self.sent if b[0].metadata.message_type == message_type]


def metrics(**overrides: float) -> dict[str, float]:
    base = {k: 0 for k in REPLY_METRIC_KEYS}
    base.update({"num-examples": 10, "train-loss": 1.0, "epsilon": -1.0})
    base.update(overrides)
    return base


def honest(offset: float = 0.0, **m: float) -> Node:
    """A node that adds ``offset`` to every weight and reports ``m``."""

    def node(msg: Message) -> Message:
        state = {k: v + offset for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics(**m))})
        return Message(content=content, reply_to=msg)

    return node


def failing(reason: str) -> Node:
    return lambda msg: Message(Error(code=0, reason=reason), reply_to=msg)


def unavailable(msg: Message) -> Message:
    """What the SuperLink returns for a node that stopped sending heartbeats: an error
    whose sender is the SuperLink (node id 1), tied to the node by reply_to only."""
    reply = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = 1
    return reply


def initial() -> ArrayRecord:
    return ArrayRecord({"w": torch.zeros(4), "b": torch.zeros(2, 2)})


def make_driver(tmp_path, grid, *, cfg: FedConfig | None = None, evaluate=None, strategy=None,
                queue_tls: bool = False):
    cfg = cfg or FedConfig(min_nodes=1, rounds=3, wait_nodes_timeout=0.3, eval_every=0)
    registered: dict[str, int] = {}
    saved: list[int] = []
    driver = RoundDriver(
        grid, strategy or build_strategy(cfg), cfg, queue=NegativeQueue(16, 4),
        tokens=NodeTokens(lambda token, slot: registered.__setitem__(token, slot)),
        queue_address="127.0.0.1:1", queue_tls=queue_tls, run_dir=RunDir(tmp_path),
        save_checkpoint=lambda arrays, rnd: saved.append(rnd), evaluate=evaluate, poll_interval=0.05,
    )
    return driver, registered, saved


def test_each_node_gets_its_own_config_record_and_token(tmp_path):
    grid = FakeGrid({11: honest(), 22: honest(), 33: honest()})
    driver, registered, _ = make_driver(tmp_path, grid)
    driver.run(initial(), 1, 2)
    first, second = grid.of_type(MessageType.TRAIN)
    configs = [m.content["config"] for m in first]
    assert len({id(c) for c in configs}) == 3 and len({id(m.content) for m in first}) == 3
    for config in configs:
        assert set(TRAIN_CONFIG_KEYS) <= set(config.keys())
        assert config["server-round"] == 1 and config["queue-version"] == 1
    tokens = {m.metadata.dst_node_id: m.content["config"]["queue-token"] for m in first}
    assert len(set(tokens.values())) == 3
    assert sorted(registered.values()) == [0, 1, 2]  # one contributor slot per node
    # the same node keeps its token for the whole run
    assert {m.metadata.dst_node_id: m.content["config"]["queue-token"] for m in second} == tokens
    assert [m.content["config"]["server-round"] for m in second] == [2, 2, 2]


@pytest.mark.parametrize("tls", [False, True])
def test_every_node_is_told_whether_the_queue_is_tls(tmp_path, tls):
    grid = FakeGrid({1: honest(), 2: honest()})
    driver, _, _ = make_driver(tmp_path, grid, queue_tls=tls)
    driver.run_round(1, initial())
    assert [m.content["config"]["queue-tls"] for m in grid.of_type(MessageType.TRAIN)[0]] == [tls, tls]


def test_rounds_start_anywhere_and_advance_the_queue(tmp_path):
    grid = FakeGrid({1: honest(1.0)})
    driver, _, saved = make_driver(tmp_path, grid)
    arrays = driver.run(initial(), 5, 6)
    assert [r["round"] for r in RunDir(tmp_path).read_metrics()] == [5, 6]
    assert saved == [5, 6]
    assert driver.queue.version == 6
    assert (tmp_path / "queue.pt").exists()
    assert np.allclose(arrays["w"].numpy(), 2.0)  # two rounds of +1


def test_error_replies_are_dropped_and_the_round_goes_on(tmp_path, caplog):
    grid = FakeGrid({1: honest(1.0), 2: failing("bad data: no such file x.npz")})
    driver, _, _ = make_driver(tmp_path, grid)
    result = driver.run_round(1, initial())
    assert result.counted
    assert np.allclose(result.arrays["w"].numpy(), 1.0)
    assert result.row["failed"] == 1 and result.row["replied"] == 1
    assert "bad data: no such file x.npz" in caplog.text


# bad reply -> the kind it is counted under
MALFORMED = {"missing-metric": "metric-keys", "extra-record": "records", "nan": "array-nonfinite",
             "shape": "array-shape", "list-metric": "metric-type", "nan-metric": "metric-value"}


@pytest.mark.parametrize("bad, kind", MALFORMED.items(), ids=MALFORMED.keys())
def test_malformed_replies_are_dropped_not_fatal_and_counted_by_kind(tmp_path, caplog, bad, kind):
    def node(msg: Message) -> Message:
        state = msg.content["arrays"].to_torch_state_dict()
        m = metrics()
        records = {}
        if bad == "missing-metric":
            del m["epsilon"]
        elif bad == "extra-record":
            records["extra"] = MetricRecord({"x": 1.0})
        elif bad == "nan":
            state["w"][0] = math.nan
        elif bad == "shape":
            state["w"] = torch.zeros(5)
        elif bad == "list-metric":
            m["train-loss"] = [1.0] * 10_000
        elif bad == "nan-metric":
            m["train-loss"] = math.nan
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(m), **records})
        return Message(content=content, reply_to=msg)

    grid = FakeGrid({1: honest(1.0), 2: node})
    driver, _, _ = make_driver(tmp_path, grid)
    result = driver.run_round(1, initial())
    assert result.counted and result.row["dropped"] == 1
    assert result.row[dropped_column(kind)] == 1
    assert np.allclose(result.arrays["w"].numpy(), 1.0)
    assert dropped_totals(RunDir(tmp_path).read_metrics()) == {
        k: int(k == kind) for k in REFUSAL_KINDS}
    refusals = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(refusals) == 1 and kind in refusals[0]
    assert "\n" not in refusals[0] and len(refusals[0]) < 300


def test_a_client_error_of_any_length_is_logged_in_one_short_line(tmp_path, caplog):
    grid = FakeGrid({1: honest(1.0), 2: failing("x" * 100_000 + "\nsecond line")})
    driver, _, _ = make_driver(tmp_path, grid)
    result = driver.run_round(1, initial())
    assert result.counted and result.row[dropped_column("client-error")] == 1
    (line,) = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert "\n" not in line and len(line) < 300


def test_metrics_are_weighted_means_sums_and_maxima(tmp_path):
    grid = FakeGrid({
        1: honest(**{"num-examples": 30, "train-loss": 1.0, "pushed-rows": 5, "global-misses": 1,
                     "epsilon": 0.5}),
        2: honest(**{"num-examples": 10, "train-loss": 3.0, "pushed-rows": 7, "global-misses": 2,
                     "epsilon": 2.0}),
    })
    driver, _, _ = make_driver(tmp_path, grid)
    row = driver.run_round(1, initial()).row
    assert row["train_loss"] == pytest.approx(1.5)  # (30 * 1 + 10 * 3) / 40
    assert row["num_examples"] == 40 and row["pushed_rows"] == 12 and row["global_misses"] == 3
    assert row["epsilon"] == 2.0
    slots = driver.tokens.slots  # node id -> slot, in the order the strategy sampled them
    assert driver.pushed_by_slot == {slots[1]: 5, slots[2]: 7}


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(tmp_path):
    # Offsets whose float32 sum depends on its order: 1 + 3e7 - 3e7 is 0 or 1.
    offsets = {1: 1.0, 2: 3e7, 3: -3e7}
    replies = [honest(o)(Message(content=RecordDict({"arrays": initial()}), dst_node_id=n,
                                 message_type=MessageType.TRAIN)).content
               for n, o in offsets.items()]
    assert not np.array_equal(aggregate_arrayrecords(replies, "num-examples")["w"].numpy(),
                              aggregate_arrayrecords(replies[::-1], "num-examples")["w"].numpy())
    results = []
    for i, order in enumerate(itertools.permutations(offsets)):
        grid = FakeGrid({n: honest(o) for n, o in offsets.items()}, reply_order=list(order))
        driver, _, _ = make_driver(tmp_path / str(i), grid)
        results.append(driver.run_round(1, initial()).arrays["w"].numpy())
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_a_round_with_fewer_than_min_nodes_replies_does_not_count(tmp_path):
    cfg = FedConfig(min_nodes=2, rounds=1, wait_nodes_timeout=0.3, eval_every=0)
    grid = FakeGrid({1: honest(1.0), 2: lambda msg: None})  # node 2 times out
    driver, _, saved = make_driver(tmp_path, grid, cfg=cfg)
    result = driver.run_round(1, initial())
    assert not result.counted and result.row["timed_out"] == 1
    assert np.allclose(result.arrays["w"].numpy(), 0.0)  # weights unchanged
    assert saved == [1]  # still checkpointed, so a resume starts after it


def test_waiting_for_nodes_ends_at_the_deadline(tmp_path):
    cfg = FedConfig(min_nodes=3, rounds=1, wait_nodes_timeout=0.2, eval_every=0)
    driver, _, _ = make_driver(tmp_path, FakeGrid({1: honest()}), cfg=cfg)
    with pytest.raises(NotEnoughNodes, match="1 node"):
        driver.run(initial(), 1, 1)


def identified(client_id: str, train: Node | None = None) -> Node:
    """A node that answers the identify QUERY with ``client_id`` and trains like ``train``
    (:func:`honest` by default)."""
    train = train or honest()

    def node(msg: Message) -> Message:
        if msg.metadata.message_type != IDENTIFY:
            return train(msg)
        return Message(content=RecordDict({"identity": ConfigRecord({"client-id": client_id})}),
                       reply_to=msg)

    node.handles_identify = True  # type: ignore[attr-defined]
    return node


def without_identify() -> Node:
    """A node whose ClientApp has no identify handler, as Flower reports it; trains like
    :func:`honest`."""
    mute, train = failing("No query function registered with name 'identify'"), honest()

    def node(msg: Message) -> Message:
        return mute(msg) if msg.metadata.message_type == IDENTIFY else train(msg)

    node.handles_identify = True  # type: ignore[attr-defined]
    return node


SAMPLING = {"min_nodes": 1, "rounds": 3, "fraction_train": 0.5, "wait_nodes_timeout": 0.3,
            "eval_every": 0}
NAMES = [f"client-{i}" for i in range(6)]


def draws(tmp_path, node_ids, **settings):
    """Run 3 rounds over six nodes named NAMES with the given node ids; the grid and each
    round's sampled client ids, as the rows record them and as the TRAIN messages went."""
    grid = FakeGrid({n: identified(name) for n, name in zip(node_ids, NAMES, strict=True)})
    driver, _, _ = make_driver(tmp_path, grid, cfg=FedConfig(**{**SAMPLING, **settings}))
    driver.run(initial(), 1, 3)
    name_of = dict(zip(node_ids, NAMES, strict=True))
    trained = [sorted(name_of[m.metadata.dst_node_id] for m in batch) for batch in grid.sent
               if batch[0].metadata.message_type == MessageType.TRAIN]
    rows = [r.get("sampled_clients", "").split() for r in RunDir(tmp_path).read_metrics()]
    return grid, trained, rows


def test_fraction_train_samples_from_online_nodes_only(tmp_path):
    cfg = FedConfig(min_nodes=1, rounds=1, fraction_train=0.5, wait_nodes_timeout=0.3, eval_every=0)
    grid = FakeGrid({i: identified(f"c{i}") for i in range(1, 5)})
    driver, _, _ = make_driver(tmp_path, grid, cfg=cfg)
    driver.run_round(1, initial())
    assert len(grid.sent[-1]) == 2 and grid.sent[-1][0].metadata.message_type == MessageType.TRAIN


def test_seeded_sampling_trains_the_same_clients_whatever_node_ids_flower_drew(tmp_path):
    grid, trained, rows = draws(tmp_path / "a", [11, 22, 33, 44, 55, 66])
    _, trained_again, rows_again = draws(tmp_path / "b", [66, 5, 900, 12, 7, 31])
    assert trained == rows == trained_again == rows_again
    assert trained == [sorted(seeded_sample(sorted(NAMES), 3, 0, rnd)) for rnd in (1, 2, 3)]
    assert len({tuple(t) for t in trained}) > 1  # a fresh draw every round
    # Every node is asked once, before the first round's TRAIN messages, and never again.
    types = [[m.metadata.message_type for m in batch] for batch in grid.sent]
    assert types == [[IDENTIFY] * 6] + [[MessageType.TRAIN] * 3] * 3


def test_another_seed_draws_other_clients(tmp_path):
    _, seed0, _ = draws(tmp_path / "a", [1, 2, 3, 4, 5, 6])
    _, seed1, _ = draws(tmp_path / "b", [1, 2, 3, 4, 5, 6], seed=1)
    assert seed1 == [sorted(seeded_sample(sorted(NAMES), 3, 1, rnd)) for rnd in (1, 2, 3)]
    assert seed0 != seed1


def test_flower_sampling_sends_no_identify_query(tmp_path):
    grid, trained, rows = draws(tmp_path, [1, 2, 3, 4, 5, 6], client_sampling="flower")
    assert all(b[0].metadata.message_type == MessageType.TRAIN for b in grid.sent)
    assert [len(t) for t in trained] == [3, 3, 3] and rows == [[], [], []]


def test_without_a_fraction_or_a_queue_no_node_is_asked_who_it_is(tmp_path):
    grid, trained, rows = draws(tmp_path, [1, 2, 3, 4, 5, 6], fraction_train=1.0,
                                global_negatives=0, push_fraction=0.0)
    assert trained == [NAMES] * 3 and rows == [[], [], []]
    assert all(m.metadata.message_type == MessageType.TRAIN for b in grid.sent for m in b)


def test_without_a_fraction_nodes_using_the_queue_are_asked_who_they_are_once(tmp_path):
    grid, trained, rows = draws(tmp_path, [1, 2, 3, 4, 5, 6], fraction_train=1.0)
    assert trained == [NAMES] * 3 and rows == [[], [], []]
    types = [[m.metadata.message_type for m in batch] for batch in grid.sent]
    assert types == [[IDENTIFY] * 6] + [[MessageType.TRAIN] * 6] * 3
    # Each node kept one token of its own for the run (slots: the client-id order test below).
    tokens = [{m.metadata.dst_node_id: m.content["config"]["queue-token"] for m in b}
              for b in grid.of_type(MessageType.TRAIN)]
    assert tokens[0] == tokens[1] == tokens[2] and len(set(tokens[0].values())) == 6


def test_clients_are_numbered_in_client_id_order_whatever_node_ids_flower_drew(tmp_path):
    # NAMES in reverse against the node ids, so neither node-id order nor Flower's sampling
    # order could give client-id order by chance.
    slots = []
    for i, node_ids in enumerate(([11, 22, 33, 44, 55, 66], [66, 5, 900, 12, 7, 31])):
        grid = FakeGrid({n: identified(name) for n, name in zip(node_ids, NAMES[::-1], strict=True)})
        driver, registered, _ = make_driver(tmp_path / str(i), grid)
        driver.run_round(1, initial())
        assert sorted(registered.values()) == list(range(6))
        slots.append(driver.tokens.client_slots)
    assert slots[0] == slots[1] == {name: i for i, name in enumerate(NAMES)}


def test_without_a_fraction_a_node_that_does_not_identify_itself_is_asked_once_and_trains(tmp_path, caplog):
    grid = FakeGrid({1: identified("a"), 2: without_identify()})
    driver, registered, _ = make_driver(tmp_path, grid)
    driver.run(initial(), 1, 3)
    assert [[m.metadata.dst_node_id for m in b] for b in grid.of_type(IDENTIFY)] == [[1, 2]]
    assert [len(b) for b in grid.of_type(MessageType.TRAIN)] == [2, 2, 2]
    assert driver.tokens.client_slots == {"a": 0} and driver.tokens.slots == {1: 0, 2: 1}
    assert "node 2 did not identify itself" in caplog.text


def test_a_client_keeps_its_slot_across_node_restarts_and_resumes():
    registered: list[tuple[str, int]] = []
    tokens = NodeTokens(lambda token, slot: registered.append((token, slot)))
    a, b = tokens.token_for(11, "a"), tokens.token_for(22, "b")
    assert tokens.token_for(11, "a") == a and len(registered) == 2  # one token per node
    anonymous = tokens.token_for(33)  # a node that did not identify itself
    restarted = tokens.token_for(44, "a")  # client a's SuperNode again, under a new node id
    assert restarted not in (a, b, anonymous)  # a new token, never a reused one
    assert tokens.slots == {11: 0, 22: 1, 33: 2, 44: 0}
    assert [slot for _, slot in registered] == [0, 1, 2, 0]
    assert tokens.client_slots == {"a": 0, "b": 1} and tokens.client_of() == {0: "a", 1: "b"}
    # The anonymous node names its client a round later: same token, and its client keeps the slot.
    assert tokens.token_for(33, "d") == anonymous and tokens.client_slots["d"] == 2

    # A resumed run: the checkpoint's map and next free slot; new node ids, new tokens.
    registered.clear()
    resumed = NodeTokens(lambda token, slot: registered.append((token, slot)), first_slot=3,
                         client_slots=tokens.client_slots)
    assert {resumed.token_for(7, "b"), resumed.token_for(8, "c"), resumed.token_for(9, "a")}.isdisjoint(
        {a, b, anonymous, restarted})
    assert resumed.slots == {7: 1, 8: 3, 9: 0}  # a new client above every slot given before
    # A map whose slots reach past first_slot (an older checkpoint's next_slot) is respected.
    assert NodeTokens(lambda *_: None, first_slot=0, client_slots={"a": 5}).next_slot == 6


def test_a_node_that_does_not_identify_itself_is_still_drawn_and_asked_again(tmp_path, caplog):
    grid = FakeGrid({1: identified("a"), 2: identified("b"), 3: without_identify()})
    cfg = FedConfig(**{**SAMPLING, "fraction_train": 0.7})  # 2 of 3
    driver, _, _ = make_driver(tmp_path, grid, cfg=cfg)
    driver.run(initial(), 1, 3)
    identifies = [[m.metadata.dst_node_id for m in b] for b in grid.sent
                  if b[0].metadata.message_type == IDENTIFY]
    assert identifies == [[1, 2, 3], [3], [3]]
    assert "node 3 did not identify itself (client error: No query function" in caplog.text
    drawn = [r["sampled_clients"].split() for r in RunDir(tmp_path).read_metrics()]
    order = ["a", "b", "node-3"]  # the unidentified node after the identified ones
    assert drawn == [sorted(seeded_sample(order, 2, 0, rnd)) for rnd in (1, 2, 3)]


def test_two_nodes_with_one_client_id_are_reported(tmp_path, caplog):
    grid = FakeGrid({1: identified("a"), 2: identified("a"), 3: identified("b")})
    driver, _, _ = make_driver(tmp_path, grid, cfg=FedConfig(**{**SAMPLING, "rounds": 1}))
    driver.run(initial(), 1, 1)
    assert "node 2 reports client id 'a', as node 1 did before" in caplog.text


def test_collapse_rule():
    assert collapse_suspected(-0.01, -0.1, [3.0, 2.0])
    assert not collapse_suspected(-0.01, -0.1, [2.0, 3.0])  # loss rising: not the silent kind
    assert not collapse_suspected(-1.5, -0.1, [3.0, 2.0])  # uniform enough
    assert not collapse_suspected(-0.01, -0.1, [2.0])  # no trend yet


def test_collapse_guard_stops_the_run_when_asked(tmp_path):
    cfg = FedConfig(min_nodes=1, rounds=5, wait_nodes_timeout=0.3, eval_every=1,
                    collapse_uniformity=-0.1, stop_on_collapse=True)
    losses = iter([3.0, 2.0, 1.0, 0.5, 0.2])

    def node(msg):
        return honest(**{"train-loss": next(losses)})(msg)

    driver, _, _ = make_driver(tmp_path, FakeGrid({1: node}), cfg=cfg,
                               evaluate=lambda arrays: {"uniformity_head": -0.01})
    driver.run(initial(), 1, 5)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["collapse_warning"] == 1 and "round 2" in driver.stopped_early


@pytest.mark.parametrize("aggregation,cls", [("fedavg", FedAvg), ("fedtrimmedavg", FedTrimmedAvg),
                                             ("fedmedian", FedMedian), ("krum", WeightsKrum)])
def test_build_strategy(aggregation, cls):
    strategy = build_strategy(FedConfig(aggregation=aggregation, trim_beta=0.3, krum_f=1))
    assert type(strategy) is cls
    assert strategy.min_available_nodes == 1  # the driver waits for min_nodes itself


@pytest.mark.parametrize("aggregation", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_aggregation_limits_one_poisoned_client(tmp_path, aggregation):
    cfg = FedConfig(min_nodes=1, rounds=1, wait_nodes_timeout=0.3, eval_every=0,
                    aggregation=aggregation, trim_beta=0.2, krum_f=1)
    honest_offsets = [0.9, 1.0, 1.0, 1.1]
    nodes = {i + 1: honest(o) for i, o in enumerate(honest_offsets)}
    nodes[99] = honest(1000.0)  # poisoned: a huge update
    robust, _, _ = make_driver(tmp_path / "robust", FakeGrid(nodes), cfg=cfg)
    plain, _, _ = make_driver(tmp_path / "plain", FakeGrid(nodes))
    w_robust = robust.run_round(1, initial()).arrays["w"].numpy()
    w_plain = plain.run_round(1, initial()).arrays["w"].numpy()
    assert np.all(np.abs(w_plain - 1.0) > 100)  # FedAvg is dragged away
    assert np.all(np.abs(w_robust - 1.0) <= 0.1)  # the robust rule stays with the honest nodes


def stepping(offset: float, step: float) -> Node:
    """A node that adds ``offset`` to every weight and reports Adam's step count ``step``."""

    def node(msg: Message) -> Message:
        state = {k: torch.tensor([float(step)]) if k == STEP_KEY else v + offset
                 for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics())})
        return Message(content=content, reply_to=msg)

    return node


def test_krum_chooses_on_the_weights_not_on_the_optimiser_state(tmp_path):
    # Honest nodes agree on the weights but took very different numbers of local steps;
    # the poisoned node's step count sits in the middle of theirs.
    cfg = FedConfig(min_nodes=1, rounds=1, wait_nodes_timeout=0.3, eval_every=0,
                    aggregation="krum", krum_f=1)
    nodes = {1: stepping(0.0, 0), 2: stepping(0.01, 1000), 3: stepping(-0.01, 2000),
             4: stepping(0.02, 3000), 99: stepping(1.0, 1500)}
    start = ArrayRecord({"w": torch.zeros(4), "b": torch.zeros(2, 2), STEP_KEY: torch.zeros(1)})
    ours, _, _ = make_driver(tmp_path / "ours", FakeGrid(nodes), cfg=cfg)
    flowers, _, _ = make_driver(tmp_path / "flower", FakeGrid(nodes), cfg=cfg,
                                strategy=Krum(min_train_nodes=1, min_available_nodes=1,
                                              num_malicious_nodes=1))
    result = ours.run_round(1, start)
    assert result.counted
    chosen = result.arrays
    assert np.all(np.abs(chosen["w"].numpy()) <= 0.02)  # an honest node's weights
    assert chosen[STEP_KEY].numpy()[0] in (0, 1000, 2000, 3000)  # taken whole, state included
    # Flower's Krum, measuring the step counts too, picks the poisoned node
    result = flowers.run_round(1, start)
    assert result.counted and np.allclose(result.arrays["w"].numpy(), 1.0)


def dp_config(**overrides) -> FedConfig:
    values = dict(min_nodes=1, rounds=5, wait_nodes_timeout=0.3, eval_every=0, dp=True,
                  in_batch=False, key_mode="frozen", noise_multiplier=1.0, push_noise=1.0)
    values.update(overrides)
    return FedConfig(**values)


def reporting(epsilons: list[float]) -> Node:
    """A node whose reported epsilon follows ``epsilons``, round by round."""
    it = iter(epsilons)
    return lambda msg: honest(epsilon=next(it))(msg)


def test_epsilon_max_is_the_largest_over_every_client_so_far(tmp_path):
    # Node 2 is sampled only in round 1 (it then stops answering): its epsilon still counts.
    grid = FakeGrid({1: reporting([0.5, 1.0, 1.5]), 2: reporting([2.0])})
    driver, _, _ = make_driver(tmp_path, grid, cfg=dp_config())
    driver.run_round(1, initial())
    del grid.nodes[2]
    driver.run(initial(), 2, 3)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["epsilon"] for r in rows] == [2.0, 1.0, 1.5]
    assert [r["epsilon_max"] for r in rows] == [2.0, 2.0, 2.0]


def test_epsilon_max_continues_from_the_rows_of_a_resumed_run(tmp_path):
    RunDir(tmp_path).append_metrics({"round": 1, "epsilon": 3.0, "epsilon_max": 3.0})
    driver, _, _ = make_driver(tmp_path, FakeGrid({1: reporting([1.0])}), cfg=dp_config())
    assert driver.run_round(2, initial()).row["epsilon_max"] == 3.0


def test_the_run_stops_at_the_round_that_reaches_the_epsilon_budget(tmp_path):
    grid = FakeGrid({1: reporting([0.8, 1.5, 2.2, 3.0, 4.0])})
    driver, _, _ = make_driver(tmp_path, grid, cfg=dp_config(epsilon_budget=2.0))
    driver.run(initial(), 1, 5)
    assert [r["round"] for r in RunDir(tmp_path).read_metrics()] == [1, 2, 3]
    assert "privacy budget reached at round 3" in driver.stopped_early


@pytest.mark.parametrize("push_noise, private", [(0.0, 0), (1.0, 1)])
def test_rows_say_whether_pushes_are_private_and_omit_withheld_statistics(tmp_path, push_noise,
                                                                          private, caplog):
    driver, _, _ = make_driver(tmp_path, FakeGrid({1: reporting([1.0])}),
                               cfg=dp_config(push_noise=push_noise))
    row = driver.run_round(1, initial()).row
    assert row["pushes_private"] == private
    assert not {"train_loss", "alignment", "uniformity"} & set(row)
    assert ("NOT covered by the reported epsilon" in caplog.text) == (not private)


def test_without_dp_rows_say_no_accounting(tmp_path):
    driver, _, _ = make_driver(tmp_path, FakeGrid({1: honest()}))
    row = driver.run_round(1, initial()).row
    assert (row["epsilon"], row["epsilon_max"], row["pushes_private"]) == (-1.0, -1.0, 0)
    assert "train_loss" in row


@pytest.mark.parametrize("push_noise, private", [(0.0, False), (1.0, True)])
def test_summary_privacy_block_says_what_epsilon_max_covers(tmp_path, push_noise, private):
    cfg = dp_config(push_noise=push_noise, delta=1e-6, epsilon_budget=9.0)
    driver, _, _ = make_driver(tmp_path, FakeGrid({1: reporting([0.7, 1.2])}), cfg=cfg)
    driver.run(initial(), 1, 2)
    block = driver.privacy_summary()
    assert {k: block[k] for k in ("dp", "delta", "epsilon_max", "pushes_private", "epsilon_budget")} \
        == {"dp": True, "delta": 1e-6, "epsilon_max": 1.2, "pushes_private": private,
            "epsilon_budget": 9.0}
    assert "replaced" in block["adjacency"]
    if private:
        assert block["note"] is None
    else:
        assert "NOT covered by epsilon_max" in block["note"] and "--push-noise" in block["note"]


def test_summary_privacy_block_without_dp_says_nothing_is_accounted(tmp_path):
    driver, _, _ = make_driver(tmp_path, FakeGrid({1: honest()}))
    driver.run_round(1, initial())
    block = driver.privacy_summary()
    assert (block["dp"], block["delta"], block["adjacency"], block["epsilon_max"],
            block["pushes_private"]) == (False, None, None, -1.0, False)
    assert "no differential privacy" in block["note"]


def test_a_round_sends_only_train_messages(tmp_path):
    grid = FakeGrid({1: honest()})
    driver, _, _ = make_driver(tmp_path, grid)
    driver.run_round(1, initial())
    assert [b[0].metadata.message_type for b in grid.sent] == [IDENTIFY, MessageType.TRAIN]


def test_the_superlinks_reply_for_a_dead_node_counts_that_node_once(tmp_path, caplog):
    grid = FakeGrid({11: honest(), 22: unavailable, 33: lambda msg: None})
    driver, _, _ = make_driver(tmp_path, grid)
    with caplog.at_level("WARNING", logger="server.rounds"):
        result = driver.run_round(1, initial())
    row = result.row
    assert (row["sampled"], row["replied"], row["failed"], row["timed_out"]) == (3, 1, 1, 1)
    assert "reply for node 22 not used" in caplog.text
    assert "from nodes [33]" in caplog.text  # the silent node, not the dead one again


@pytest.mark.parametrize("pull_mode", ["reproducible", "live"])
def test_a_queue_that_overwrites_rows_is_counted_and_warned_of_under_reproducible_pulls(
        tmp_path, caplog, pull_mode):
    queue: list[NegativeQueue] = []

    def pushing(msg: Message) -> Message:  # 12 rows a round into the driver's 16-row queue
        rows = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
        queue[0].push(0, rows, version=int(msg.content["config"]["queue-version"]))
        return honest()(msg)

    cfg = FedConfig(min_nodes=1, rounds=2, wait_nodes_timeout=0.3, eval_every=0,
                    pull_mode=pull_mode)
    driver, _, _ = make_driver(tmp_path, FakeGrid({11: pushing}), cfg=cfg)
    queue.append(driver.queue)
    driver.run(initial(), 1, 2)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["queue_overwritten_rows_total"] for r in rows] == [0, 8]
    assert [r["queue_overwritten_rows"] for r in rows] == [0, 8]
    assert "QUEUE FULL: 8 rows overwritten" in progress_line(rows[1], 2)
    assert "QUEUE FULL" not in progress_line(rows[0], 2)
    warned = "round 2: the queue, full at 16 rows, overwrote 8 rows" in caplog.text
    assert warned == (pull_mode == "reproducible")


def test_an_aggregated_integer_array_goes_back_to_its_dtype_and_floats_stay_as_they_are():
    import torch
    from flwr.app import ArrayRecord

    from server.rounds import in_sent_dtypes

    sent = ArrayRecord({"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(3)})
    floats = ArrayRecord({"w": torch.full((2,), 0.5), "bn.num_batches_tracked": torch.tensor(3)})
    assert in_sent_dtypes(floats, sent) is floats  # nothing to change: the same record
    averaged = ArrayRecord({"w": torch.full((2,), 0.5),
                            "bn.num_batches_tracked": torch.tensor(3.5, dtype=torch.float64)})
    back = in_sent_dtypes(averaged, sent).to_torch_state_dict()
    assert back["bn.num_batches_tracked"].dtype == torch.int64
    assert int(back["bn.num_batches_tracked"]) == 4  # rounded (half to even: 3.5 -> 4)
    assert torch.equal(back["w"], torch.full((2,), 0.5))


def keyed(offset: float, key_offset: float) -> Node:
    """A node that adds ``offset`` to the weights and ``key_offset`` to the ``key.*`` arrays."""

    def node(msg: Message) -> Message:
        state = {k: v + (key_offset if k.startswith("key.") else offset)
                 for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics())})
        return Message(content=content, reply_to=msg)

    return node


def test_krum_measures_the_key_encoder_so_a_central_node_cannot_slip_in_a_poisoned_one(tmp_path):
    # The poisoned node's weights are the honest nodes' centre, its key encoder far off:
    # on the weights alone it is Krum's choice, and its key would make next round's rows.
    cfg = FedConfig(min_nodes=1, rounds=1, wait_nodes_timeout=0.3, eval_every=0,
                    aggregation="krum", krum_f=1)
    nodes = {1: keyed(-0.02, -0.02), 2: keyed(-0.01, -0.01), 3: keyed(0.01, 0.01),
             4: keyed(0.02, 0.02), 99: keyed(0.0, 50.0)}
    start = ArrayRecord({"w": torch.zeros(4), "key.w": torch.zeros(4)})
    driver, _, _ = make_driver(tmp_path, FakeGrid(nodes), cfg=cfg)
    result = driver.run_round(1, start)
    assert result.counted
    assert np.all(np.abs(result.arrays["key.w"].numpy()) <= 0.02)  # an honest node's key
    assert np.all(np.abs(result.arrays["w"].numpy()) <= 0.02)
