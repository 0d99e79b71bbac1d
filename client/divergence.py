"""How a BYOL client takes the global model into its own: FedBYOL, FedU, FedEMA.

A BYOL client keeps between the rounds it trains (in its state directory, see
:mod:`client.byol_round`) its online network after its last round W_k (backbone, head,
predictor) and its target encoder. A round brings the global online network W_g (the
server's FedAvg of what the clients sent: online encoder and predictor), and the client
starts its round from (``--byol-update``):

- ``fedbyol``: W_g, encoder and predictor: federated BYOL as the papers below use it
  as their baseline.
- ``fedu``: the global encoder; the global predictor only when the divergence
  d = ||W_g - W_k|| of the online encoders is below ``--fedu-threshold`` (0.4), its own
  predictor otherwise: the divergence-aware predictor update of Zhuang et al., ICCV 2021,
  "Collaborative Unsupervised Visual Representation Learning from Decentralized Data".
- ``fedema``: mu W_k + (1 - mu) W_g for encoder and predictor alike, with
  mu = min(lambda d, 1): Zhuang et al., ICLR 2022, "Divergence-aware Federated
  Self-Supervised Learning". lambda is ``--fedema-lambda``, or autoscaled per client
  as in the paper: tau / d at the first round the client has a model of its own to
  compare, so that round's mu is tau (``--fedema-autoscale``, 0.7).

A client's first round (no model of its own yet) starts from W_g with the target a copy
of its encoder. Afterwards the target is never sent nor replaced: it goes on as an EMA of
the client's online encoder (``--byol-tau``, per step).

The divergence is the mean over the online encoder's weight tensors (convolution and
linear weights, ndim >= 2) of their L2 distance, the normalisation of the authors' code
(EasyFL, ``applications/fedssl``), which keeps FedU's threshold meaningful across
encoders; FedEMA's autoscaler makes its scale irrelevant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from common.checkpoint import PREDICTOR_PREFIX
from common.config import FedConfig

#: State-dict keys of the online encoder: backbone and projection head.
ENCODER_PREFIXES = ("backbone.", "head.")

State = Mapping[str, Tensor]


def divergence(global_state: State, local_state: State) -> float:
    """d = mean over the online encoder's weight tensors w of ||w_g - w_k||_2."""
    keys = [k for k, w in global_state.items() if k.startswith(ENCODER_PREFIXES) and w.ndim >= 2]
    if not keys:
        raise ValueError("no weight tensor of an online encoder (backbone.*, head.*) to compare")
    return sum(float(torch.dist(global_state[k].float(), local_state[k].float())) for k in keys) / len(keys)


def fedu_start(global_state: State, local_state: State, d: float, threshold: float) -> dict[str, Tensor]:
    """FedU: the global encoder; the global predictor if ``d < threshold``, else the local one."""
    keep_local = d >= threshold
    return {k: (local_state[k] if keep_local and k.startswith(PREDICTOR_PREFIX) else w).clone()
            for k, w in global_state.items()}


def fedema_mu(lam: float, d: float) -> float:
    """FedEMA's weight on the local model, mu = min(lambda d, 1)."""
    return min(lam * d, 1.0)


def autoscaled_lambda(tau: float, d: float) -> float:
    """FedEMA's autoscaler, lambda = tau / d: the lambda at which this d gives mu = tau.
    0 (not scaled yet) when d is 0."""
    return tau / d if d > 0 else 0.0


def ema_merge(global_state: State, local_state: State, mu: float) -> dict[str, Tensor]:
    """FedEMA: mu W_k + (1 - mu) W_g for every floating-point tensor (integer buffers,
    such as BatchNorm's counter, are the global ones)."""
    return {k: (mu * local_state[k] + (1.0 - mu) * w) if w.is_floating_point() else w.clone()
            for k, w in global_state.items()}


@dataclass
class LocalBYOL:
    """What a BYOL client keeps between its rounds of one run.

    Attributes:
        run_id: the run it belongs to (a state of another run is another model).
        online: the online network after the client's last round (backbone, head, predictor).
        target: the target encoder (backbone, head).
        fedema_lambda: FedEMA's autoscaled lambda (0: not scaled yet).
    """

    run_id: int
    online: dict[str, Tensor]
    target: dict[str, Tensor]
    fedema_lambda: float = 0.0

    def payload(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "online": self.online, "target": self.target,
                "fedema_lambda": self.fedema_lambda}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> LocalBYOL:
        return cls(int(payload["run_id"]), dict(payload["online"]), dict(payload["target"]),
                   float(payload["fedema_lambda"]))


@dataclass
class Start:
    """Where a round starts: online weights, the target (None: a copy of the online
    encoder), and what decided it: divergence d, the weight on the local model (FedEMA's
    mu; FedU: 1 when the local predictor was kept, else 0) and FedEMA's lambda; NaN where
    there was nothing to compare."""

    online: dict[str, Tensor]
    target: dict[str, Tensor] | None
    divergence: float = math.nan
    mu: float = math.nan
    fedema_lambda: float = 0.0


def take_global(cfg: FedConfig, global_state: State, local: LocalBYOL | None) -> Start:
    """The round's start from the global weights and the client's own (``cfg.byol_update``)."""
    if local is None:
        return Start({k: w.clone() for k, w in global_state.items()}, None)
    d = divergence(global_state, local.online)
    if cfg.byol_update == "fedbyol":
        return Start({k: w.clone() for k, w in global_state.items()}, local.target, d)
    if cfg.byol_update == "fedu":
        return Start(fedu_start(global_state, local.online, d, cfg.fedu_threshold), local.target,
                     d, float(d >= cfg.fedu_threshold))
    lam = cfg.fedema_lambda or local.fedema_lambda or autoscaled_lambda(cfg.fedema_autoscale, d)
    mu = fedema_mu(lam, d)
    return Start(ema_merge(global_state, local.online, mu), local.target, d, mu, lam)
