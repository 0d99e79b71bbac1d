"""The run's encoder is built from its config in one place, the same in every process."""

from __future__ import annotations

import pytest
import torch

from common.config import FedConfig
from common.model import build_model, model_spec

CFG = FedConfig(width=4, embedding_dim=8)


def test_a_fresh_model_is_initialised_from_the_seed():
    first, second = build_model(CFG, 1), build_model(CFG, 1)
    other = build_model(FedConfig(width=4, embedding_dim=8, seed=1), 1)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())
    assert model_spec(CFG, 1) == {"encoder": "cnn", "in_channels": 1, "embedding_dim": 8,
                                  "norm": "group", "width": 4, "weight_standardization": True}


def test_received_weights_are_loaded_and_leave_the_global_generator_unseeded():
    weights = build_model(FedConfig(width=4, embedding_dim=8, seed=5), 1).state_dict()
    build_model(CFG, 1)
    after_a_seeded_build = torch.rand(1)
    torch.manual_seed(123)
    model = build_model(CFG, 1, weights)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not torch.equal(torch.rand(1), after_a_seeded_build)
    with pytest.raises(ValueError, match="do not fit this node's cnn encoder for 3-channel"):
        build_model(CFG, 3, weights)
