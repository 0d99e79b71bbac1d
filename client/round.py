"""One local round of a node: train from the global weights against the global queue.

The round is plain torch plus the queue stub (:mod:`client.stub`), free of Flower:
:mod:`client.app` reads a message into its arguments and wraps what it returns in
records; :mod:`simulations.compare` and the benches call it directly.

- :func:`train_round`: ``local_epochs`` of contrastive training on this node's items,
  starting at the global weights, with negatives from the global queue; then keys
  pushed; returns the weights and the round's metrics.
- :func:`push_keys`: the keys themselves, a sample of local items embedded by the
  round's global encoder, or with ``--key-sync server`` by the round's server-averaged
  key encoder (:mod:`common.key_state`) (under DP a Poisson sample, optionally noised).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from client.negatives import LocalQueue, NegativeSource
from client.privacy import (
    DPSGD,
    WITHHELD_UNDER_DP,
    RoundPrivacy,
    noisy_rows,
    poisson_sample,
    secret_generator,
)
from client.stub import GlobalNegatives, QueueClient
from client.trainer import ContrastiveTrainer, EpochStats, make_optimizer
from common import key_state, optim_state, plugins
from common.config import FedConfig, push_quota, resolve_device
from common.encoders import ContrastiveModel
from common.evaluation import paired_views
from common.metrics import alignment, uniformity
from common.model import build_model

#: Local examples whose views measure the local model's alignment and uniformity.
GEOMETRY_SAMPLE = 512
#: Rows per Push call (well under the service's message limit at any embedding size).
PUSH_CHUNK = 1024


@torch.no_grad()
def push_keys(
    client: QueueClient,
    global_model: ContrastiveModel,
    x: torch.Tensor,
    cfg: FedConfig,
    version: int,
    generator: torch.Generator,
    device: torch.device,
    dp_generator: torch.Generator | None = None,
) -> None:
    """Push keys of a random ``push_fraction`` of ``x``, made by the round's global encoder.

    Keys are embeddings of one augmented view, as the keys of the local loss are;
    every row carries ``version``, the round whose encoder computed it.

    Without DP at most :func:`~common.config.push_quota` rows are pushed, the most the
    queue takes from one node per round. Under DP (``cfg.dp``) the pushed examples are a
    Poisson sample at rate ``push_fraction`` drawn from ``dp_generator`` (secret), which
    is not cut to the quota (a cut would make one example's release depend on how many
    others were drawn): rows beyond it are refused by the queue. With ``push_noise > 0``
    every row is released as ``normalize(row + N(0, push_noise^2 I))``.
    """
    if cfg.dp:
        if dp_generator is None:
            raise ValueError("push_keys with --dp true needs the secret dp_generator")
        chosen = poisson_sample(x.shape[0], cfg.push_fraction, dp_generator)
    else:  # at most the queue's quota per node: more would be refused
        count = min(round(cfg.push_fraction * x.shape[0]), push_quota(cfg))
        chosen = torch.randperm(x.shape[0], generator=generator)[:count]
    n = chosen.numel()
    if n == 0:
        return
    augment = plugins.make_views(cfg)
    global_model.eval()
    chunk = min(PUSH_CHUNK, cfg.queue_capacity)
    for start in range(0, n, chunk):
        view = augment(x[chosen[start:start + chunk]], generator).to(device)
        rows = global_model(view).cpu()  # n x D, unit-norm
        if cfg.dp and cfg.push_noise > 0:
            rows = noisy_rows(rows, cfg.push_noise, dp_generator)
        client.push(rows, version)


@torch.no_grad()
def local_geometry(model: ContrastiveModel, x: torch.Tensor, cfg: FedConfig,
                   device: torch.device) -> tuple[float, float]:
    """Alignment and uniformity (Wang & Isola 2020) of ``model`` on views of local data."""
    model.eval()
    v1, v2 = paired_views(x, plugins.make_views(cfg), cfg.seed, max_items=GEOMETRY_SAMPLE)
    z1, z2 = model(v1.to(device)).cpu(), model(v2.to(device)).cpu()
    return alignment(z1, z2), uniformity(z1)


def train_round(
    cfg: FedConfig,
    x: torch.Tensor,
    global_state: Mapping[str, torch.Tensor],
    *,
    lr: float,
    queue_address: str,
    queue_token: str,
    queue_version: int,
    seed: int,
    privacy: RoundPrivacy | None = None,
    queue_root_certificates: bytes | None = None,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    key_arrays: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
    """Train ``local_epochs`` on ``x`` from the global weights; push keys; return weights and metrics.

    The query model starts at the global weights; the key model is the global model
    itself (``frozen``), a momentum copy of it (``ema``), or the query model
    (``shared``). Negatives come from the global queue when ``global_negatives > 0``,
    and from a local queue of this node's own past keys when ``queue_size > 0`` (MoCo's
    FIFO, empty at the round's start and kept for the round's steps; refused with DP);
    a step whose pull fails uses the local negatives and is counted as a miss.

    With ``cfg.dp``, ``privacy`` is the round's plan (:func:`client.privacy.plan_round`,
    already recorded in the accountant): training is DP-SGD at its noise, and pulls
    leave out this client's own rows unless its pushes are noised.

    ``queue_root_certificates`` (PEM) connects to the queue over TLS, verified by that CA;
    ``None`` connects without TLS.

    ``optimizer_state`` (:mod:`common.optim_state`, sent with the weights under
    ``--optimizer-state federated``): the optimiser continues from it, and the returned
    state dict then holds the optimiser's state after training beside the weights.
    ``None``: a fresh optimiser, and weights only.

    ``key_arrays`` (``--key-sync server``, :mod:`common.key_state`: the server-averaged
    key encoder's state dict, prefix removed): the ``ema`` key encoder starts from it
    rather than from the global weights, the pushed rows are its keys, and the returned
    state dict then holds the key encoder after training under ``key.*`` as well.
    """
    if x.shape[0] < 2:
        raise ValueError(f"this node has {x.shape[0]} training example(s); contrastive training needs 2 or more")
    if cfg.dp and privacy is None:
        raise ValueError("--dp true: train_round needs the round's privacy plan "
                         "(client.privacy.plan_round), recorded before training")
    device = resolve_device(cfg.device)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(cfg, x.shape[1], global_state)
    key_model = None if key_arrays is None else build_model(cfg, x.shape[1], key_arrays)
    # The encoder of the round's pushed rows (and of frozen keys): the global weights, or
    # the server-averaged key encoder as received, one encoder for every node.
    global_model = copy.deepcopy(model if key_model is None else key_model
                                 ).requires_grad_(False).eval().to(device)
    dp_generator = secret_generator() if cfg.dp else None
    dp = _dp_sgd(cfg, privacy, x.shape[0], dp_generator)
    client = QueueClient(queue_address, queue_token, root_certificates=queue_root_certificates)
    try:
        sources = _global_sources(client, cfg, privacy, queue_version, seed)
        if cfg.queue_size:  # MoCo's FIFO of this node's own keys, kept for the round
            sources.append(LocalQueue(cfg.queue_size, cfg.embedding_dim))
        optimizer = make_optimizer(model, cfg)
        if optimizer_state is not None:
            optim_state.load_arrays(model, optimizer, cfg, optimizer_state)
        trainer = ContrastiveTrainer(
            model, cfg, device=device, sources=sources,
            key_model=global_model if cfg.key_mode == "frozen" else key_model,
            lr_schedule=lambda _step: lr, generator=generator, optimizer=optimizer, dp=dp,
        )
        try:
            epochs = [trainer.train_epoch(x) for _ in range(cfg.local_epochs)]
        finally:
            if dp is not None:
                dp.detach()
        if cfg.push_fraction > 0:
            push_keys(client, global_model, x, cfg, queue_version, generator, device, dp_generator)
        counters = client.counters()
    finally:
        client.close()
    geometry = (0.0, 0.0) if cfg.dp else local_geometry(model, x, cfg, device)
    metrics = round_metrics(cfg, x.shape[0], epochs, counters, geometry, privacy)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if optimizer_state is not None:
        state.update(optim_state.export_arrays(model, optimizer, cfg))
    if key_model is not None:
        state.update(key_state.export_arrays(key_model))
    return state, metrics


def _dp_sgd(cfg: FedConfig, privacy: RoundPrivacy | None, num_examples: int,
            dp_generator: torch.Generator | None) -> DPSGD | None:
    """DP-SGD at the noise of the round's privacy plan; None without one.

    Raises ValueError when the plan was made for another number of examples.
    """
    if privacy is None:
        return None
    dp = DPSGD(noise_multiplier=privacy.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
               num_examples=num_examples, batch_size=cfg.batch_size,
               own_rows_noised=privacy.pushes_accounted, generator=dp_generator,
               moment_noise=privacy.moment_noise)
    if (dp.sample_rate, dp.steps_per_epoch * cfg.local_epochs) != (privacy.sample_rate, privacy.steps):
        raise ValueError(f"the round's privacy plan {privacy} does not fit {num_examples} examples")
    return dp


def _global_sources(client: QueueClient, cfg: FedConfig, privacy: RoundPrivacy | None,
                    queue_version: int, seed: int) -> list[NegativeSource]:
    """The global queue as the round's negative source; none when ``global_negatives`` is 0."""
    if cfg.global_negatives <= 0:
        return []
    # Own rows come back only when they were released with noise and accounted
    # (config validation refuses --pull-scope all/own under DP without push noise).
    exclude_own = cfg.pull_scope == "others" or (privacy is not None
                                                 and not privacy.pushes_accounted)
    max_age = cfg.max_age if privacy is None else privacy.pull_max_age
    # --pull-mode reproducible: rows of finished rounds only, sampled by seeded pulls.
    reproducible = cfg.pull_mode == "reproducible"
    return [GlobalNegatives(client, cfg.global_negatives, max_age, cfg.refresh_every,
                            exclude_own=exclude_own, only_own=cfg.pull_scope == "own",
                            max_version=queue_version - 1 if reproducible else None,
                            seed=seed if reproducible else None)]


def round_metrics(cfg: FedConfig, num_examples: int, epochs: Sequence[EpochStats],
                   counters: Mapping[str, int], geometry: tuple[float, float],
                   privacy: RoundPrivacy | None) -> dict[str, float | int]:
    """The reply's metrics: training, queue traffic, local geometry and the round's epsilon."""
    align, uniform = geometry
    steps = sum(e.steps for e in epochs)
    metrics: dict[str, float | int] = {
        "num-examples": int(num_examples),
        "train-loss": float(epochs[-1].loss),
        "global-hits": int(counters["hits"]),
        "global-misses": int(counters["misses"]),
        "pushed-rows": int(counters["rows_pushed"]),
        "push-failures": int(counters["push_failures"]),
        "negatives-per-step": float(sum(e.mean_negatives * e.steps for e in epochs) / max(1, steps)),
        "alignment": float(align),
        "uniformity": float(uniform),
        "epsilon": -1.0 if privacy is None else float(privacy.epsilon),  # -1: no accounting
    }
    if cfg.dp:
        metrics.update(dict.fromkeys(WITHHELD_UNDER_DP, 0.0))
    return metrics
