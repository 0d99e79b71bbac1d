"""The ClientApp's train function against a real queue service on loopback (no Flower processes)."""

from __future__ import annotations

import importlib
import re
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import app as client_app
from client import round as client_round
from client import trainer as trainer_module
from client.privacy import MOMENT_NOISE_RATIO, joint_noise_multiplier
from client.round import train_round
from client.settings import NodeSettings
from client.state import StateDir, default_state_dir
from client.stub import QueueClient
from common import optim_state
from common.accounting import PrivacyAccountant
from common.config import FedConfig, push_quota, to_run_config
from common.encoders import build_encoder
from common.runtime.flower_env import free_port
from common.runtime.wire import TOKEN_METADATA_KEY
from proto import negatives_pb2 as pb
from proto import negatives_pb2_grpc as pb_grpc
from server.contract import (
    IDENTIFY,
    REPLY_METRIC_KEYS,
    check_identity_reply,
    check_reply,
)
from server.queue import NegativeQueue
from server.service import QueueServer

pytestmark = pytest.mark.usefixtures("flower_task_identity", "one_thread")

CFG = FedConfig(width=8, embedding_dim=16, batch_size=32, global_negatives=64, push_fraction=0.5,
                device="cpu", seed=3)
TOKEN = "node-token-0123456789"


@pytest.fixture
def images(tmp_path):
    """A small local .npz: (N, 8, 8) uint8 images, the node's private data."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(96, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, size=96)
    path = tmp_path / "local.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    return path, torch.from_numpy(x).float().div(255.0)


@pytest.fixture
def queue_server():
    queue = NegativeQueue(1024, CFG.embedding_dim, max_age=CFG.max_age)
    queue.advance(1)
    with QueueServer(queue, {TOKEN: 0}) as server:
        yield queue, server


def train_message(address: str, token: str = TOKEN, rnd: int = 1,
                  arrays: dict[str, torch.Tensor] | None = None) -> Message:
    """A TRAIN message as the server sends it; ``arrays``: the global state (new weights
    without optimiser state when None)."""
    if arrays is None:
        model = build_encoder("cnn", in_channels=1, embedding_dim=CFG.embedding_dim, width=CFG.width)
        arrays = model.state_dict()
    config = ConfigRecord({"server-round": rnd, "lr": 1e-3, "queue-address": address,
                           "queue-token": token, "queue-version": rnd})
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "config": config}),
                   dst_node_id=7, message_type=MessageType.TRAIN)


def context(node_config: dict, cfg: FedConfig = CFG, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=to_run_config(cfg))


def node_config(path, tmp_path) -> dict:
    return {"data-path": str(path), "client-id": "alice", "state-dir": str(tmp_path / "state")}


def contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """Whether ``needle`` appears as a contiguous run in the flattened ``haystack``."""
    flat, n = haystack.ravel().astype(np.float64), needle.size
    if flat.size < n:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(flat, n)
    return bool(np.isclose(windows, needle.ravel(), atol=1e-6).all(axis=1).any())


def test_reply_follows_the_contract_and_pushes_reach_the_queue(images, queue_server, tmp_path):
    path, _ = images
    queue, server = queue_server
    msg = train_message(server.address)
    reply = client_app.train(msg, context(node_config(path, tmp_path)))
    assert check_reply(reply, msg.content["arrays"]) is None
    m = reply.content["metrics"]
    # The queue was empty: its pulls were answered, with no rows, so neither hits nor misses.
    assert m["num-examples"] == 96 and m["global-hits"] == 0 and m["global-misses"] == 0
    assert m["pushed-rows"] == 48 and m["push-failures"] == 0 and m["epsilon"] == -1.0
    assert len(queue) == 48 and queue.stats()["age_histogram"][0] == 48  # pushed at version 1


def test_pushes_stop_at_the_queues_quota_per_node(images, tmp_path):
    # The ServerApp's queue takes push_quota(cfg) rows per node and round; a node without
    # DP pushes no more than that, so none of its pushes is refused.
    path, _ = images
    cfg = replace(CFG, queue_quota=20)  # push_fraction 0.5 of 96 would be 48
    assert push_quota(cfg) == 20 and push_quota(replace(cfg, queue_quota=0)) == cfg.queue_capacity // 4
    queue = NegativeQueue(1024, cfg.embedding_dim, max_age=cfg.max_age, quota_per_version=push_quota(cfg))
    queue.advance(1)
    with QueueServer(queue, {TOKEN: 0}) as server:
        reply = client_app.train(train_message(server.address), context(node_config(path, tmp_path), cfg))
    m = reply.content["metrics"]
    assert m["pushed-rows"] == 20 and m["push-failures"] == 0 and len(queue) == 20


def test_optimiser_state_sent_with_the_weights_is_continued_and_sent_back(images, tmp_path):
    path, x = images
    cfg = replace(CFG, global_negatives=0, push_fraction=0.0)  # no queue traffic
    model = build_encoder("cnn", in_channels=1, embedding_dim=cfg.embedding_dim, width=cfg.width)
    arrays = {**model.state_dict(), **optim_state.initial_arrays(model, cfg)}
    steps = 3 * cfg.local_epochs  # 96 examples, batch 32
    for rnd in (1, 2):
        msg = train_message(f"127.0.0.1:{free_port()}", rnd=rnd, arrays=arrays)
        reply = client_app.train(msg, context(node_config(path, tmp_path), cfg))
        assert check_reply(reply, msg.content["arrays"]) is None  # same keys as the server's
        arrays = reply.content["arrays"].to_torch_state_dict()
        assert float(arrays[optim_state.STEP_KEY]) == rnd * steps  # round 2 went on counting

    # Zeros are a fresh optimiser; the state after round 2 makes other steps from the same start.
    weights, state = optim_state.split(arrays)
    images4d = x.unsqueeze(1)
    common = dict(lr=1e-3, queue_address=f"127.0.0.1:{free_port()}", queue_token=TOKEN,
                  queue_version=3, seed=11)
    fresh, _ = train_round(cfg, images4d, weights, **common)
    zero, _ = train_round(cfg, images4d, weights, **common,
                          optimizer_state=optim_state.initial_arrays(model, cfg))
    continued, _ = train_round(cfg, images4d, weights, **common, optimizer_state=state)
    assert set(fresh) == set(weights)  # no state sent, none returned
    assert all(torch.equal(fresh[k], zero[k]) for k in fresh)
    assert any(not torch.equal(fresh[k], continued[k]) for k in fresh)


def test_a_local_queue_gives_a_node_its_own_past_keys_as_negatives(images, tmp_path):
    # --queue-size in a federation: MoCo's FIFO of the node's own keys, filled as it trains.
    # Without it these settings would leave the loss only random unit vectors, batch-size
    # many (no in-batch negatives, no global ones); with it the queue's rows add up.
    path, _ = images
    cfg = replace(CFG, global_negatives=0, push_fraction=0.0, in_batch=False, key_mode="ema",
                  queue_size=64, local_epochs=2)
    msg = train_message(f"127.0.0.1:{free_port()}")
    m = client_app.train(msg, context(node_config(path, tmp_path), cfg)).content["metrics"]
    # 96 examples, batch 32: 6 steps; the first sees random vectors (32), then 32, 64, 64, 64, 64.
    assert m["negatives-per-step"] == pytest.approx((32 + 32 + 64 * 4) / 6)


def test_unreachable_queue_trains_on_local_negatives_and_reports_misses(images, tmp_path):
    path, _ = images
    msg = train_message(f"127.0.0.1:{free_port()}")  # nothing listens there
    reply = client_app.train(msg, context(node_config(path, tmp_path)))
    assert check_reply(reply, msg.content["arrays"]) is None
    m = reply.content["metrics"]
    assert m["global-hits"] == 0 and m["global-misses"] > 0
    assert m["push-failures"] == 1 and m["pushed-rows"] == 0
    assert np.isfinite(m["train-loss"])


def test_wrong_token_is_refused_unauthenticated(queue_server):
    _queue, server = queue_server
    with QueueClient(server.address, "not-a-token-of-this-run", retries=0) as client:
        assert client.pull(8, max_age=2) is None
        assert client.counters()["unauthenticated"] == 1
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.NegativeQueueStub(channel).Pull(
                pb.PullRequest(count=1), timeout=5,
                metadata=((TOKEN_METADATA_KEY, "forged"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_nothing_on_the_wire_contains_a_local_example(images, queue_server, tmp_path):
    path, x = images
    queue, server = queue_server
    msg = train_message(server.address)
    reply = client_app.train(msg, context(node_config(path, tmp_path)))

    # The reply: exactly the whitelisted records and keys, no config echoed back.
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert set(reply.content["metrics"].keys()) == set(REPLY_METRIC_KEYS)
    assert list(reply.content["arrays"].keys()) == list(msg.content["arrays"].keys())
    assert TOKEN not in repr(reply.content)
    samples = x.reshape(len(x), -1).numpy()  # 96 x 64, as the model sees them
    for key, array in reply.content["arrays"].items():
        values = array.numpy()
        for sample in samples:
            assert not contains(values, sample), f"{key} holds a local example"

    # The pushed rows: unit-norm embeddings, not images.
    rows, _versions = queue.pull(1024, max_age=2)
    assert rows.shape == (48, CFG.embedding_dim)
    assert torch.allclose(rows.float().norm(dim=1), torch.ones(48), atol=1e-3)
    for row in rows.float().numpy():
        assert not any(contains(row, s[: CFG.embedding_dim]) for s in samples)
    # nor a normalised stretch of pixels, the shape a unit-norm row could smuggle one in
    windows = torch.from_numpy(samples).unfold(1, CFG.embedding_dim, 1).reshape(-1, CFG.embedding_dim)
    windows = torch.nn.functional.normalize(windows.float()[windows.norm(dim=1) > 0], dim=1)
    assert (rows.float() @ windows.T).max() < 0.999


def test_state_survives_processes_and_moves_the_random_stream(images, queue_server, tmp_path):
    path, _ = images
    _queue, server = queue_server
    cfg = FedConfig(**{**CFG.__dict__, "push_fraction": 0.0, "global_negatives": 0})
    first = client_app.train(train_message(server.address), context(node_config(path, tmp_path), cfg))
    second = client_app.train(train_message(server.address), context(node_config(path, tmp_path), cfg))
    state = StateDir(tmp_path / "state", "alice").load()
    assert state.rounds_trained == 2 and state.runs == {"1": 1}
    # same start weights, same data: only the per-round random stream differs
    a, b = first.content["arrays"]["head.net.0.weight"], second.content["arrays"]["head.net.0.weight"]
    assert not np.allclose(a.numpy(), b.numpy())


def assert_error(reply, match: str) -> None:
    """``reply`` is the error reply of a ValueError whose text matches ``match``."""
    assert reply.has_error(), reply
    assert re.match(r"\w*Error: ", reply.error.reason) and re.search(match, reply.error.reason)


def test_bad_data_is_answered_with_a_clear_error(queue_server, tmp_path):
    _queue, server = queue_server
    config = {"data-path": str(tmp_path / "missing.npz"), "client-id": "bob",
              "state-dir": str(tmp_path / "s")}
    # answered with an error that names the file, not raised (no traceback on the node)
    assert_error(client_app.train(train_message(server.address), context(config)), "missing.npz")


def test_a_tls_queue_without_a_ca_fails_the_round_before_anything_is_sent(images, queue_server,
                                                                         tmp_path):
    path, _ = images
    queue, server = queue_server
    msg = train_message(server.address)
    msg.content["config"]["queue-tls"] = True
    assert_error(client_app.train(msg, context(node_config(path, tmp_path))), "--root-certificates")
    assert len(queue) == 0


def test_a_node_trusting_the_queue_over_tls_refuses_an_insecure_one(images, queue_server, tmp_path):
    path, _ = images
    queue, server = queue_server
    ca = tmp_path / "ca.pem"
    ca.write_text("the CA of this deployment")
    node = {**node_config(path, tmp_path), "queue-root-certificates": str(ca)}
    msg = train_message(server.address)
    msg.content["config"]["queue-tls"] = False
    assert_error(client_app.train(msg, context(node)), "without TLS")
    assert len(queue) == 0  # the token and the embeddings stayed home
    with pytest.raises(ValueError, match="absolute"):
        NodeSettings.from_node_config({**node, "queue-root-certificates": "ca.pem"})


def test_node_settings_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    node = NodeSettings.from_node_config({"partition-id": 1, "num-partitions": 3})
    assert node.client_id == "partition-1"
    assert node.state_dir == tmp_path / "fedcontrast" / "clients" / "partition-1"
    assert default_state_dir("c", env={}).parts[-3:] == (".fedcontrast", "clients", "c")
    with pytest.raises(ValueError, match="partition-id"):
        NodeSettings.from_node_config({"client-id": "x"})
    with pytest.raises(ValueError, match="partition-id 3"):
        NodeSettings.from_node_config({"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ValueError, match="client-id"):
        NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 1, "client-id": "../x"})
    with pytest.raises(ValueError, match="data-path needs client-id"):  # no "partition-None"
        NodeSettings.from_node_config({"data-path": str(tmp_path / "site.npz")})


@pytest.mark.parametrize(("name", "home"), [("push_keys", "client.round"),
                                            ("partition_indices", "client.data"),
                                            ("build_model", "common.model")])
def test_names_moved_out_of_the_app_still_import_with_a_deprecation_warning(name, home):
    with pytest.warns(DeprecationWarning, match=f"moved to {home}"):
        moved = getattr(client_app, name)
    assert moved is getattr(importlib.import_module(home), name)


# -- differential privacy -------------------------------------------------------------

#: 96 examples, batch 32: 3 Poisson steps per epoch at q = 1/3; pushes at rate 0.5.
DP = FedConfig(**{**CFG.__dict__, "in_batch": False, "key_mode": "frozen", "dp": True,
                  "noise_multiplier": 1.0, "push_noise": 2.0})


def expected_epsilon(rounds: int, cfg: FedConfig = DP, sigma: float | None = None) -> float:
    """Epsilon after ``rounds`` rounds, every DP-SGD step and push release recorded one by one
    (the formula itself is tested in ``test_accounting.py``)."""
    accountant = PrivacyAccountant()
    for _ in range(rounds):
        for _ in range(cfg.local_epochs * 3):
            accountant.record_steps(noise_multiplier=sigma or cfg.noise_multiplier, sample_rate=1 / 3)
        if cfg.push_noise > 0:
            accountant.record_push(push_noise=cfg.push_noise, sample_rate=cfg.push_fraction)
    return accountant.epsilon(cfg.delta)


def test_epsilon_carries_on_across_rounds_restarts_and_a_resumed_run(images, queue_server, tmp_path):
    path, _ = images
    queue, server = queue_server
    node = node_config(path, tmp_path)
    epsilons = []
    # Every call is a fresh ClientApp, as Flower starts one per message: what carries on
    # is the state directory. Round 3 comes from a resumed server run (a new run id).
    for run_id, rnd in [(1, 1), (1, 2), (2, 3)]:
        queue.advance(rnd)
        msg = train_message(server.address, rnd=rnd)
        reply = client_app.train(msg, context(node, DP, run_id=run_id))
        assert check_reply(reply, msg.content["arrays"]) is None
        epsilons.append(reply.content["metrics"]["epsilon"])
    assert epsilons == pytest.approx([expected_epsilon(r) for r in (1, 2, 3)], rel=1e-9)
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    state = StateDir(tmp_path / "state", "alice").load()
    assert state.runs == {"1": 2, "2": 3}
    assert state.accountant.epsilon(DP.delta) == pytest.approx(epsilons[-1])


def test_a_round_is_accounted_before_anything_is_released(images, queue_server, tmp_path):
    path, _ = images
    _queue, server = queue_server
    msg = train_message(server.address)
    msg.content["arrays"] = ArrayRecord({"not-the-encoder": torch.zeros(3)})  # fails in training
    assert_error(client_app.train(msg, context(node_config(path, tmp_path), DP)), "do not fit")
    state = StateDir(tmp_path / "state", "alice").load()
    assert state.rounds_trained == 0  # the round failed ...
    assert state.accountant.epsilon(DP.delta) == pytest.approx(expected_epsilon(1))  # ... counted


def test_noise_derived_from_the_target_stays_fixed_and_meets_it(images, queue_server, tmp_path):
    path, _ = images
    queue, server = queue_server
    cfg = FedConfig(**{**DP.__dict__, "noise_multiplier": 0.0, "target_epsilon": 4.0, "rounds": 2,
                       "push_noise": 6.0})
    node = node_config(path, tmp_path)
    sigmas, epsilons = [], []
    for rnd in (1, 2):
        queue.advance(rnd)
        reply = client_app.train(train_message(server.address, rnd=rnd), context(node, cfg))
        epsilons.append(reply.content["metrics"]["epsilon"])
        sigmas.append(StateDir(tmp_path / "state", "alice").load().calibration.noise_multiplier)
    assert sigmas[0] == sigmas[1]
    assert epsilons[1] == pytest.approx(expected_epsilon(2, cfg, sigma=sigmas[0]), rel=1e-9)
    assert 0.99 * 4.0 <= epsilons[1] <= 4.0  # the whole planned run, both rounds, meets it


def test_a_moment_round_accounts_the_released_moment_with_each_step(images, queue_server,
                                                                 tmp_path, monkeypatch):
    # --objective moment: every DP-SGD step also releases the keys' second moment, noised
    # at MOMENT_NOISE_RATIO times the DP-SGD noise; each step is accounted at the joint
    # multiplier, and DP-SGD itself runs at the noise asked for.
    path, _ = images
    _queue, server = queue_server
    cfg = FedConfig(**{**DP.__dict__, "objective": "moment", "key_mode": "ema"})
    made = []
    original = client_round.DPSGD.__init__

    def spy(self, **kwargs):
        made.append(kwargs)
        original(self, **kwargs)

    monkeypatch.setattr(client_round.DPSGD, "__init__", spy)
    msg = train_message(server.address)
    reply = client_app.train(msg, context(node_config(path, tmp_path), cfg))
    assert check_reply(reply, msg.content["arrays"]) is None
    (kwargs,) = made
    assert kwargs["noise_multiplier"] == pytest.approx(cfg.noise_multiplier)
    assert kwargs["moment_noise"] == pytest.approx(MOMENT_NOISE_RATIO * cfg.noise_multiplier)
    joint = joint_noise_multiplier(cfg.noise_multiplier)
    assert reply.content["metrics"]["epsilon"] == pytest.approx(
        expected_epsilon(1, cfg, sigma=joint), rel=1e-9)
    assert reply.content["metrics"]["epsilon"] > expected_epsilon(1, cfg)  # more is released


def test_unnoised_pushes_are_flagged_and_local_statistics_withheld(images, queue_server,
                                                                   tmp_path, caplog):
    path, _ = images
    _queue, server = queue_server
    cfg = FedConfig(**{**DP.__dict__, "push_noise": 0.0})
    reply = client_app.train(train_message(server.address), context(node_config(path, tmp_path), cfg))
    m = reply.content["metrics"]
    assert m["train-loss"] == m["alignment"] == m["uniformity"] == 0.0
    assert m["pushed-rows"] > 0
    assert m["epsilon"] == pytest.approx(expected_epsilon(1, cfg))  # DP-SGD only
    assert "pushes are NOT covered by differential privacy" in caplog.text


def record_negatives(monkeypatch) -> list[torch.Tensor]:
    """From now on, every bank of negatives a trainer's loss is given, in order."""
    seen: list[torch.Tensor] = []
    info_nce = trainer_module.info_nce

    def recording(query, positive_key, negatives=None, *args, **kwargs):
        seen.append(negatives.detach().clone())
        return info_nce(query, positive_key, negatives, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "info_nce", recording)
    return seen


def _max_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T).max())


@pytest.mark.parametrize("push_noise, restarted, own_rows_reach_the_loss", [
    (0.0, False, False),
    (0.0, True, False),  # a new token, hence slot: exclude_own alone would miss its old rows
    (2.0, False, True),  # noised and accounted rows may come back (with --pull-scope all)
])
def test_under_dp_no_unnoised_own_row_reaches_the_loss(images, tmp_path, monkeypatch, push_noise,
                                                       restarted, own_rows_reach_the_loss):
    path, _ = images
    bob_token, restarted_token = "bob-token-0123456789", "restarted-token-0123456789"
    # --pull-mode live: bob's rows of the running round are pullable, so the restarted
    # node's pulls, limited to versions after its un-noised round-1 rows, still find some.
    cfg = FedConfig(**{**DP.__dict__, "push_noise": push_noise, "max_age": 2,
                       "pull_scope": "all" if push_noise > 0 else "others", "pull_mode": "live"})
    node = node_config(path, tmp_path)
    queue = NegativeQueue(1024, CFG.embedding_dim, max_age=cfg.max_age)
    queue.advance(1)
    with QueueServer(queue, {TOKEN: 0, bob_token: 1, restarted_token: 2}) as server:
        client_app.train(train_message(server.address, rnd=1), context(node, cfg))
        queue.advance(2)
        with QueueClient(server.address, bob_token) as bob:
            assert bob.push(F.normalize(torch.randn(40, CFG.embedding_dim), dim=1), 2)
        own, _ = queue.pull(1024, exclude=1)  # what alice pushed in round 1
        others, _ = queue.pull(1024, exclude=0)
        assert len(own) > 0 and len(others) == 40

        seen = record_negatives(monkeypatch)
        token = restarted_token if restarted else TOKEN
        client_app.train(train_message(server.address, token=token, rnd=2), context(node, cfg))
    negatives = torch.cat(seen)  # every row any loss of round 2 contrasted against
    assert _max_cosine(negatives, others) > 0.999  # bob's rows did reach the loss
    assert (_max_cosine(negatives, own) > 0.999) == own_rows_reach_the_loss


def test_a_reproducible_round_pulls_only_finished_rounds_and_repeats_exactly(images, tmp_path,
                                                                            monkeypatch):
    path, _ = images
    torch.manual_seed(0)
    arrays = build_encoder("cnn", in_channels=1, embedding_dim=CFG.embedding_dim,
                           width=CFG.width).state_dict()
    finished = F.normalize(torch.randn(40, CFG.embedding_dim), dim=1)  # bob, round 1
    running = F.normalize(torch.randn(40, CFG.embedding_dim), dim=1)  # carol, round 2 so far
    seen = record_negatives(monkeypatch)

    def round_two(cfg: FedConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        queue = NegativeQueue(1024, CFG.embedding_dim, max_age=cfg.max_age)
        queue.advance(1)
        queue.push(1, finished, version=1)
        queue.advance(2)
        queue.push(2, running, version=2)
        seen.clear()
        with QueueServer(queue, {TOKEN: 0}) as server:
            reply = client_app.train(train_message(server.address, rnd=2, arrays=arrays),
                                     context(node_config(path, tmp_path), cfg))
        return reply.content["arrays"].to_torch_state_dict(), torch.cat(seen)

    weights, negatives = round_two(CFG)
    assert _max_cosine(negatives, finished) > 0.999 and _max_cosine(negatives, running) < 0.99
    # Again, after this node's state has counted one more round: the same pulls, weights.
    again, negatives_again = round_two(CFG)
    assert torch.equal(negatives, negatives_again)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    # --pull-mode live: the running round's rows are found too.
    _, live = round_two(replace(CFG, pull_mode="live"))
    assert _max_cosine(live, running) > 0.999


@pytest.mark.parametrize(("config", "expected"), [
    ({"partition-id": 3, "num-partitions": 10}, "partition-3"),
    ({"partition-id": 3, "num-partitions": 10, "client-id": "ward-7"}, "ward-7"),
    # The data file does not exist: identifying a node reads no data.
    ({"data-path": "/nonexistent/alice.npz", "client-id": "alice"}, "alice"),
])
def test_the_identify_query_is_routed_to_its_handler_and_answers_the_client_id(config, expected,
                                                                               tmp_path):
    query = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=7, message_type=IDENTIFY)
    reply = client_app.app(query, context({**config, "state-dir": str(tmp_path / "state")}))
    assert check_identity_reply(reply) is None
    assert reply.content["identity"]["client-id"] == expected
    assert not (tmp_path / "state").exists()  # nor does it touch the client's state
