"""The negatives ablation's combination rule: whatever options gain, it builds a valid config."""

from __future__ import annotations

import itertools

import pytest

from bench.negatives_ablation_bench import OPTIONS, best_combination
from common.config import FedConfig


@pytest.mark.parametrize("pair", list(itertools.combinations(OPTIONS, 2)))
def test_every_pair_of_gaining_options_combines_into_a_valid_config(pair):
    for gains in ({pair[0]: 0.02, pair[1]: 0.01}, {pair[0]: 0.01, pair[1]: 0.02}):
        settings = best_combination(gains)
        FedConfig(**settings)  # raises ValueError on an invalid combination
        larger = max(gains, key=gains.get)
        assert OPTIONS[larger][1].items() <= settings.items()  # the larger gain's option survives

