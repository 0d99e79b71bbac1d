"""The server-averaged momentum key encoder (--key-sync server, common/key_state.py): its
arithmetic, the arrays it adds to a round, their way through the reply check, the
aggregation, a resume and a federation in one process."""

# ruff: noqa: F811 (pytest fixtures imported from test_client_app are parameters here)
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from test_client_app import context, images, node_config, train_message  # noqa: F401 (fixture)
from test_strategy import FakeGrid, honest, make_driver, metrics
from torch import nn

from client import app as client_app
from client import round as round_module
from client.round import train_round
from common import key_state, optim_state
from common.config import FedConfig, validate
from common.datasets import load_dataset
from common.encoders import build_encoder
from common.runtime.flower_env import free_port
from common.runtime.rundir import RunDir
from server.app import _Model, _resume
from server.contract import check_reply
from server.queue import NegativeQueue
from server.rounds import dropped_column, in_sent_dtypes
from simulations.in_process import fedavg, run_federation

pytestmark = pytest.mark.usefixtures("flower_task_identity", "one_thread")

CFG = FedConfig(width=8, embedding_dim=16, batch_size=32, global_negatives=0, push_fraction=0.0,
                device="cpu", seed=3, key_mode="ema", key_sync="server")


def _bn(weight: float, bias: float, mean: float, var: float, tracked: int) -> nn.BatchNorm1d:
    """A BatchNorm of one feature: two parameters, two float buffers and an integer one."""
    bn = nn.BatchNorm1d(1)
    with torch.no_grad():
        bn.weight.fill_(weight)
        bn.bias.fill_(bias)
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
        bn.num_batches_tracked.fill_(tracked)
    return bn


def test_one_momentum_step_on_two_clients_then_their_average_by_hand():
    m = 0.9
    replies = []
    for query, examples in ((_bn(3.0, 1.0, 2.0, 3.0, 5), 10), (_bn(5.0, -1.0, 4.0, 1.0, 7), 30)):
        key = _bn(1.0, 0.0, 0.0, 1.0, 0)  # the key encoder both clients received
        key_state.momentum_step(key, query, m, buffers=True)
        replies.append((key_state.export_arrays(key), examples))
    # client 1: 0.9 * (1, 0, 0, 1) + 0.1 * (3, 1, 2, 3) = (1.2, 0.1, 0.2, 1.2), counter copied: 5
    # client 2: 0.9 * (1, 0, 0, 1) + 0.1 * (5, -1, 4, 1) = (1.4, -0.1, 0.4, 1.0), counter 7
    first = replies[0][0]
    assert [float(first[f"key.{k}"]) for k in ("weight", "bias", "running_mean", "running_var")] == \
        pytest.approx([1.2, 0.1, 0.2, 1.2])
    assert int(first["key.num_batches_tracked"]) == 5
    # weighted by examples 10 : 30, i.e. (a + 3 b) / 4
    expected = {"key.weight": 1.35, "key.bias": -0.05, "key.running_mean": 0.35,
                "key.running_var": 1.05}
    in_process = fedavg(replies)
    sent = ArrayRecord(key_state.export_arrays(_bn(1.0, 0.0, 0.0, 1.0, 0)))
    records = [RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})})
               for s, n in replies]
    server = in_sent_dtypes(aggregate_arrayrecords(records, "num-examples"), sent).to_torch_state_dict()
    for averaged in (in_process, server):
        for k, v in expected.items():
            assert float(averaged[k]) == pytest.approx(v), k
        assert averaged["key.num_batches_tracked"].dtype == torch.int64  # (5 + 21) / 4 = 6.5
        assert int(averaged["key.num_batches_tracked"]) == 6


def test_local_key_encoders_follow_parameters_only_as_before():
    key, query = _bn(1.0, 0.0, 0.0, 1.0, 0), _bn(3.0, 1.0, 2.0, 3.0, 5)
    key_state.momentum_step(key, query, 0.5, buffers=False)
    assert float(key.weight.detach()) == pytest.approx(2.0) and float(key.bias.detach()) == pytest.approx(0.5)
    assert (float(key.running_mean), float(key.running_var), int(key.num_batches_tracked)) == (0.0, 1.0, 0)


def test_with_the_setting_off_the_round_carries_the_same_arrays_as_before(images, tmp_path):
    path, _ = images
    off = replace(CFG, key_sync="local")
    assert FedConfig().key_sync == "local"
    model = build_encoder("cnn", in_channels=1, embedding_dim=off.embedding_dim, width=off.width)
    assert key_state.initial_arrays(model, off) == {}
    arrays = {**model.state_dict(), **optim_state.initial_arrays(model, off)}
    msg = train_message(f"127.0.0.1:{free_port()}", arrays=arrays)
    reply = client_app.train(msg, context(node_config(path, tmp_path), off))
    assert list(reply.content["arrays"].keys()) == list(arrays)  # no key.* array
    server = _Model(off, load_dataset("digits", seed=0), RunDir(tmp_path / "run"))
    assert not any(k.startswith(key_state.PREFIX) for k in server.arrays().keys())


@pytest.mark.parametrize("mode", ["shared", "frozen"])
def test_server_key_sync_needs_a_momentum_key_encoder(mode):
    with pytest.raises(ValueError, match="--key-sync"):
        validate(replace(CFG, key_mode=mode))
    with pytest.raises(ValueError, match="--key-sync"):
        validate(replace(CFG, objective="byol", global_negatives=0, push_fraction=0.0))
    validate(CFG)


def _server_arrays(cfg: FedConfig) -> dict[str, torch.Tensor]:
    model = build_encoder("cnn", in_channels=1, embedding_dim=cfg.embedding_dim, width=cfg.width)
    key = {k: v + 0.01 for k, v in key_state.initial_arrays(model, cfg).items()}  # not the weights
    return {**model.state_dict(), **optim_state.initial_arrays(model, cfg), **key}


def test_the_client_trains_from_the_key_it_receives_pushes_its_rows_and_sends_it_back(
        images, tmp_path, monkeypatch):
    path, _ = images
    arrays = _server_arrays(CFG)
    pushed_by = []
    monkeypatch.setattr(round_module, "push_keys",
                        lambda _client, model, *args: pushed_by.append(model.state_dict()))
    cfg = replace(CFG, push_fraction=0.5)
    msg = train_message(f"127.0.0.1:{free_port()}", arrays=arrays)
    reply = client_app.train(msg, context(node_config(path, tmp_path), cfg))
    assert check_reply(reply, msg.content["arrays"]) is None  # same keys, order and shapes
    back = reply.content["arrays"].to_torch_state_dict()
    _, sent_key = key_state.split(arrays)
    _, key = key_state.split(back)
    weights = optim_state.split(key_state.split(back)[0])[0]
    moved = [k for k in sent_key if sent_key[k].is_floating_point()
             and not torch.equal(sent_key[k], key[k])]
    assert moved  # the key moved by momentum towards the trained weights ...
    k = moved[0]
    assert (key[k] - sent_key[k]).abs().max() < (weights[k] - sent_key[k]).abs().max()  # ... slowly
    (pusher,) = pushed_by  # rows of the key encoder as received, the same for every node
    assert all(torch.equal(pusher[k], sent_key[k]) for k in sent_key)

    # With momentum 1 the key stays where the server put it: it starts from the key arrays.
    still = client_app.train(msg, context(node_config(path, tmp_path / "b"), replace(CFG, key_momentum=1.0)))
    _, unchanged = key_state.split(still.content["arrays"].to_torch_state_dict())
    assert all(torch.equal(unchanged[k], sent_key[k]) for k in sent_key)


def _without_key(msg: Message) -> Message:
    state = {k: v for k, v in msg.content["arrays"].to_torch_state_dict().items()
             if not k.startswith(key_state.PREFIX)}
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics())}),
                   reply_to=msg)


def _bad_key_shape(msg: Message) -> Message:
    state = msg.content["arrays"].to_torch_state_dict()
    state["key.w"] = torch.zeros(5)
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics())}),
                   reply_to=msg)


def test_key_arrays_are_checked_and_averaged_by_the_round_driver(tmp_path):
    sent = ArrayRecord({"w": torch.zeros(4), "optimizer.w": torch.zeros(4), "key.w": torch.ones(4)})
    grid = FakeGrid({1: honest(1.0, **{"num-examples": 10}), 2: honest(3.0, **{"num-examples": 30}),
                     3: _without_key, 4: _bad_key_shape})
    driver, _, _ = make_driver(tmp_path, grid)
    result = driver.run_round(1, sent)
    assert result.counted and result.row["dropped"] == 2
    assert result.row[dropped_column("array-keys")] == 1
    assert result.row[dropped_column("array-shape")] == 1
    assert list(result.arrays.keys()) == ["w", "optimizer.w", "key.w"]
    assert torch.allclose(torch.from_numpy(result.arrays["key.w"].numpy()), torch.full((4,), 1.0 + 2.5))  # 1 + (10 + 90) / 40


def _server_model(tmp_path, name: str, cfg: FedConfig) -> _Model:
    return _Model(cfg, load_dataset("digits", seed=0), RunDir(tmp_path / name))


def test_a_resume_keeps_the_server_averaged_key_or_restarts_it_from_the_weights(tmp_path, caplog):
    before = _server_model(tmp_path, "server", CFG)
    assert set(before.key_state) == {key_state.PREFIX + k for k in before.module.state_dict()}
    trained = {k: v + 0.5 if v.is_floating_point() else v for k, v in before.key_state.items()}
    before.save(ArrayRecord({**before.module.state_dict(), **before.optimizer_state, **trained}), 2)
    after = _server_model(tmp_path, "again", CFG)
    with caplog.at_level("WARNING", logger="server.app"):
        _resume(before.run_dir.path, after.run_dir, after, NegativeQueue(16, 16))
    assert "key encoder restarts" not in caplog.text
    assert all(torch.equal(after.key_state[k], v) for k, v in trained.items())
    assert list(after.arrays().keys())[-len(trained):] == list(trained)

    local = _server_model(tmp_path, "local", replace(CFG, key_sync="local"))
    with torch.no_grad():
        next(local.module.head.parameters()).add_(1.0)
    local.save(local.arrays(), 3)
    resumed = _server_model(tmp_path, "from-local", CFG)
    with caplog.at_level("WARNING", logger="server.app"):
        _resume(local.run_dir.path, resumed.run_dir, resumed, NegativeQueue(16, 16))
    assert "key encoder restarts as a copy of its weights" in caplog.text
    weights = resumed.module.state_dict()
    assert all(torch.equal(resumed.key_state[key_state.PREFIX + k], v) for k, v in weights.items())


@pytest.mark.timeout(300)
def test_a_federation_in_one_process_runs_with_the_server_averaged_key(monkeypatch):
    import simulations.in_process as in_process

    calls = []  # (key arrays received, key arrays sent back, examples), per client and round

    def recording(*args, **kwargs):
        new, metrics = train_round(*args, **kwargs)
        calls.append((kwargs["key_arrays"], key_state.split(new)[1], int(metrics["num-examples"])))
        return new, metrics

    monkeypatch.setattr(in_process, "train_round", recording)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(40, 1, 8, 8, generator=g) for _ in range(2)]
    cfg = replace(CFG, rounds=2, local_epochs=1, batch_size=16, global_negatives=16,
                  push_fraction=0.25, queue_capacity=64)
    seen = []
    model, records = run_federation(cfg, xs, 1, on_round=lambda _r, m: seen.append(m.state_dict()) and False)
    assert [r.round for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in records)
    assert records[0].pushed_rows > 0
    assert set(model.state_dict()) == set(seen[-1])  # the global model holds no key.* array
    (got_a, sent_a, n_a), (got_b, sent_b, n_b), (round2, _, _), (round2_b, _, _) = calls
    assert set(got_a) == set(sent_a) and got_a.keys() == got_b.keys()
    for name, value in round2.items():  # round 2 starts from round 1's averaged key encoder
        if value.is_floating_point():
            expected = (sent_a[name] * n_a + sent_b[name] * n_b) / (n_a + n_b)
            torch.testing.assert_close(value, expected.to(value.dtype))
            assert not torch.equal(value, got_a[name]) or torch.equal(sent_a[name], got_a[name])
        assert torch.equal(round2_b[name], value)


@pytest.mark.parametrize("method", ["fedavg", "local", "centralized", "fedbyol"])
def test_methods_without_a_momentum_key_turn_the_server_key_off(method):
    from simulations.methods import method_config

    base = FedConfig(key_mode="ema", key_sync="server")
    assert method_config(method, base).key_sync == "local"
    validate(method_config(method, base))
