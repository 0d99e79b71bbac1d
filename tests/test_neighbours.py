"""Neighbourhood matching: pulled queue rows as nearest-neighbour positives (Wu et al. 2022,
arXiv 2111.10763; NNCLR, Dwibedi et al. 2021). A hand-computed value, the false-negative
selection, no gradient into the rows, and a trainer that is unchanged at weight 0 or
without pulled rows."""

from __future__ import annotations

import math

import pytest
import torch

from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.encoders import build_encoder
from common.loss import NegativeOptions, info_nce, neighbour_info_nce
from simulations.methods import method_config

CPU = torch.device("cpu")
D = torch.float64
# Two queries, their keys (the other view) and three rows, all 2-D unit vectors.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
K = torch.tensor([[0.8, 0.6], [0.6, -0.8]], dtype=D)
ROWS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], dtype=D)


def test_nearest_row_of_the_key_is_the_positive_by_hand():
    # k1.rows = (0.8, 0.96, -0.6): row 2 is k1's neighbour; q1.rows = (1, 0.6, 0).
    # k2.rows = (0.6, -0.28, 0.8): row 3 is k2's neighbour; q2.rows = (0, 0.8, -1).
    # The neighbour's logit at T = 0.5, the other rows' at T_q = 1.
    loss = neighbour_info_nce(Q, K, ROWS, 0.5, queue_temperature=1.0)
    expected = [math.log(math.exp(1.2) + math.exp(1.0) + math.exp(0.0)) - 1.2,
                math.log(math.exp(-2.0) + math.exp(0.0) + math.exp(0.8)) + 2.0]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))
    # In-batch negatives as info_nce has them: q1.k2 = 0.6, q1.q2 = 0; q2.k1 = 0.6, q2.q1 = 0.
    loss = neighbour_info_nce(Q, K, ROWS, 0.5, True, queue_temperature=1.0)
    expected = [math.log(math.exp(1.2) + math.exp(1.0) + 1 + math.exp(1.2) + 1) - 1.2,
                math.log(math.exp(-2.0) + 1 + math.exp(0.8) + math.exp(1.2) + 1) + 2.0]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))


def test_false_negative_suspects_are_the_neighbours():
    # Above cosine 0.7 with the key: rows 1 and 2 for k1 (SupCon's mean of their logits),
    # row 3 for k2; logits at T = T_q = 0.5.
    options = NegativeOptions(false_negative_mode="drop", false_negative_threshold=0.7)
    loss = neighbour_info_nce(Q, K, ROWS, 0.5, options=options)
    expected = [math.log(math.exp(2.0) + math.exp(1.2) + 1) - (2.0 + 1.2) / 2,
                math.log(math.exp(-2.0) + 1 + math.exp(1.6)) + 2.0]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))
    # A key without a suspect gives its query no term.
    options = NegativeOptions(false_negative_mode="drop", false_negative_threshold=0.9)
    loss = neighbour_info_nce(Q, K, ROWS, 0.5, options=options)
    assert loss[1] == 0 and loss[0] > 0


def test_gradient_reaches_the_query_never_the_rows_or_the_key():
    q, k, rows = (t.clone().requires_grad_(True) for t in (Q, K, ROWS))
    neighbour_info_nce(q, k, rows, 0.5).sum().backward()
    assert rows.grad is None and k.grad is None  # rows detached; the key only picks
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="queue rows"):
        neighbour_info_nce(Q, K, ROWS[:0], 0.5)


class FixedRows:
    """A source that serves the same rows every step."""

    def __init__(self, rows):
        self.rows = rows

    def negatives(self, step, device):
        return self.rows

    def observe(self, keys):
        pass


def _trainer(cfg, sources=()):
    torch.manual_seed(0)
    model = build_encoder(cfg.encoder, in_channels=1, embedding_dim=cfg.embedding_dim,
                          norm=cfg.norm, width=cfg.width)
    return ContrastiveTrainer(model, cfg, device=CPU, sources=sources,
                              generator=torch.Generator().manual_seed(0))


def test_trainer_adds_the_term_only_with_a_weight_and_pulled_rows():
    x = torch.rand(6, 1, 8, 8)
    base = FedConfig(width=8, embedding_dim=16, batch_size=6)
    rows = torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    # Without pulled rows the weight changes nothing, bit for bit (random stand-ins too).
    for in_batch in (True, False):
        cfg = FedConfig(**{**vars(base), "in_batch": in_batch})
        plain, weighted = _trainer(cfg), _trainer(FedConfig(**{**vars(cfg), "neighbour_weight": 2.0}))
        assert plain.train_step(x)[0] == weighted.train_step(x)[0]
        assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(),
                                                     weighted.model.parameters(), strict=True))
    # With rows: weight 0 is the plain symmetric InfoNCE; weight w adds w x the term.
    plain = _trainer(base, [FixedRows(rows)])
    weighted = _trainer(FedConfig(**{**vars(base), "neighbour_weight": 2.0}), [FixedRows(rows)])
    v1, v2 = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    plain.rows_pulled = weighted.rows_pulled = True
    with torch.no_grad():
        q1, q2 = plain.model(v1), plain.model(v2)
        kw = {"in_batch": True, "queue_temperature": base.queue_temperature}
        t = base.temperature
        expected = 0.5 * (info_nce(q1, q2, rows, t, **kw) + info_nce(q2, q1, rows, t, **kw))
        assert torch.equal(plain.view_loss(v1, v2, rows)[0], expected)
        term = 0.5 * (neighbour_info_nce(q1, q2, rows, t, **kw) + neighbour_info_nce(q2, q1, rows, t, **kw))
        torch.testing.assert_close(weighted.view_loss(v1, v2, rows)[0], expected + 2.0 * term)


def test_setting_and_method():
    with pytest.raises(ValueError, match="--neighbour-weight"):
        FedConfig(neighbour_weight=-1.0)
    with pytest.raises(ValueError, match="--neighbour-weight .* --global-negatives is 0"):
        FedConfig(neighbour_weight=1.0, global_negatives=0)
    base = FedConfig()
    assert method_config("fedcontrast-nn", base).neighbour_weight == 1.0
    assert method_config("fedcontrast-nn", FedConfig(neighbour_weight=0.5)).neighbour_weight == 0.5
    assert method_config("fedavg", FedConfig(neighbour_weight=0.5)).neighbour_weight == 0.0


def test_each_loss_depends_on_its_own_query_alone_without_in_batch():
    # What DP-SGD's per-example clipping needs (as info_nce without in-batch negatives).
    q = torch.nn.functional.normalize(torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(2)), dim=1)
    k = torch.nn.functional.normalize(torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(3)), dim=1)
    rows = torch.nn.functional.normalize(torch.randn(5, 3, dtype=D, generator=torch.Generator().manual_seed(4)), dim=1)
    jac = torch.autograd.functional.jacobian(lambda x: neighbour_info_nce(x, k, rows, 0.3), q)  # 4 x 4 x 3
    off = ~torch.eye(4, dtype=torch.bool)
    assert jac[off].abs().max() == 0 and jac[~off].abs().max() > 0
