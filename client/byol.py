"""The local BYOL trainer: pure PyTorch, no Flower, no gRPC.

BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS). The online network is the model's backbone f, projection g and
predictor q (:meth:`common.encoders.ContrastiveModel.predict`); the target network is a
copy of f and g whose weights follow the online ones by an EMA after every step,
``xi <- tau xi + (1 - tau) theta`` (``--byol-tau``). One step on two views v1, v2::

    loss_i = byol_loss(q(g(f(v1_i))), g'(f'(v2_i))) + byol_loss(q(g(f(v2_i))), g'(f'(v1_i)))

the paper's symmetrised total (eq. 2 and its swap), per example: no negatives, so example
i's loss depends on example i alone. The federated methods built on it (FedBYOL, FedU,
FedEMA) differ only in how a round starts (:mod:`client.divergence`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.encoders import ContrastiveModel
from common.loss import byol_loss


class BYOLTrainer(ContrastiveTrainer):
    """Train ``model`` (with a predictor) by BYOL against ``target``.

    Args:
        model: the online network: backbone, head and ``predictor``.
        cfg: batch size, optimiser, views, ``byol_tau``.
        target: the target network (backbone and head, no predictor), updated in place
            by the EMA after every step and never by gradients.
        device, lr_schedule, generator, optimizer: as :class:`ContrastiveTrainer`'s.

    Raises:
        ValueError: ``model`` has no predictor.
    """

    def __init__(
        self,
        model: ContrastiveModel,
        cfg: FedConfig,
        *,
        target: ContrastiveModel,
        device: torch.device,
        lr_schedule: Callable[[int], float] | None = None,
        generator: torch.Generator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if model.predictor is None:
            raise ValueError("BYOL needs a model with a predictor: build it with --objective byol")
        super().__init__(model, cfg, device=device, key_model=target, lr_schedule=lr_schedule,
                         generator=generator, optimizer=optimizer)
        # The target is BYOL's own whatever --key-mode says; left in train mode, so that a
        # BatchNorm in it normalises by the batch as the online network's does.
        self.key_model = target.to(device).requires_grad_(False).train()
        self.tau = cfg.byol_tau

    def _negatives(self, batch_size: int) -> tuple[Tensor | None, bool]:
        """None: BYOL contrasts nothing (and draws no random rows)."""
        return None, False

    def view_loss(self, v1: Tensor, v2: Tensor, negatives: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-example BYOL loss of two views (N, C, ...); returns (loss (N,), target
        projections of v2 (N, D)). ``negatives`` are ignored (always None here)."""
        p1, p2 = self.model.predict(v1), self.model.predict(v2)  # N x D online predictions
        with torch.no_grad():
            z1, z2 = self.key_model(v1), self.key_model(v2)  # N x D target projections
        return byol_loss(p1, z2) + byol_loss(p2, z1), z2

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """xi <- tau xi + (1 - tau) theta over the target's parameters (backbone and head)."""
        online = dict(self.model.named_parameters())
        for name, xi in self.key_model.named_parameters():
            xi.mul_(self.tau).add_(online[name].detach(), alpha=1.0 - self.tau)
