"""The local optimiser's state as arrays that travel with the weights.

Flower's ClientApp builds a new optimiser for every round. Adam restarted from
zero moments takes steps of about ``lr`` per parameter, whatever the gradient's
scale. With a dozen steps per node and round, a federation that resets Adam every
round never leaves that phase: the centralized run keeps one optimiser over the same
number of steps and does not pay it.

With ``--optimizer-state federated`` (the default) the optimiser's state rides in
the same ``ArrayRecord`` as the weights, under keys that start with :data:`PREFIX`:

- ``adam``: ``optimizer.exp_avg.<param>``, ``optimizer.exp_avg_sq.<param>`` (shapes of
  the parameter) and ``optimizer.step`` (shape ``(1,)``);
- ``sgd`` with momentum: ``optimizer.momentum_buffer.<param>``;
- ``sgd`` without momentum: nothing (it has no state).

The server aggregates them exactly as it aggregates the weights (FedAvg: the mean
weighted by examples), and every node starts its round from that state. The server's
first state is all zeros, which is a fresh optimiser step for step (Adam's bias
correction counts from ``step``; SGD's first buffer is the first gradient either way).
Under DP-SGD the state is computed from the clipped, noised gradients, so sending it
is post-processing and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from common.config import TrainConfig

PREFIX = "optimizer."
STEP_KEY = PREFIX + "step"


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters :func:`client.trainer.make_optimizer` optimises, with their names."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _slots(cfg: TrainConfig) -> tuple[str, ...]:
    """Per-parameter state tensors of ``cfg``'s optimiser."""
    if cfg.optimizer == "adam":
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if cfg.momentum > 0 else ()


def initial_arrays(model: nn.Module, cfg: TrainConfig) -> dict[str, Tensor]:
    """The state of a fresh optimiser for ``model``: zeros (empty when it has none)."""
    out = {f"{PREFIX}{slot}.{name}": torch.zeros_like(p, device="cpu")
           for slot in _slots(cfg) for name, p in _named_trainable(model)}
    if cfg.optimizer == "adam":
        out[STEP_KEY] = torch.zeros(1)
    return out


def export_arrays(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> dict[str, Tensor]:
    """``optimizer``'s state for ``model``'s parameters, keyed as :func:`initial_arrays`.

    A parameter the optimiser has not stepped yet reports zeros (a fresh state).
    Accepts Opacus's ``DPOptimizer`` (its state is the wrapped optimiser's).
    """
    inner = getattr(optimizer, "original_optimizer", optimizer)
    out = initial_arrays(model, cfg)
    step = 0.0
    for name, p in _named_trainable(model):
        state = inner.state.get(p, {})
        for slot in _slots(cfg):
            if slot in state and state[slot] is not None:
                out[f"{PREFIX}{slot}.{name}"] = state[slot].detach().to("cpu", torch.float32).clone()
        if "step" in state:
            step = max(step, float(state["step"]))
    if cfg.optimizer == "adam":
        out[STEP_KEY] = torch.tensor([step])
    return out


def load_arrays(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                arrays: Mapping[str, Tensor]) -> None:
    """Set ``optimizer``'s state from ``arrays`` (as :func:`export_arrays` writes them).

    ValueError when ``arrays`` lacks a key this optimiser needs or holds another shape:
    the server and the node disagree on the optimiser or the model.
    """
    expected = initial_arrays(model, cfg)
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise ValueError(f"the optimiser state received lacks {len(missing)} array(s) "
                         f"({missing[0]}, ...): the server runs another --optimizer")
    inner = getattr(optimizer, "original_optimizer", optimizer)
    step = float(arrays[STEP_KEY].reshape(-1)[0]) if cfg.optimizer == "adam" else None
    for name, p in _named_trainable(model):
        state: dict[str, Tensor] = {}
        for slot in _slots(cfg):
            value = arrays[f"{PREFIX}{slot}.{name}"]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"optimiser state {slot} of {name} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            state[slot] = value.detach().to(p.device, p.dtype).clone()
            if slot == "exp_avg_sq":  # Adam takes its square root: one bad sender must not
                state[slot].clamp_(min=0.0)  # turn every node's steps into NaN
        if step is not None:
            # Adam keeps its step count as a float tensor on the CPU (not capturable).
            state["step"] = torch.tensor(max(step, 0.0), dtype=torch.float32)
        if state:
            inner.state[p] = state


def split(arrays: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(model weights, optimiser state) of one state dict received or aggregated."""
    weights = {k: v for k, v in arrays.items() if not k.startswith(PREFIX)}
    optim = {k: v for k, v in arrays.items() if k.startswith(PREFIX)}
    return weights, optim
