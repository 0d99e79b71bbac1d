"""The methods ``compare`` puts side by side, as settings derived from the FedContrast ones.

Kept free of heavy imports (Flower, Ray, rich), so that a script that runs a federation's
rounds in one process (``bench/gpu_bench.py``, on a machine with torch alone) shares them.
"""

from __future__ import annotations

from dataclasses import replace

from common.config import FedConfig
from common.errors import UsageError
from simulations.commands import METHODS

FEDERATED = ("fedavg", "fedmoco", "fedcontrast", "fedcontrast-key", "fedbyol", "fedu", "fedema")
#: The BYOL-based methods, each a value of --byol-update.
BYOL_METHODS = ("fedbyol", "fedu", "fedema")
#: SimCLR: InfoNCE with one network for both views, in-batch negatives, no queue (fedavg,
#: local and both centralized methods), whatever ``--objective`` the FedContrast runs use.
SIMCLR = {"global_negatives": 0, "push_fraction": 0.0, "in_batch": True, "key_mode": "shared",
          "queue_size": 0, "key_sync": "local", "objective": "infonce"}


def method_config(method: str, base: FedConfig) -> FedConfig:
    """The settings of ``method``, derived from the FedContrast settings ``base``."""
    if method == "fedcontrast":
        return base
    if method == "fedcontrast-key":  # MonAcoSFL's server-averaged momentum key encoder
        return replace(base, key_mode="ema", key_sync="server")
    if method == "fedmoco":
        return replace(base, pull_scope="own")
    if method in ("fedavg", "local", "centralized", "centralized-skewed"):
        return replace(base, **SIMCLR)
    if method in BYOL_METHODS:  # SIMCLR's settings turn the queue off, as BYOL needs
        return replace(base, **{**SIMCLR, "objective": "byol", "byol_update": method})
    raise UsageError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
