"""The local optimiser's state as arrays (common/optim_state.py): what travels with the
weights under --optimizer-state federated must continue an optimiser exactly."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord

from client.privacy import DPSGD
from client.trainer import ContrastiveTrainer, make_optimizer
from common import optim_state
from common.config import FedConfig
from common.datasets import load_dataset
from common.encoders import build_encoder
from common.runtime.rundir import RunDir
from server.app import _Model, _resume
from server.queue import NegativeQueue
from server.sampling import NodeTokens

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
X = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _config(optimizer: str, momentum: float = 0.9) -> FedConfig:
    return FedConfig(optimizer=optimizer, momentum=momentum, lr=1e-2, width=8, embedding_dim=16,
                     batch_size=8, global_negatives=0, device="cpu", seed=1)


def _model(cfg: FedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("cnn", in_channels=1, embedding_dim=cfg.embedding_dim, width=cfg.width)


def _trainer(model, cfg, optimizer, seed: int, dp: DPSGD | None = None) -> ContrastiveTrainer:
    return ContrastiveTrainer(model, cfg, device=CPU, optimizer=optimizer,
                              generator=torch.Generator().manual_seed(seed), dp=dp)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((pa - pb).abs().max()) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_state_sent_through_an_array_record_continues_the_optimiser_exactly(optimizer):
    cfg = _config(optimizer)
    # One optimiser over two epochs, against one whose state went through an ArrayRecord
    # (the wire) into a new model and optimiser halfway, as between two rounds.
    whole = _model(cfg)
    whole_opt = make_optimizer(whole, cfg)
    first = _trainer(whole, cfg, whole_opt, seed=5)
    first.train_epoch(X)

    sent = ArrayRecord({**whole.state_dict(), **optim_state.export_arrays(whole, whole_opt, cfg)})
    weights, state = optim_state.split(sent.to_torch_state_dict())
    assert set(state) == set(optim_state.initial_arrays(whole, cfg)) and state
    resumed = _model(cfg)
    resumed.load_state_dict(weights)
    resumed_opt = make_optimizer(resumed, cfg)
    optim_state.load_arrays(resumed, resumed_opt, cfg, state)

    _trainer(whole, cfg, whole_opt, seed=9).train_epoch(X)
    _trainer(resumed, cfg, resumed_opt, seed=9).train_epoch(X)
    assert _max_diff(whole, resumed) == 0.0

    # A fresh optimiser in the second half takes other steps: the state matters.
    fresh = _model(cfg)
    fresh.load_state_dict(weights)
    _trainer(fresh, cfg, make_optimizer(fresh, cfg), seed=9).train_epoch(X)
    assert _max_diff(whole, fresh) > 1e-4


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_zero_state_is_a_fresh_optimiser(optimizer):
    cfg = _config(optimizer)
    a, b = _model(cfg), _model(cfg)
    opt_a = make_optimizer(a, cfg)
    optim_state.load_arrays(a, opt_a, cfg, optim_state.initial_arrays(a, cfg))
    _trainer(a, cfg, opt_a, seed=3).train_epoch(X)
    _trainer(b, cfg, make_optimizer(b, cfg), seed=3).train_epoch(X)
    assert _max_diff(a, b) == 0.0


def test_adam_state_counts_steps_and_sgd_without_momentum_has_none():
    cfg = _config("adam")
    model = _model(cfg)
    opt = make_optimizer(model, cfg)
    assert float(optim_state.export_arrays(model, opt, cfg)[optim_state.STEP_KEY]) == 0.0
    _trainer(model, cfg, opt, seed=3).train_epoch(X)  # 24 examples, batch 8: 3 steps
    state = optim_state.export_arrays(model, opt, cfg)
    assert float(state[optim_state.STEP_KEY]) == 3.0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {f"optimizer.{s}.{n}" for s in ("exp_avg", "exp_avg_sq") for n in names} | {
        optim_state.STEP_KEY} == set(state)
    assert all(float(state[f"optimizer.exp_avg_sq.{n}"].abs().sum()) > 0 for n in names)

    plain = _config("sgd", momentum=0.0)
    assert optim_state.initial_arrays(_model(plain), plain) == {}


def test_state_of_a_private_optimiser_is_the_state_of_the_optimiser_it_wraps():
    cfg = replace_dp(_config("adam"))
    model = _model(cfg)
    key = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, cfg)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=24, batch_size=8,
               generator=torch.Generator().manual_seed(2))
    trainer = ContrastiveTrainer(model, cfg, device=CPU, key_model=key, optimizer=opt, dp=dp,
                                 generator=torch.Generator().manual_seed(3))
    trainer.train_epoch(X)
    dp.detach()
    # Through Opacus's DPOptimizer or the optimiser it wraps: the same state.
    via_dp = optim_state.export_arrays(model, trainer.optimizer, cfg)
    via_inner = optim_state.export_arrays(model, opt, cfg)
    assert float(via_dp[optim_state.STEP_KEY]) == float(dp.steps_per_epoch)
    assert all(torch.equal(via_dp[k], via_inner[k]) for k in via_dp)


def replace_dp(cfg: FedConfig) -> FedConfig:
    # No in-batch negatives under DP: the trainer, with no source, draws random unit ones.
    return replace(cfg, dp=True, key_mode="frozen", in_batch=False, global_negatives=64,
                   noise_multiplier=1.0)


def test_state_for_another_optimiser_or_model_is_refused():
    adam, sgd = _config("adam"), _config("sgd")
    model = _model(adam)
    with pytest.raises(ValueError, match="another --optimizer"):
        optim_state.load_arrays(model, make_optimizer(model, adam), adam,
                                optim_state.initial_arrays(model, sgd))
    wrong = optim_state.initial_arrays(model, adam)
    name = next(k for k in wrong if k.startswith("optimizer.exp_avg."))
    wrong[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="has shape"):
        optim_state.load_arrays(model, make_optimizer(model, adam), adam, wrong)


def test_split_separates_weights_from_state():
    cfg = _config("adam")
    model = _model(cfg)
    weights, state = optim_state.split({**model.state_dict(), **optim_state.initial_arrays(model, cfg)})
    assert set(weights) == set(model.state_dict())
    assert state and all(k.startswith(optim_state.PREFIX) for k in state)


def test_a_negative_second_moment_is_clamped_rather_than_turned_into_nan():
    cfg = _config("adam")
    model = _model(cfg)
    state = optim_state.initial_arrays(model, cfg)
    for key in state:
        if key.startswith("optimizer.exp_avg_sq."):
            state[key] = -torch.ones_like(state[key])  # what an average with a bad sender may hold
    opt = make_optimizer(model, cfg)
    optim_state.load_arrays(model, opt, cfg, state)
    _trainer(model, cfg, opt, seed=3).train_epoch(X)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _server_model(tmp_path, name: str, **overrides):
    """The ServerApp's global model (server.app._Model) for a small digits encoder."""
    cfg = replace(_config(overrides.pop("optimizer", "adam")), **overrides)
    return _Model(cfg, load_dataset("digits", seed=0), RunDir(tmp_path / name))


@pytest.mark.parametrize("old", [dict(optimizer_state="reset"),  # no state (runs before 21af163)
                                 dict(optimizer="sgd", momentum=0.9)])  # another optimiser's state
def test_resume_without_matching_state_warns_and_starts_a_fresh_optimiser(tmp_path, caplog, old):
    before = _server_model(tmp_path, "old", **old)
    with torch.no_grad():
        next(before.module.head.parameters()).add_(1.0)  # weights to recognise after the resume
    before.save(before.arrays(), 3)
    after = _server_model(tmp_path, "new")
    fresh = optim_state.initial_arrays(after.module, after.cfg)
    with caplog.at_level("WARNING", logger="server.app"):
        last, _, _ = _resume(before.run_dir.path, after.run_dir, after, NegativeQueue(16, 16))
    assert last == 3
    assert "optimisers start afresh" in caplog.text
    assert set(after.optimizer_state) == set(fresh)
    assert all(torch.equal(after.optimizer_state[k], v) for k, v in fresh.items())
    assert torch.equal(next(after.module.head.parameters()), next(before.module.head.parameters()))


def test_resume_restores_the_optimiser_state_of_the_checkpoint(tmp_path, caplog):
    before = _server_model(tmp_path, "old")
    state = {k: torch.full_like(v, 0.5) for k, v in before.optimizer_state.items()}
    before.save(ArrayRecord({**before.module.state_dict(), **state}), 2)
    after = _server_model(tmp_path, "new")
    with caplog.at_level("WARNING", logger="server.app"):
        _resume(before.run_dir.path, after.run_dir, after, NegativeQueue(16, 16))
    assert "afresh" not in caplog.text
    assert set(after.optimizer_state) == set(state)
    assert all(torch.equal(after.optimizer_state[k], v) for k, v in state.items())


def test_a_resume_into_another_directory_started_twice_holds_the_rows_once(tmp_path):
    # Flower starts the ServerApp before Ray: a retried engine start resumes twice.
    before = _server_model(tmp_path, "old")
    for rnd in (1, 2):
        before.run_dir.append_metrics({"round": rnd, "counted": 1})
    before.save(before.arrays(), 2)
    after = _server_model(tmp_path, "new")
    for _ in range(2):
        last, _slot, _clients = _resume(before.run_dir.path, after.run_dir, after, NegativeQueue(16, 16))
    assert last == 2
    assert [r["round"] for r in after.run_dir.read_metrics()] == [1, 2]


@pytest.mark.parametrize("named", [False, True])
def test_resuming_a_queue_whose_rows_no_client_is_named_for_warns(tmp_path, caplog, named):
    before = _server_model(tmp_path, "old")
    if named:  # the driver's tokens: one identified client
        before.tokens = NodeTokens(lambda *_: None)
        before.tokens.token_for(7, "alice")
    before.save(before.arrays(), 1)
    queue = NegativeQueue(16, 16)
    queue.advance(1)
    queue.push(0, torch.nn.functional.normalize(torch.randn(4, 16), dim=1), version=1)
    queue.snapshot(before.run_dir.file("queue.pt"))
    after = _server_model(tmp_path, "new")
    with caplog.at_level("WARNING", logger="server.app"):
        _, next_slot, client_slots = _resume(before.run_dir.path, after.run_dir, after,
                                             NegativeQueue(16, 16))
    assert (client_slots, next_slot) == (({"alice": 0}, 1) if named else ({}, 0))
    assert ("the 4 restored queue rows are no node's own" in caplog.text) == (not named)
