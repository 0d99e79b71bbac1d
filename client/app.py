"""The ClientApp: one round of local contrastive training against the global queue.

A thin adapter (see ``server/strategy.py`` for the message contract): it reads the
settings from the run config, the node's data and identity from the node config,
and calls :func:`train_round`, which is plain torch plus the queue stub.

Node config keys:

- ``partition-id`` and ``num-partitions``: this node's share of the run's built-in
  dataset (``--dataset``), split with ``--partitioner`` and ``--seed``, so every
  node computes the same split on its own;
- ``data-path``: a local ``.npz`` file, or a dataset plug-in ``package.module:name[:ARG]``
  (see :mod:`common.datasets`), used instead;
- ``client-id``: stable identity (default ``partition-<id>``; required with
  ``data-path``), names the state directory;
- ``state-dir``: where the client's state lives (see :mod:`client.state`);
- ``queue-root-certificates``: absolute path of the PEM CA that verifies the negative
  queue's TLS certificate (``fedcontrast client --root-certificates CA`` sets it to
  that CA). A node holding one talks to the queue over TLS only, and one without it
  only without TLS: the round fails with an error saying which side to change when
  the TRAIN message's ``queue-tls`` disagrees.

With ``--client-sampling seeded`` and a ``--fraction-train`` below 1 the node answers one
identify QUERY (:func:`identify`) with its client id, once per run.

With ``--push-timing before`` the node also answers the round's push-phase QUERY message
(:func:`push`): it pushes keys of the round's global weights before any node trains,
and the TRAIN message that follows pushes nothing more.

A node with bad data or configuration raises: Flower returns the error to the
server, which logs it and goes on with the other nodes.

With ``--dp true`` (see :mod:`client.privacy`) the round's releases are recorded in the
client's accountant, and saved, before training starts; the reply's ``epsilon`` is the
client's epsilon with them, and the statistics of local data that the accountant does
not cover (:data:`client.privacy.WITHHELD_UNDER_DP`) are sent as 0.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy import (
    DPSGD,
    WITHHELD_UNDER_DP,
    RoundPrivacy,
    noisy_rows,
    plan_round,
    poisson_sample,
    secret_generator,
)
from client.state import StateDir, check_client_id, default_state_dir
from client.stub import GlobalNegatives, QueueClient
from client.trainer import ContrastiveTrainer, make_optimizer
from common import optim_state, plugins
from common.config import FedConfig, from_run_config, push_quota, resolve_device
from common.datasets import load_dataset
from common.encoders import ContrastiveModel, build_encoder
from common.evaluation import paired_views
from common.metrics import alignment, uniformity
from common.partition import partition

logger = logging.getLogger(__name__)

app = ClientApp()

#: Local examples whose views measure the local model's alignment and uniformity.
GEOMETRY_SAMPLE = 512
#: Mixed into the round's seed for the push phase's draws (``--push-timing before``).
PUSH_PHASE_SEED = 0x5EED_9A5E
#: Rows per Push call (well under the service's message limit at any embedding size).
PUSH_CHUNK = 1024


@dataclass(frozen=True)
class NodeSettings:
    """What the node config says about this node."""

    client_id: str
    state_dir: Path
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    queue_root_certificates: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        data_path = node_config.get("data-path") or None
        pid, parts = node_config.get("partition-id"), node_config.get("num-partitions")
        if data_path is None:
            if pid is None or parts is None:
                raise ValueError(
                    "node config needs partition-id and num-partitions (a share of the run's "
                    "dataset) or data-path (a local .npz file)"
                )
            pid, parts = int(pid), int(parts)
            if parts < 1 or not 0 <= pid < parts:
                raise ValueError(
                    f"node config partition-id {pid} must be in [0, num-partitions {parts})"
                )
        client_id = node_config.get("client-id") or (None if data_path else f"partition-{pid}")
        if client_id is None:  # two such nodes would otherwise share one state and accountant
            raise ValueError("node config with data-path needs client-id: it names the "
                             "client's state and privacy accountant")
        client_id = check_client_id(str(client_id))
        state_dir = node_config.get("state-dir")
        queue_ca = str(node_config.get("queue-root-certificates") or "")
        if queue_ca and not Path(queue_ca).is_absolute():
            raise ValueError(f"node config queue-root-certificates {queue_ca!r} must be an "
                             "absolute path (fedcontrast client makes it absolute)")
        return cls(
            client_id=client_id,
            state_dir=Path(str(state_dir)) if state_dir else default_state_dir(client_id),
            partition_id=None if pid is None else int(pid),
            num_partitions=None if parts is None else int(parts),
            data_path=None if data_path is None else str(data_path),
            queue_root_certificates=Path(queue_ca) if queue_ca else None,
        )


def queue_root_certificates(node: NodeSettings, queue_tls: bool) -> bytes | None:
    """The PEM CA to verify the queue with when the server says it is TLS; None when it is not.

    Raises ValueError when the server and the node disagree: a TLS queue and no CA in the
    node config, or a CA (the node trusts the queue over TLS only) and an insecure queue.
    """
    ca = node.queue_root_certificates
    if queue_tls and ca is None:
        raise ValueError(
            "the server serves the negative queue with TLS, but this node has no CA to verify "
            "it: start the client with --root-certificates CA (or set node config "
            "queue-root-certificates to the CA's absolute path)"
        )
    if not queue_tls and ca is not None:
        raise ValueError(
            f"this node trusts the negative queue over TLS only (node config "
            f"queue-root-certificates {ca}), but the server serves it without TLS, so its "
            "token and embeddings would cross the network in clear: run `fedcontrast server` "
            "with --ssl-certfile/--ssl-keyfile (or --queue-ssl-*), or start this client "
            "with --insecure on a trusted network"
        )
    if ca is None:
        return None
    try:
        return ca.read_bytes()
    except OSError as exc:
        raise ValueError(f"node config queue-root-certificates {ca}: cannot read it "
                         f"({exc.strerror})") from exc


def local_images(cfg: FedConfig, node: NodeSettings) -> torch.Tensor:
    """This node's training items (N, C, ...): its own data, or its partition of the dataset."""
    if node.data_path is not None:
        if not node.data_path.endswith(".npz") and plugins.parse("dataset", node.data_path) is None:
            raise ValueError(f"node config data-path {node.data_path!r} must be an .npz file or "
                             "a dataset plug-in package.module:name[:ARG]")
        return load_dataset(node.data_path, seed=cfg.seed).x_train
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    parts = partition_indices(cfg, data.y_train, node.num_partitions)
    return data.x_train[torch.as_tensor(parts[node.partition_id], dtype=torch.long)]


def partition_indices(cfg: FedConfig, labels: torch.Tensor, num_partitions: int) -> list[np.ndarray]:
    """The run's split of a dataset's (N,) training ``labels`` into ``num_partitions`` index
    arrays, with ``--partitioner`` and its parameters and ``--seed``: every node computes
    the same split on its own."""
    kw: dict[str, Any] = {}
    if cfg.partitioner == "dirichlet":
        kw["alpha"] = cfg.dirichlet_alpha
    elif cfg.partitioner == "shards":
        kw["classes_per_partition"] = cfg.classes_per_client
    return partition(labels.numpy(), num_partitions, cfg.partitioner, cfg.seed, **kw)


def build_model(cfg: FedConfig, in_channels: int, state: Mapping[str, torch.Tensor]) -> ContrastiveModel:
    """The run's encoder holding the received global weights."""
    model = build_encoder(cfg.encoder, in_channels=in_channels, embedding_dim=cfg.embedding_dim,
                          norm=cfg.norm, width=cfg.width,
                          weight_standardization=cfg.weight_standardization)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"the server's weights do not fit this node's {cfg.encoder} encoder for "
            f"{in_channels}-channel items: {exc}"
        ) from exc
    return model


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
) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
    """Train ``local_epochs`` on ``x`` from the global weights; push keys; return weights and metrics.

    The query model starts at the global weights; the key model is the global model
    itself (``frozen``), a momentum copy of it (``ema``), or the query model
    (``shared``). Negatives come from the global queue when ``global_negatives > 0``;
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
    """
    if x.shape[0] < 2:
        raise ValueError(f"this node has {x.shape[0]} training example(s); contrastive training needs 2 or more")
    if cfg.dp and privacy is None:
        raise ValueError("--dp true: train_round needs the round's privacy plan "
                         "(client.privacy.plan_round), recorded before training")
    device = resolve_device(cfg.device)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(cfg, x.shape[1], global_state)
    global_model = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    dp_generator = secret_generator() if cfg.dp else None
    dp = None
    if privacy is not None:
        dp = DPSGD(noise_multiplier=privacy.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                   num_examples=x.shape[0], batch_size=cfg.batch_size,
                   own_rows_noised=privacy.pushes_accounted, generator=dp_generator)
        if (dp.sample_rate, dp.steps_per_epoch * cfg.local_epochs) != (privacy.sample_rate, privacy.steps):
            raise ValueError(f"the round's privacy plan {privacy} does not fit {x.shape[0]} examples")
    client = QueueClient(queue_address, queue_token, root_certificates=queue_root_certificates)
    try:
        # Own rows come back only when they were released with noise and accounted
        # (config validation refuses --pull-scope all/own under DP without push noise).
        exclude_own = cfg.pull_scope == "others" or (privacy is not None
                                                     and not privacy.pushes_accounted)
        max_age = cfg.max_age if privacy is None else privacy.pull_max_age
        # --pull-mode reproducible: rows of finished rounds only (and of this round's push
        # phase, which ends before any node trains), sampled by seeded pulls.
        reproducible = cfg.pull_mode == "reproducible"
        sources = ([GlobalNegatives(client, cfg.global_negatives, max_age, cfg.refresh_every,
                                    exclude_own=exclude_own, only_own=cfg.pull_scope == "own",
                                    policy=cfg.pull_policy, with_ages=cfg.staleness_gamma < 1,
                                    max_version=(queue_version - (cfg.push_timing == "after")
                                                 if reproducible else None),
                                    seed=seed if reproducible else None)]
                   if cfg.global_negatives > 0 else [])
        optimizer = make_optimizer(model, cfg)
        if optimizer_state is not None:
            optim_state.load_arrays(model, optimizer, cfg, optimizer_state)
        trainer = ContrastiveTrainer(
            model, cfg, device=device, sources=sources,
            key_model=global_model if cfg.key_mode == "frozen" else None,
            lr_schedule=lambda _step: lr, generator=generator, optimizer=optimizer, dp=dp,
        )
        try:
            epochs = [trainer.train_epoch(x) for _ in range(cfg.local_epochs)]
        finally:
            if dp is not None:
                dp.detach()
        if cfg.push_fraction > 0 and cfg.push_timing == "after":
            push_keys(client, global_model, x, cfg, queue_version, generator, device, dp_generator)
        counters = client.counters()
    finally:
        client.close()
    align, uniform = (0.0, 0.0) if cfg.dp else local_geometry(model, x, cfg, device)
    steps = sum(e.steps for e in epochs)
    metrics: dict[str, float | int] = {
        "num-examples": int(x.shape[0]),
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
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if optimizer_state is not None:
        state.update(optim_state.export_arrays(model, optimizer, cfg))
    return state, metrics


def push_round(
    cfg: FedConfig,
    x: torch.Tensor,
    global_state: Mapping[str, torch.Tensor],
    *,
    queue_address: str,
    queue_token: str,
    queue_version: int,
    seed: int,
    queue_root_certificates: bytes | None = None,
) -> dict[str, int]:
    """The push phase of ``--push-timing before``: push keys of ``push_fraction`` of ``x``
    made by the round's global weights, before any node trains; returns the counts.

    Config validation refuses it under ``--dp true``: a round's releases are planned and
    accounted when the node trains.
    """
    device = resolve_device(cfg.device)
    global_model = build_model(cfg, x.shape[1], global_state).requires_grad_(False).eval().to(device)
    client = QueueClient(queue_address, queue_token, root_certificates=queue_root_certificates)
    try:
        if cfg.push_fraction > 0:
            push_keys(client, global_model, x, cfg, queue_version, torch.Generator().manual_seed(seed),
                      device)
        counters = client.counters()
    finally:
        client.close()
    return {"pushed-rows": int(counters["rows_pushed"]), "push-failures": int(counters["push_failures"])}


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """Flower's entry point for the identify QUERY (``--client-sampling seeded``): the
    node's client id, by which the server orders the nodes it samples from. Reads the
    node config only: no data, no model."""
    node = NodeSettings.from_node_config(context.node_config)
    return Message(content=RecordDict({"identity": ConfigRecord({"client-id": node.client_id})}),
                   reply_to=msg)


@app.query()
def push(msg: Message, context: Context) -> Message:
    """Flower's entry point for the push phase's QUERY message (``--push-timing before``)."""
    cfg = from_run_config(FedConfig, context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    config = msg.content["config"]
    queue_ca = queue_root_certificates(node, bool(config.get("queue-tls", False)))
    state = StateDir(node.state_dir, node.client_id).load()
    weights, _optimizer = optim_state.split(msg.content["arrays"].to_torch_state_dict())
    counts = push_round(
        cfg, local_images(cfg, node), weights,
        queue_address=str(config["queue-address"]),
        queue_token=str(config["queue-token"]),
        queue_version=int(config["queue-version"]),
        # A stream of its own: the TRAIN message that follows draws from state.seed itself.
        seed=state.seed(cfg.seed, int(config["server-round"])) ^ PUSH_PHASE_SEED,
        queue_root_certificates=queue_ca,
    )
    logger.info("client %s round %s: push phase, %d rows pushed", node.client_id,
                config["server-round"], counts["pushed-rows"])
    return Message(content=RecordDict({"metrics": MetricRecord(counts)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's entry point for a TRAIN message (contract in ``server/strategy.py``)."""
    cfg = from_run_config(FedConfig, context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    # Before anything is planned or recorded: a mismatch fails the round, releasing nothing.
    queue_ca = queue_root_certificates(node, bool(config.get("queue-tls", False)))
    state_dir = StateDir(node.state_dir, node.client_id)
    state = state_dir.load()
    x = local_images(cfg, node)
    privacy = None
    if cfg.dp:
        privacy = plan_round(cfg, state, x.shape[0], server_round,
                             queue_token=str(config["queue-token"]),
                             queue_version=int(config["queue-version"]))
        state_dir.save(state)  # the round's releases are on disk before any is made
    received, optimizer_state = optim_state.split(msg.content["arrays"].to_torch_state_dict())
    weights, metrics = train_round(
        cfg, x, received,
        lr=float(config["lr"]),
        queue_address=str(config["queue-address"]),
        queue_token=str(config["queue-token"]),
        queue_version=int(config["queue-version"]),
        seed=state.seed(cfg.seed, server_round),
        privacy=privacy,
        queue_root_certificates=queue_ca,
        # The reply carries optimiser state exactly when the message did: its keys
        # must be those of the server's arrays.
        optimizer_state=optimizer_state or None,
    )
    state.record_round(context.run_id, server_round)
    state_dir.save(state)
    logger.info("client %s round %d: loss %.4f, %d rows pushed, %d queue misses, epsilon %.4g",
                node.client_id, server_round, metrics["train-loss"], metrics["pushed-rows"],
                metrics["global-misses"], metrics["epsilon"])
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
