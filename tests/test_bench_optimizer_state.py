"""The optimiser-state benchmark compares what it says: each method both ways, paired by seed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.optimizer_state_bench import STATES, paired, spread
from common.config import FedConfig
from simulations.methods import method_config


@pytest.mark.parametrize("method", ["fedavg", "fedmoco", "fedcontrast"])
def test_every_federated_method_runs_with_the_state_setting_it_is_given(method):
    configs = {s: method_config(method, replace(FedConfig(), optimizer_state=s)) for s in STATES}
    assert {s: c.optimizer_state for s, c in configs.items()} == {s: s for s in STATES}
    # nothing else differs between the two arms
    assert replace(configs["reset"], optimizer_state="federated") == configs["federated"]


def test_differences_are_paired_by_seed():
    federated = [{"knn_backbone": 0.40}, {"knn_backbone": 0.30}]
    reset = [{"knn_backbone": 0.35}, {"knn_backbone": 0.32}]
    assert paired(federated, reset, "knn_backbone") == [0.05, -0.02]
    with pytest.raises(ValueError):  # a seed missing from one arm is an error, not a shorter list
        paired(federated, reset[:1], "knn_backbone")
    assert spread([0.30, 0.40]) == "0.3500 ± 0.0500"
