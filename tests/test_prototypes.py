"""Prototypes of the queue's rows (--prototypes, Orchestra, Lubana et al. 2022; SwAV's swapped
prediction, Caron et al. 2020): the loss by hand, per example, the seeded spherical k-means,
the rows it clusters, the round's record on its way to the nodes and never back, the
client's use of it, the settings and the compare method."""

# ruff: noqa: F811 (pytest fixtures imported from test_client_app are parameters here)
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from test_client_app import context, images, node_config, train_message  # noqa: F401 (fixture)
from test_strategy import FakeGrid, honest, make_driver, metrics

from client import app as client_app
from client import round as round_module
from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.encoders import build_encoder
from common.loss import prototype_loss
from common.prototypes import RECORD, checked_prototypes, round_prototypes, spherical_kmeans
from common.runtime.flower_env import free_port
from server.contract import check_reply
from server.queue import NegativeQueue
from server.rounds import dropped_column
from simulations.compare import sent_megabytes
from simulations.methods import method_config

pytestmark = pytest.mark.usefixtures("flower_task_identity", "one_thread")

CPU = torch.device("cpu")
D = torch.float64
# Two queries, their keys (the other view) and three prototypes, all 2-D unit vectors.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
K = torch.tensor([[0.8, 0.6], [0.6, -0.8]], dtype=D)
C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=D)


def _softmax(logits: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in logits)
    return [math.exp(v) / total for v in logits]


def test_swapped_prediction_by_hand():
    # Targets at T_t = 0.25: k1.C = (0.8, 0.6, -0.8) -> logits (3.2, 2.4, -3.2);
    #                        k2.C = (0.6, -0.8, -0.6) -> logits (2.4, -3.2, -2.4).
    # Predictions at T = 0.5: q1.C = (1, 0, -1) -> logits (2, 0, -2);
    #                         q2.C = (0, 1, 0)  -> logits (0, 2, 0).
    # loss_i = -sum_c t_ic log p_ic.
    t1, t2 = _softmax([3.2, 2.4, -3.2]), _softmax([2.4, -3.2, -2.4])
    p1, p2 = _softmax([2.0, 0.0, -2.0]), _softmax([0.0, 2.0, 0.0])
    expected = [-sum(t * math.log(p) for t, p in zip(t1, p1, strict=True)),
                -sum(t * math.log(p) for t, p in zip(t2, p2, strict=True))]
    loss = prototype_loss(Q, K, C, 0.5, target_temperature=0.25)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))
    # The default target temperature, 0.05, is sharper: k1's target is nearly prototype 1.
    assert prototype_loss(Q, K, C, 0.5)[0] < loss[0]


def test_gradient_reaches_the_query_never_the_key_or_the_prototypes():
    q, k, c = (t.clone().requires_grad_(True) for t in (Q, K, C))
    prototype_loss(q, k, c, 0.5).sum().backward()
    assert k.grad is None and c.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prototypes"):
        prototype_loss(Q, K, C[:0], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        prototype_loss(Q, K, C, 0.5, target_temperature=0.0)


def test_each_loss_depends_on_its_own_example_alone():
    # What DP-SGD's per-example clipping needs: no batch normalisation of the targets
    # (SwAV's Sinkhorn would couple them), so d loss_i / d q_j = d loss_i / d k_j = 0, i != j.
    g = torch.Generator().manual_seed(2)
    q, k, c = (torch.nn.functional.normalize(torch.randn(n, 3, dtype=D, generator=g), dim=1)
               for n in (4, 4, 5))
    off = ~torch.eye(4, dtype=torch.bool)
    jac_q = torch.autograd.functional.jacobian(lambda x: prototype_loss(x, k, c, 0.3), q)  # 4 x 4 x 3
    assert jac_q[off].abs().max() == 0 and jac_q[~off].abs().max() > 0
    # The key enters only through its own target: moving key j changes loss j alone.
    moved = k.clone()
    moved[1] = torch.nn.functional.normalize(moved[1] + 0.5, dim=0)
    changed = prototype_loss(q, moved, c, 0.3) != prototype_loss(q, k, c, 0.3)
    assert changed.tolist() == [False, True, False, False]


def _directions(n_per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scattered about three orthogonal directions of R^8, and those directions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3]
    rows = centres.repeat_interleave(n_per, 0) + 0.1 * torch.randn(3 * n_per, 8, generator=g)
    return torch.nn.functional.normalize(rows, dim=1), centres


def test_kmeans_is_seeded_returns_unit_vectors_and_finds_clear_clusters():
    rows, centres = _directions(20, 0)
    first = spherical_kmeans(rows, 3, seed=7)
    assert first.shape == (3, 8) and first.dtype == torch.float32
    torch.testing.assert_close(first.norm(dim=1), torch.ones(3))
    assert torch.equal(first, spherical_kmeans(rows, 3, seed=7))  # bit for bit
    # Whatever the seed, each centre has a centroid within a small angle of it.
    for seed in (7, 8, 9):
        assert ((spherical_kmeans(rows, 3, seed=seed) @ centres.T).max(dim=0).values > 0.98).all()
    assert not torch.equal(spherical_kmeans(rows, 5, seed=7), spherical_kmeans(rows, 5, seed=8))
    with pytest.raises(ValueError, match="at least k = 61 rows"):
        spherical_kmeans(rows, 61, seed=7)
    assert round_prototypes(rows, 61, 0, 2) is None and round_prototypes(rows, 0, 0, 2) is None
    assert torch.equal(round_prototypes(rows, 3, 0, 2), round_prototypes(rows, 3, 0, 2))
    assert not torch.equal(round_prototypes(rows, 3, 0, 2), round_prototypes(rows, 3, 0, 3))


def test_the_queue_hands_its_rows_in_an_order_arrival_does_not_change_and_counts_no_pull():
    rows, _ = _directions(4, 1)
    a, b = NegativeQueue(32, 8), NegativeQueue(32, 8)
    for queue in (a, b):
        queue.advance(1)
    a.push(0, rows[:6], 1)
    a.push(1, rows[6:], 1)
    b.push(1, rows[6:], 1)
    b.push(0, rows[:6], 1)
    for queue in (a, b):
        queue.advance(2)
        queue.push(0, rows[:2], 2)  # this round's rows: not before the round has finished
    assert torch.equal(a.rows(max_version=1), b.rows(max_version=1))
    assert a.rows(max_version=1).shape == (12, 8) and a.rows().shape == (14, 8)
    assert a.stats()["counters"]["pull_calls"] == 0


def _echoing_prototypes(msg: Message) -> Message:
    """A node that sends the round's prototypes back as a record of its reply."""
    reply = honest()(msg)
    if RECORD in msg.content:
        reply.content[RECORD] = msg.content[RECORD]
    return reply


def _prototypes_as_weights(msg: Message) -> Message:
    """A node that slips the round's prototypes into its weights."""
    if RECORD not in msg.content:
        return honest()(msg)
    state = msg.content["arrays"].to_torch_state_dict()
    state[RECORD] = torch.from_numpy(msg.content[RECORD][RECORD].numpy())
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics())}),
                   reply_to=msg)


def test_the_round_driver_sends_one_set_of_prototypes_and_takes_none_back(tmp_path):
    cfg = FedConfig(min_nodes=1, rounds=3, wait_nodes_timeout=0.3, eval_every=0, prototypes=2)
    grid = FakeGrid({1: honest(), 2: honest(), 3: _echoing_prototypes, 4: _prototypes_as_weights})
    driver, _, _ = make_driver(tmp_path, grid, cfg=cfg)
    sent = ArrayRecord({"w": torch.zeros(4)})
    first = driver.run_round(1, sent)  # an empty queue: no prototypes, every reply fits
    assert first.row["prototypes"] == 0 and first.row["replied"] == 4
    assert all(RECORD not in m.content for m in grid.sent[-1])
    rows, _ = _directions(2, 3)
    driver.queue.push(0, rows[:, :4].contiguous() / rows[:, :4].norm(dim=1, keepdim=True), 1)
    second = driver.run_round(2, first.arrays)
    messages = grid.sent[-1]
    received = [m.content[RECORD][RECORD].numpy() for m in messages]
    assert received[0].shape == (2, 4) and all((r == received[0]).all() for r in received)
    assert second.row["prototypes"] == 2 and second.row["replied"] == 2
    assert second.row[dropped_column("records")] == 1 and second.row[dropped_column("array-keys")] == 1
    assert list(second.arrays.keys()) == ["w"]


CFG = FedConfig(width=8, embedding_dim=16, batch_size=32, global_negatives=0, push_fraction=0.5,
                device="cpu", seed=3, key_mode="ema", prototypes=3)


def test_the_client_trains_with_the_prototypes_and_sends_back_its_weights_alone(
        images, tmp_path, monkeypatch):
    path, _ = images
    monkeypatch.setattr(round_module, "push_keys", lambda *args: None)
    prototypes = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    losses = {}
    for name, cfg in (("with", CFG), ("weight 0", replace(CFG, prototype_weight=0.0))):
        msg = train_message(f"127.0.0.1:{free_port()}")
        msg.content[RECORD] = ArrayRecord({RECORD: prototypes})
        reply = client_app.train(msg, context(node_config(path, tmp_path / name), cfg))
        assert check_reply(reply, msg.content["arrays"]) is None  # the weights, nothing else
        losses[name] = reply.content["metrics"]["train-loss"]
    assert losses["with"] > losses["weight 0"]  # the term is a cross-entropy over 3 prototypes
    msg = train_message(f"127.0.0.1:{free_port()}")
    msg.content[RECORD] = ArrayRecord({RECORD: prototypes[:2]})
    reply = client_app.train(msg, context(node_config(path, tmp_path / "bad"), CFG))
    assert reply.has_error() and "(3, 16)" in reply.error.reason
    with pytest.raises(ValueError, match="unit norm"):
        checked_prototypes({RECORD: 2 * prototypes}, 3, 16)


def _trainer(cfg: FedConfig, prototypes: torch.Tensor | None) -> ContrastiveTrainer:
    torch.manual_seed(0)
    model = build_encoder(cfg.encoder, in_channels=1, embedding_dim=cfg.embedding_dim,
                          norm=cfg.norm, width=cfg.width)
    return ContrastiveTrainer(model, cfg, device=CPU, generator=torch.Generator().manual_seed(0),
                              prototypes=prototypes)


def test_the_trainer_adds_the_weighted_term_of_both_view_orders():
    cfg = FedConfig(width=8, embedding_dim=16, batch_size=6, prototypes=4, prototype_weight=2.0)
    prototypes = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    plain, weighted = _trainer(cfg, None), _trainer(cfg, prototypes)
    v1, v2 = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        q1, q2 = plain.model(v1), plain.model(v2)  # the shared key: the other view's query
        term = 0.5 * (prototype_loss(q1, q2, prototypes, cfg.temperature)
                      + prototype_loss(q2, q1, prototypes, cfg.temperature))
        torch.testing.assert_close(weighted.view_loss(v1, v2, None)[0],
                                   plain.view_loss(v1, v2, None)[0] + 2.0 * term)


def test_settings_and_method():
    with pytest.raises(ValueError, match="--prototypes must be zero"):
        FedConfig(prototypes=-1)
    with pytest.raises(ValueError, match="--prototype-weight"):
        FedConfig(prototype_weight=-0.5)
    with pytest.raises(ValueError, match="--prototypes .* --push-fraction 0"):
        FedConfig(prototypes=4, push_fraction=0.0)
    with pytest.raises(ValueError, match="--prototypes > --queue-capacity"):
        FedConfig(prototypes=65, queue_capacity=64)
    with pytest.raises(ValueError, match="--prototypes with --objective byol"):
        FedConfig(prototypes=4, objective="byol", global_negatives=0, push_fraction=0.0, queue_size=0)
    private = {"dp": True, "in_batch": False, "queue_size": 0, "key_mode": "ema", "noise_multiplier": 1.0}
    with pytest.raises(ValueError, match="--prototypes with --dp true and --push-noise 0"):
        FedConfig(prototypes=4, **private)
    FedConfig(prototypes=4, push_noise=1.0, **private)  # the rows noised: post-processing
    assert (FedConfig().prototypes, FedConfig().prototype_weight) == (0, 1.0)
    assert method_config("fedcontrast-proto", FedConfig()).prototypes == 64
    assert method_config("fedcontrast-proto", FedConfig(prototypes=8)).prototypes == 8
    assert method_config("fedavg", FedConfig(prototypes=8)).prototypes == 0
    assert method_config("fedcontrast", FedConfig()).prototypes == 0


def test_compare_counts_the_prototypes_a_client_receives(tmp_path):
    from common.checkpoint import save_encoder
    from common.runtime.rundir import RunDir

    cfg = FedConfig(width=8, embedding_dim=16)
    model = build_encoder("cnn", in_channels=1, embedding_dim=16, width=8)
    save_encoder(model, {}, tmp_path / "encoder.pt", round=2)
    run = RunDir(tmp_path)
    run.append_metrics({"round": 1, "replied": 3, "pushed_rows": 30, "prototypes": 0})
    run.append_metrics({"round": 2, "replied": 3, "pushed_rows": 30, "prototypes": 8})
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # per reply: 10 rows pushed and, over the two rounds, 4 prototypes received, 16 floats each
    assert sent_megabytes(tmp_path, cfg) == pytest.approx((weights + 4 * 16 * (10 + 4)) / 1e6)


@pytest.mark.timeout(300)
def test_a_federation_in_one_process_sends_the_queue_prototypes_from_round_2(monkeypatch):
    import simulations.in_process as in_process
    from client.round import train_round
    from simulations.in_process import run_federation

    received = []  # the prototypes each client trained with, per round

    def recording(*args, **kwargs):
        received.append(kwargs["prototypes"])
        return train_round(*args, **kwargs)

    monkeypatch.setattr(in_process, "train_round", recording)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(40, 1, 8, 8, generator=g) for _ in range(2)]
    cfg = replace(CFG, rounds=2, local_epochs=1, batch_size=16, global_negatives=16,
                  push_fraction=0.25, queue_capacity=64, prototypes=4)
    _, records = run_federation(cfg, xs, 1)
    assert records[0].pushed_rows >= 4
    assert received[0] is None and received[1] is None  # round 1: an empty queue
    assert received[2].shape == (4, 16) and torch.equal(received[2], received[3])  # one set per round
