"""QueueClient (deadlines, retries, fallback, counters) and GlobalNegatives (refresh, misses)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.nn.functional as F

from client.negatives import NegativeSource
from client.stub import GlobalNegatives, QueueClient, pull_seed
from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.encoders import build_encoder
from server.queue import NegativeQueue
from server.service import QueueServer

DIM = 8
TOKENS = {"token-a": 0, "token-b": 1}


def unit(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, DIM, generator=g), dim=1)


@pytest.fixture
def queue() -> NegativeQueue:
    q = NegativeQueue(64, DIM, max_age=2)
    q.push(1, unit(10, seed=1), version=0)  # token-b's rows
    return q


@pytest.fixture
def server(queue):
    with QueueServer(queue, TOKENS) as srv:
        yield srv


def closed_port() -> int:
    """A port that was just free on 127.0.0.1 (nothing listens there now)."""
    with QueueServer(NegativeQueue(1, 1), {}) as srv:
        return srv.port


# ---------------------------------------------------------------- QueueClient


def test_pull_counts_hits(server):
    with QueueClient(server.address, "token-a") as client:
        assert client.pull(4, max_age=2).shape == (4, DIM)
        assert client.counters()["hits"] == 1 and client.hits == 1 and client.misses == 0
        assert client.counters()["rows_pulled"] == 4


@pytest.mark.timeout(20)
def test_unreachable_queue_is_a_counted_miss_after_bounded_retries():
    client = QueueClient(
        f"127.0.0.1:{closed_port()}", "token-a", timeout=0.5, retries=2, backoff=0.01
    )
    with client:
        assert client.pull(4, max_age=2) is None
        assert not client.push(unit(2), version=0)
        assert client.stats() is None
    counters = client.counters()  # three calls, each tried 1 + 2 times, then given up
    assert (counters["misses"], counters["push_failures"], counters["retries"]) == (1, 1, 6)


@pytest.mark.timeout(20)
def test_retries_reach_a_queue_that_comes_up_late(queue):
    port = closed_port()
    client = QueueClient(f"127.0.0.1:{port}", "token-a", timeout=1.0, retries=8, backoff=0.05)
    server = QueueServer(queue, TOKENS, port=port)
    starter = threading.Timer(0.3, server.start)
    starter.start()
    try:
        rows = client.pull(3, max_age=2)
    finally:
        starter.join()
        server.stop()
        client.close()
    assert rows is not None and rows.shape == (3, DIM)
    assert client.counters()["retries"] >= 1


class _SlowQueue(NegativeQueue):
    """The real queue behind the real service, but every call it serves blocks until
    released (or for ``HOLD`` seconds, then answers normally): a hung server."""

    HOLD = 10.0

    def __init__(self):
        super().__init__(64, DIM, max_age=2)
        super().push(1, unit(10, seed=1), version=0)
        self.calls = {"push": 0, "pull": 0, "stats": 0}
        self.release = threading.Event()

    def _hold(self, name):
        self.calls[name] += 1
        self.release.wait(self.HOLD)

    def push(self, *args, **kwargs):
        self._hold("push")
        return super().push(*args, **kwargs)

    def pull(self, *args, **kwargs):
        self._hold("pull")
        return super().pull(*args, **kwargs)

    def stats(self):
        self._hold("stats")
        return super().stats()


@pytest.mark.timeout(60)
def test_every_call_has_a_deadline_and_deadline_errors_are_retried(caplog):
    # Without a deadline each call would wait out HOLD and then succeed: rows, True, stats.
    slow = _SlowQueue()
    # The held handlers stay in flight after their deadlines: no per-token limit here.
    with QueueServer(slow, TOKENS, max_calls_per_token=None) as server, QueueClient(
        server.address, "token-a", timeout=0.2, retries=1, backoff=0.01
    ) as client, caplog.at_level(logging.DEBUG, logger="client.stub"):
        try:
            assert client.pull(3, max_age=2) is None
            assert client.push(unit(2), version=0) is False
            assert client.stats() is None
        finally:
            slow.release.set()  # let the held handlers finish before the server stops
    assert slow.calls == {"push": 2, "pull": 2, "stats": 2}  # each tried twice: 1 + 1 retry
    counters = client.counters()
    assert counters["retries"] == 3 and counters["misses"] == 1 and counters["push_failures"] == 1
    gave_up = [r.getMessage() for r in caplog.records if "DEADLINE_EXCEEDED" in r.getMessage()]
    assert [m.split(" for ")[1].split()[0] for m in gave_up] == ["Pull", "Push", "Stats"], gave_up


def test_wrong_token_is_not_retried_and_is_logged_as_an_error(server, caplog):
    with caplog.at_level(logging.ERROR, logger="client.stub"):
        with QueueClient(server.address, "wrong", retries=3) as client:
            assert client.pull(4, max_age=2) is None
    counters = client.counters()
    assert (counters["unauthenticated"], counters["retries"], counters["misses"]) == (1, 0, 1)
    assert any("token" in r.message for r in caplog.records if r.levelno == logging.ERROR)


@pytest.mark.timeout(20)
def test_a_queue_that_stays_down_is_logged_once_not_every_step(caplog):
    with caplog.at_level(logging.DEBUG, logger="client.stub"):
        with QueueClient(f"127.0.0.1:{closed_port()}", "token-a", retries=0) as client:
            for _ in range(3):
                assert client.pull(1, max_age=2) is None
    levels = [r.levelno for r in caplog.records if r.name == "client.stub"]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert client.misses == 3


def test_invalid_push_is_not_retried(server):
    with QueueClient(server.address, "token-a", retries=3) as client:
        assert not client.push(unit(2) * 5, version=0)
    counters = client.counters()
    assert (counters["push_failures"], counters["refused"], counters["retries"]) == (1, 1, 0)


def test_push_counts_rows(server, queue):
    with QueueClient(server.address, "token-a") as client:
        assert client.push(unit(3), version=0)
    assert client.counters()["rows_pushed"] == 3 and len(queue) == 13


def test_client_rejects_bad_settings():
    with pytest.raises(ValueError):
        QueueClient("127.0.0.1:1", "t", timeout=0)
    with pytest.raises(ValueError):
        QueueClient("127.0.0.1:1", "t", retries=-1)


# ------------------------------------------------------------ GlobalNegatives


def test_global_negatives_are_detached_unit_norm_float32(server):
    with QueueClient(server.address, "token-a") as client:
        source = GlobalNegatives(client, num_negatives=6, max_age=2)
        assert isinstance(source, NegativeSource)
        negatives = source.negatives(step=0, device=torch.device("cpu"))
    assert negatives.shape == (6, DIM) and negatives.dtype == torch.float32
    assert not negatives.requires_grad
    assert torch.allclose(negatives.norm(dim=1), torch.ones(6), atol=1e-6)


def test_global_negatives_refresh_every_k_steps_and_cache_between(server):
    with QueueClient(server.address, "token-a") as client:
        source = GlobalNegatives(client, num_negatives=4, max_age=2, refresh_every=3)
        served = [source.negatives(step, "cpu") for step in range(7)]
        assert client.counters()["hits"] == 3  # steps 0, 3, 6
        assert served[1] is served[0] and served[2] is served[0]
        source.negatives(0, "cpu")  # a new epoch starts again at step 0
        assert client.counters()["hits"] == 4
    assert source.metrics()["refreshes"] == 4 and source.metrics()["steps_served"] == 8


def test_global_negatives_exclude_own_rows(server, queue):
    mine = unit(20, seed=5)
    queue.push(0, mine, version=0)
    with QueueClient(server.address, "token-a") as client:
        negatives = GlobalNegatives(client, num_negatives=64, max_age=2).negatives(0, "cpu")
    assert negatives.shape == (10, DIM)
    assert torch.cdist(negatives, mine).min() > 1e-2


def test_the_trainer_takes_every_row_the_global_negatives_serve(server, queue):
    queue.advance(2)
    newer = unit(3, seed=6)
    queue.push(1, newer, version=2)
    cfg = FedConfig(width=8, embedding_dim=DIM, in_batch=False, key_mode="frozen", max_age=2,
                    device="cpu")
    model = build_encoder("cnn", in_channels=1, embedding_dim=DIM, norm="group", width=8)
    with QueueClient(server.address, "token-a") as client:
        source = GlobalNegatives(client, num_negatives=64, max_age=2)
        trainer = ContrastiveTrainer(model, cfg, device=torch.device("cpu"), sources=[source])
        negatives, had_rows = trainer._bank()
    assert negatives.shape == (13, DIM) and had_rows
    assert torch.cdist(newer, negatives).min(dim=1).values.max() < 2e-3


@pytest.mark.timeout(20)
def test_global_negatives_serve_nothing_when_the_queue_is_gone(queue):
    server = QueueServer(queue, TOKENS)
    server.start()
    with QueueClient(server.address, "token-a", timeout=0.5, retries=1, backoff=0.01) as client:
        try:
            source = GlobalNegatives(client, num_negatives=4, max_age=2, refresh_every=2)
            assert source.negatives(0, "cpu") is not None
        finally:
            server.stop(grace=None)
        assert source.negatives(1, "cpu") is not None  # cached, no call
        assert source.negatives(2, "cpu") is None
        assert source.negatives(3, "cpu") is None
    metrics = source.metrics()
    assert (metrics["misses"], metrics["steps_without"], metrics["steps_served"]) == (1, 2, 2)
    assert client.misses == 1


def test_global_negatives_of_an_empty_queue_are_none(server, queue):
    queue.advance(10)
    with QueueClient(server.address, "token-a") as client:
        source = GlobalNegatives(client, num_negatives=4, max_age=2)
        assert source.negatives(0, "cpu") is None
    assert source.metrics()["empty_pulls"] == 1 and client.misses == 0


def test_observe_is_a_no_op(server):
    with QueueClient(server.address, "token-a") as client:
        source = GlobalNegatives(client, num_negatives=4, max_age=2)
        source.observe(unit(3))
    assert client.counters()["pushes"] == 0


def test_global_negatives_reject_bad_settings(server):
    with QueueClient(server.address, "token-a") as client:
        for kwargs in (
            {"num_negatives": 0, "max_age": 1},
            {"num_negatives": 1, "max_age": -1},
            {"num_negatives": 1, "max_age": 1, "refresh_every": 0},
        ):
            with pytest.raises(ValueError):
                GlobalNegatives(client, **kwargs)


def test_seeded_global_negatives_send_the_kth_refresh_its_own_seed_and_max_version(server, queue):
    queue.advance(1)
    queue.push(1, unit(10, seed=2), version=1)  # newer than max_version below
    with QueueClient(server.address, "token-a") as client:
        source = GlobalNegatives(client, num_negatives=4, max_age=2, max_version=0, seed=11)
        served = [source.negatives(step, "cpu").clone() for step in range(3)]
    for k, bank in enumerate(served, start=1):
        expected, versions = queue.pull(4, exclude=0, max_version=0, seed=pull_seed(11, k))
        assert versions.tolist() == [0] * 4
        assert torch.allclose(bank, F.normalize(expected.half().float(), dim=1))  # float16 wire
    assert not torch.equal(served[0], served[1])  # every refresh draws anew
    assert pull_seed(11, 1) != pull_seed(12, 1) and 0 <= pull_seed(11, 1) < 2**64
