"""The local trainer: learning on held-out digits, key modes, negative sources."""

import copy

import pytest
import torch

from client.negatives import LocalQueue
from client.trainer import ContrastiveTrainer, cosine_lr
from common.config import FedConfig, TrainConfig
from common.datasets import load_dataset
from common.encoders import build_encoder
from common.evaluation import evaluate_encoder
from common.plugins import make_views

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_encoder(cfg.encoder, in_channels=1, embedding_dim=cfg.embedding_dim,
                         norm=cfg.norm, width=cfg.width)


def _params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.timeout(240)
def test_training_beats_random_init_on_held_out_retrieval_and_uniformity(digits):
    # Retrieval of an image's second view among 256 candidates is what InfoNCE trains
    # for; after a few epochs it must clearly beat the same encoder at random init.
    cfg = TrainConfig(epochs=10)
    model = _model(cfg)
    init = copy.deepcopy(model)
    trainer = ContrastiveTrainer(model, cfg, device=CPU,
                                 lr_schedule=cosine_lr(cfg.lr, cfg.epochs * 12))
    for _ in range(cfg.epochs):
        trainer.train_epoch(digits.x_train)
    kw = dict(device=CPU, views=make_views(cfg), seed=0, layers=("head",))
    trained, random_init = evaluate_encoder(model, digits, **kw), evaluate_encoder(init, digits, **kw)
    assert trained["retrieval_head"] > random_init["retrieval_head"] + 0.08
    assert trained["uniformity_head"] < random_init["uniformity_head"] - 0.5


def test_loss_falls_on_a_fixed_batch(digits):
    cfg = TrainConfig(batch_size=64, width=8)
    trainer = ContrastiveTrainer(_model(cfg), cfg, device=CPU)
    x = digits.x_train[:64]
    first = trainer.train_step(x)[0]
    for _ in range(15):
        last = trainer.train_step(x)[0]
    assert last < first


def test_frozen_key_encoder_never_changes_and_ema_moves_towards_query(digits):
    x = digits.x_train[:32]
    frozen = TrainConfig(key_mode="frozen", in_batch=True, width=8)
    t = ContrastiveTrainer(_model(frozen), frozen, device=CPU)
    before = copy.deepcopy(t.key_model)
    t.train_step(x)
    assert _params_equal(t.key_model, before)
    assert not any(p.requires_grad for p in t.key_model.parameters())

    ema = TrainConfig(key_mode="ema", key_momentum=0.5, width=8)
    t = ContrastiveTrainer(_model(ema), ema, device=CPU)
    key_before = copy.deepcopy(t.key_model)
    t.train_step(x)
    # k' = m k + (1 - m) q, checked on one parameter
    pk0 = next(key_before.parameters())
    pq1, pk1 = next(t.model.parameters()), next(t.key_model.parameters())
    torch.testing.assert_close(pk1, 0.5 * pk0 + 0.5 * pq1)


def test_sources_are_consulted_and_see_the_keys(digits):
    cfg = TrainConfig(key_mode="ema", in_batch=False, queue_size=100, width=8)
    queue = LocalQueue(100, cfg.embedding_dim)
    t = ContrastiveTrainer(_model(cfg), cfg, device=CPU, sources=[queue])
    _, k, had = t.train_step(digits.x_train[:20])
    # first step: the queue is empty, random unit vectors stand in (as many as a full
    # batch, whatever this batch holds), nothing from sources
    assert not had and k == cfg.batch_size and len(queue) == 20
    _, k, had = t.train_step(digits.x_train[20:50])
    assert had and k == 20 and len(queue) == 50


def test_epoch_counts_examples_and_steps(digits):
    cfg = TrainConfig(batch_size=100, width=8)
    stats = ContrastiveTrainer(_model(cfg), cfg, device=CPU).train_epoch(digits.x_train[:301])
    # 301 = 3 full batches + 1 leftover example, which cannot be contrasted and is dropped
    assert (stats.steps, stats.examples) == (3, 300)


def test_random_stand_in_negatives_do_not_depend_on_the_batch(digits):
    # Under DP the batch is a Poisson draw: one example's loss must not change with how many
    # others were drawn, so the stand-ins for an empty queue are as many as the config says.
    cfg = FedConfig(in_batch=False, global_negatives=24, width=8, batch_size=16)
    t = ContrastiveTrainer(_model(cfg), cfg, device=CPU)  # no sources: every step falls back
    seen = []
    loss_on = t.loss_on

    def recording(x, negatives):
        seen.append(negatives.shape[0])
        return loss_on(x, negatives)

    t.loss_on = recording
    for n in (3, 9, 16):
        t.train_step(digits.x_train[:n])
    assert seen == [24, 24, 24]
