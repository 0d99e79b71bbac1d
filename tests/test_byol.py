"""BYOL and the federated methods on it (FedBYOL, FedU, FedEMA): loss, merges, the round."""

from __future__ import annotations

import math

import pytest
import torch

from client.byol import BYOLTrainer
from client.byol_round import load_local, save_local, train_byol_round
from client.divergence import (
    LocalBYOL,
    autoscaled_lambda,
    divergence,
    ema_merge,
    fedema_mu,
    fedu_start,
    take_global,
)
from client.state import StateDir
from common.checkpoint import load_encoder, save_encoder
from common.config import FedConfig
from common.loss import byol_loss
from common.model import build_model, model_spec

BYOL = {"objective": "byol", "global_negatives": 0, "push_fraction": 0.0, "width": 4,
        "embedding_dim": 8, "batch_size": 16, "device": "cpu", "local_epochs": 1}


def byol_cfg(**overrides) -> FedConfig:
    return FedConfig(**{**BYOL, **overrides})


def test_byol_loss_is_two_minus_twice_the_cosine_per_example_and_stops_the_target_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = byol_loss(p, z)
    assert loss.tolist() == pytest.approx([0.0, 2.0 - math.sqrt(2.0)])  # cos 1; cos 1/sqrt(2)
    loss.sum().backward()
    assert z.grad is None and p.grad is not None
    with pytest.raises(ValueError, match="both be"):
        byol_loss(p, z[:1])


def state(**tensors: list) -> dict[str, torch.Tensor]:
    return {k.replace("__", "."): torch.tensor(v) for k, v in tensors.items()}


GLOBAL = state(backbone__w=[[0.0, 0.0], [0.0, 0.0]], backbone__b=[9.0, 9.0], head__w=[[0.0, 0.0]],
               predictor__w=[[1.0, 1.0]])
LOCAL = state(backbone__w=[[3.0, 4.0], [0.0, 0.0]], backbone__b=[0.0, 0.0], head__w=[[1.0, 0.0]],
              predictor__w=[[5.0, 5.0]])


def test_divergence_is_the_mean_l2_distance_of_the_encoders_weight_tensors():
    # backbone.w: 5, head.w: 1; biases (1-d) and the predictor are not counted
    assert divergence(GLOBAL, LOCAL) == pytest.approx(3.0)


def test_fedu_takes_the_global_predictor_only_below_the_threshold():
    below = fedu_start(GLOBAL, LOCAL, d=3.0, threshold=4.0)
    above = fedu_start(GLOBAL, LOCAL, d=3.0, threshold=2.0)
    for start in (below, above):  # the encoder is the global one either way
        assert start["backbone.w"].equal(GLOBAL["backbone.w"]) and start["head.w"].equal(GLOBAL["head.w"])
    assert below["predictor.w"].tolist() == [[1.0, 1.0]]
    assert above["predictor.w"].tolist() == [[5.0, 5.0]]


def test_fedema_mu_autoscaler_and_merge():
    assert fedema_mu(0.1, 3.0) == pytest.approx(0.3)
    assert fedema_mu(1.0, 3.0) == 1.0  # capped: the local model alone
    assert autoscaled_lambda(0.7, 3.5) == pytest.approx(0.2)
    assert autoscaled_lambda(0.7, 0.0) == 0.0
    merged = ema_merge(GLOBAL, LOCAL, 0.25)  # 0.25 local + 0.75 global
    assert merged["backbone.w"].tolist() == [[0.75, 1.0], [0.0, 0.0]]
    assert merged["predictor.w"].tolist() == [[2.0, 2.0]]
    counted = ema_merge({"n": torch.tensor(7)}, {"n": torch.tensor(1)}, 0.5)
    assert counted["n"].item() == 7  # integer buffers are the global ones


def test_fedema_autoscales_lambda_so_the_first_comparison_gives_mu_tau():
    local = LocalBYOL(1, LOCAL, {})
    start = take_global(byol_cfg(byol_update="fedema"), GLOBAL, local)
    assert (start.divergence, start.fedema_lambda, start.mu) == pytest.approx((3.0, 0.7 / 3.0, 0.7))
    assert start.online["predictor.w"][0].tolist() == pytest.approx([3.8, 3.8])  # 0.7 x 5 + 0.3 x 1
    kept = LocalBYOL(1, LOCAL, {}, fedema_lambda=0.1)  # a client keeps its lambda
    assert take_global(byol_cfg(byol_update="fedema"), GLOBAL, kept).mu == pytest.approx(0.3)
    first = take_global(byol_cfg(byol_update="fedema"), GLOBAL, None)  # no model of its own yet
    assert first.target is None and first.online["predictor.w"].equal(GLOBAL["predictor.w"])


def test_a_byol_model_keeps_the_default_backbone_and_adds_batch_normalised_heads():
    default = build_model(FedConfig(width=4, embedding_dim=8), 1).state_dict()
    byol = build_model(byol_cfg(), 1).state_dict()
    backbone = [k for k in default if k.startswith("backbone.")]
    assert backbone and all(torch.equal(default[k], byol[k]) for k in backbone)
    bn = ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    assert sorted(set(byol) - set(default)) == sorted(
        [f"head.net.1.{p}" for p in bn]
        + [f"predictor.net.{i}.{p}" for i in (0, 3) for p in ("bias", "weight")]
        + [f"predictor.net.1.{p}" for p in bn])


def test_a_checkpoint_with_a_predictor_loads_as_the_encoder(tmp_path):
    cfg = byol_cfg()
    model = build_model(cfg, 1)
    save_encoder(model, model_spec(cfg, 1), tmp_path / "encoder.pt")
    loaded = load_encoder(tmp_path / "encoder.pt")
    assert loaded.predictor is None and set(loaded.state_dict()) < set(model.state_dict())


def test_the_target_follows_the_online_encoder_by_an_ema_and_gets_no_gradient():
    cfg = byol_cfg(byol_tau=0.9)
    model = build_model(cfg, 1)
    target = build_model(FedConfig(width=4, embedding_dim=8), 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    trainer = BYOLTrainer(model, cfg, target=target, device=torch.device("cpu"))
    trainer.train_step(torch.rand(4, 1, 8, 8))
    online = model.state_dict()
    for name, xi in target.named_parameters():
        assert xi.grad is None
        assert torch.allclose(xi, 0.9 * before[name] + 0.1 * online[name])


def test_the_config_refuses_what_byol_has_no_use_for():
    with pytest.raises(ValueError, match="--global-negatives with --objective byol"):
        FedConfig(objective="byol")
    with pytest.raises(ValueError, match="--dp with --objective byol"):
        byol_cfg(dp=True, noise_multiplier=1.0, in_batch=False, key_mode="ema")
    with pytest.raises(ValueError, match="--fedema-autoscale"):
        byol_cfg(fedema_autoscale=0.0)


@pytest.mark.parametrize("update", ["fedbyol", "fedu", "fedema"])
def test_a_round_trains_from_the_kept_model_and_keeps_its_state_for_one_run(tmp_path, update):
    cfg = byol_cfg(byol_update=update)
    x = torch.rand(24, 1, 8, 8)
    received = build_model(cfg, 1).state_dict()
    weights, metrics, kept = train_byol_round(cfg, x, received, lr=1e-3, seed=0, run_id=5, local=None)
    assert list(weights) == list(received) and metrics["num-examples"] == 24
    assert metrics["pushed-rows"] == 0 and math.isfinite(metrics["train-loss"])
    state_dir = StateDir(tmp_path, "c0")
    save_local(state_dir, kept)
    assert load_local(state_dir, 6) is None  # another run starts afresh
    again = load_local(state_dir, 5)
    assert again is not None and all(torch.equal(again.online[k], kept.online[k]) for k in kept.online)
    _w, _m, second = train_byol_round(cfg, x, received, lr=1e-3, seed=1, run_id=5, local=again)
    assert (second.fedema_lambda > 0) == (update == "fedema")
    assert not all(torch.equal(second.target[k], kept.target[k]) for k in kept.target)  # target went on


def test_compare_runs_each_byol_method_as_its_byol_update_without_the_queue():
    from simulations.methods import method_config

    base = FedConfig(global_negatives=128, key_mode="ema", in_batch=False, push_fraction=0.3)
    for method in ("fedbyol", "fedu", "fedema"):
        cfg = method_config(method, base)
        assert (cfg.objective, cfg.byol_update, cfg.global_negatives, cfg.push_fraction) == (
            "byol", method, 0, 0.0)
