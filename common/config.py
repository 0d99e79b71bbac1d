"""One source of truth for FedContrast's settings.

Every setting is a field of a typed dataclass with its default and help text.
Command-line flags (``--batch-size``) and Flower run-config keys (``batch-size``)
are derived from the same fields, so a default is written exactly once. A test
checks that ``[tool.flwr.app.config]`` in ``pyproject.toml`` matches
:class:`FedConfig`.

Naming: the field ``batch_size`` is the flag ``--batch-size`` and the run-config
key ``batch-size``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from common import plugins

#: Largest gRPC message of the negative queue service and its clients, by default (32 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 32 * 2**20
#: Calls one queue token may have in flight at once (``server.service.QueueServer``).
DEFAULT_MAX_CALLS_PER_TOKEN = 4

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: ``need(ok, field, what)``: raise ``ValueError`` naming the field's flag unless ok.
Need = Callable[[bool, str, str], None]

NORM_CHOICES = ("group", "instance", "layer", "batch")
KEY_MODES = ("ema", "frozen", "shared")
OPTIMIZERS = ("sgd", "adam")
AGGREGATIONS = ("fedavg", "fedtrimmedavg", "fedmedian", "krum")
OBJECTIVES = ("infonce", "byol", "moment")
BYOL_UPDATES = ("fedbyol", "fedu", "fedema")
KEY_SYNCS = ("local", "server")


#: The help's groups beyond the parts' own, shown only by ``--help-all``: finer settings, and
#: the variants of the loss and the queue that experiments measure (docs/experiments.md).
MORE = "more settings"
EXPERIMENTS = "experiments: variants of the loss and the queue (see docs/experiments.md)"
HIDDEN_GROUPS = (MORE, EXPERIMENTS)


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, *,
       group: str | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its help text (and choices) for the CLI and docs; ``group``
    puts it in one of :data:`HIDDEN_GROUPS` instead of its part's group of the help."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if group is not None:
        meta["group"] = group
    return field(default=default, metadata=meta, **kw)


class _Part:
    """A group of settings that checks its own ranges; :func:`validate` runs each part's
    ``_check`` once, then the rules that tie parts together."""

    def _check(self, need: Need) -> None:
        """Raise through ``need`` for the first of this part's settings out of range."""


@dataclass
class DataSettings(_Part):
    """Which data, and the seed of everything random."""

    dataset: str = _f(
        "digits",
        "built-in (digits, synthetic:N, cifar10:FOLDER, dna[:KEY=VALUE,...]), a .npz path, "
        "or a plug-in package.module:name[:ARG] (see docs/plugins.md)",
    )
    seed: int = _f(0, "seed for data split, partition, initialisation, views, and the clients a round samples (--client-sampling)")


@dataclass
class ModelSettings(_Part):
    """The encoder: backbone, width, normalisation and embedding."""

    encoder: str = _f(
        "cnn", "encoder: built-in (cnn, resnet18, cnn1d) or a plug-in package.module:name"
    )
    width: int = _f(32, "base channel width of the backbone")
    embedding_dim: int = _f(128, "dimension of the projected, unit-norm embedding", group=MORE)
    norm: str = _f("group", "normalisation layers in the backbone", NORM_CHOICES)
    weight_standardization: bool = _f(
        True, "weight-standardised backbone convolutions (zero mean, unit variance per output "
               "channel; Qiao et al. 2019), DP-compatible")
    pretrain_epochs: int = _f(
        0, "epochs of pretraining on synthetic dead-leaves images first (no one's data, no "
           "privacy cost; docs/privacy.md)")
    pretrain_images: int = _f(
        20000, "pretrain-epochs: how many dead-leaves images (the same for every run)",
        group=MORE)

    def _check(self, need: Need) -> None:
        need(self.embedding_dim > 0, "embedding_dim", "must be positive")
        need(self.width > 0, "width", "must be positive")
        need(self.pretrain_epochs >= 0, "pretrain_epochs", "must be zero or more")
        need(self.pretrain_images >= 2, "pretrain_images",
             "must be 2 or more (in-batch negatives need a second image)")


@dataclass
class OptimSettings(_Part):
    """The local optimiser and the loss's temperatures."""

    epochs: int = _f(30, "passes over the local data")
    batch_size: int = _f(128, "examples per step")
    optimizer: str = _f("adam", "optimiser", OPTIMIZERS)
    lr: float = _f(1e-3, "learning rate (cosine-decayed over the run)")
    momentum: float = _f(0.9, "SGD momentum (optimizer sgd)", group=MORE)
    weight_decay: float = _f(5e-4, "weight decay", group=MORE)
    temperature: float = _f(0.1, "InfoNCE temperature")
    queue_temperature: float = _f(
        0.5, "temperature of the queue negatives' logits alone (local and global queue rows; "
             "the positive and in-batch negatives keep --temperature); 0: --temperature",
             group=EXPERIMENTS)

    def _check(self, need: Need) -> None:
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
             "must be positive")
        need(math.isfinite(self.queue_temperature) and self.queue_temperature >= 0,
             "queue_temperature", "must be zero (--temperature) or positive")
        need(self.batch_size > 0, "batch_size", "must be positive")
        need(self.epochs >= 0, "epochs", "must be zero or more")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "must be positive")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be zero or more")


@dataclass
class ViewSettings(_Part):
    """The two random views of each example."""

    views: str = _f(
        "auto", "view generator: auto (the dataset's own: digits for digits, dna for dna, "
                "images otherwise), a built-in (images; digits: images without the flip, plus "
                "small rotations and noise; dna) or a plug-in package.module:name"
    )
    crop_scale_min: float = _f(
        0.0, "smallest crop fraction kept by the random crop (images: area; dna: length); "
             "0: the views' own (images and dna 0.5, digits 0.8)",
        group=MORE,
    )
    jitter_strength: float = _f(
        0.4, "colour-jitter strength (brightness/contrast for grayscale)",
        group=MORE,
    )
    blur_p: float = _f(0.0, "probability of Gaussian blur per view", group=MORE)

    def _check(self, need: Need) -> None:
        need(0 <= self.crop_scale_min <= 1, "crop_scale_min",
             "must be in (0, 1], or 0 for the views' own")
        need(self.jitter_strength >= 0, "jitter_strength", "must be zero or more")
        need(0 <= self.blur_p <= 1, "blur_p", "must be in [0, 1]")


@dataclass
class NegativeSettings(_Part):
    """The local negatives, the key encoder, and how each query weighs its negatives
    (docs/queue.md, "Choosing negatives")."""

    in_batch: bool = _f(True, "use the other examples of the batch as negatives (SimCLR)")
    queue_size: int = _f(
        0, "local FIFO queue of past keys used as negatives (0: none)",
        group=EXPERIMENTS,
    )
    key_mode: str = _f(
        "shared",
        "shared: one network, gradients through both views (SimCLR); "
        "ema: momentum key encoder (MoCo); frozen: key encoder fixed at its start",
        KEY_MODES,
    )
    key_momentum: float = _f(0.99, "EMA momentum of the key encoder (key-mode ema)", group=MORE)
    symmetric: bool = _f(True, "average the loss over both view orders", group=MORE)
    hard_negative_beta: float = _f(
        0.0, "hard-negative weighting (Robinson et al. 2021): concentration beta >= 0 of the "
             "importance weights e^(beta x logit) over each query's negatives (0: off)",
             group=EXPERIMENTS)
    negative_weight: float = _f(
        1.0, "with --in-batch false: the weight w >= 1 of each query's log-sum-exp over its "
             "detached negatives (InfoNCE plus w - 1 more times that term; Wang & Isola 2020)",
        group=EXPERIMENTS)

    def _check(self, need: Need) -> None:
        need(self.queue_size >= 0, "queue_size", "must be zero or more")
        need(math.isfinite(self.negative_weight) and self.negative_weight >= 1,
             "negative_weight", "must be a finite number >= 1")
        need(self.negative_weight == 1 or not self.in_batch, "negative_weight",
             "weighs the detached negatives of a per-example loss: needs --in-batch false")
        need(0 <= self.key_momentum <= 1, "key_momentum", "must be in [0, 1]")
        need(math.isfinite(self.hard_negative_beta) and self.hard_negative_beta >= 0,
             "hard_negative_beta", "must be a finite number >= 0")
        if self.key_mode == "shared":
            need(self.queue_size == 0, "queue_size",
                 "needs a separate key encoder: use --key-mode ema or frozen with a queue")


@dataclass
class EvalSettings(_Part):
    """Evaluation schedule and the device."""

    eval_every: int = _f(
        1, "evaluate on held-out data every N epochs (0: only at the end)",
        group=MORE,
    )
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda when present)")

    def _check(self, need: Need) -> None:
        need(self.eval_every >= 0, "eval_every", "must be zero or more")


# A dataclass collects its bases' fields from the last base to the first: the parts are
# listed in reverse so that fields, flags and run-config keys keep their order.
@dataclass
class TrainConfig(EvalSettings, NegativeSettings, ViewSettings, OptimSettings, ModelSettings,
                  DataSettings):
    """Local contrastive training: data, model, optimiser, views, negatives."""

    def __post_init__(self) -> None:
        validate(self)

    def _check(self, need: Need) -> None:
        if not isinstance(self, FedConfig):
            need(self.in_batch or self.queue_size > 0, "in_batch",
                 "is off and --queue-size is 0: there would be no negatives; enable one")


@dataclass
class FederationSettings(_Part):
    """Rounds, the clients a round samples, and how the data is split among them."""

    rounds: int = _f(5, "federated rounds")
    local_epochs: int = _f(1, "local epochs per round")
    fraction_train: float = _f(1.0, "fraction of nodes sampled each round (rounded down, at least 1)")
    client_sampling: str = _f(
        "seeded",
        "how a round picks its nodes when --fraction-train leaves some out: seeded (by --seed "
        "and the round over the nodes' client ids, which each node reports once; a run "
        "repeated, or compare's other methods, train the same clients each round; with the "
        "queue in use, each client also keeps its contributor slot through SuperNode "
        "restarts and --resume) or flower (Flower's unseeded draw over node ids, no identify "
        "message, a new slot per node)",
        ("seeded", "flower"),
        group=EXPERIMENTS,
    )
    min_nodes: int = _f(2, "minimum nodes that must reply for a round to count")
    round_timeout: float = _f(300.0, "seconds to wait for replies in one round", group=MORE)
    partitioner: str = _f("iid", "how data is split across clients", ("iid", "dirichlet", "shards"))
    dirichlet_alpha: float = _f(0.5, "Dirichlet concentration (partitioner dirichlet)")
    classes_per_client: int = _f(2, "classes per client (partitioner shards)")

    def _check(self, need: Need) -> None:
        need(self.rounds > 0, "rounds", "must be positive")
        need(self.local_epochs > 0, "local_epochs", "must be positive")
        need(0 < self.fraction_train <= 1, "fraction_train", "must be in (0, 1]")
        need(self.min_nodes >= 1, "min_nodes", "must be at least 1")
        need(self.round_timeout > 0, "round_timeout", "must be positive")
        need(self.dirichlet_alpha > 0, "dirichlet_alpha", "must be positive")
        need(self.classes_per_client >= 1, "classes_per_client", "must be at least 1")


@dataclass
class QueueSettings(_Part):
    """The global queue of negatives: its size, what is pushed and how pulls sample."""

    global_negatives: int = _f(64, "negatives pulled from the global queue per step (0: none)")
    queue_capacity: int = _f(4096, "rows held by the global queue")
    queue_quota: int = _f(0, "most rows one node may push per round; its pushes beyond are "
                             "refused (0: a quarter of --queue-capacity)", group=MORE)
    max_age: int = _f(1, "rows older than this many rounds are evicted and never pulled")
    push_fraction: float = _f(0.2, "fraction of local examples whose keys are pushed per round")
    refresh_every: int = _f(1, "pull fresh global negatives every N steps", group=EXPERIMENTS)
    pull_scope: str = _f(
        "others",
        "whose rows a client pulls: others (never its own), all, or own (only its own: a "
        "per-client queue, the fedmoco baseline)",
        ("others", "all", "own"),
        group=EXPERIMENTS,
    )
    pull_mode: str = _f(
        "reproducible",
        "what a node's pulls see and how they sample: reproducible (only rows of finished "
        "rounds, sampled by a generator seeded per client, round and pull over an order of the rows that does not "
        "depend on their arrival: a run repeats exactly while the rows of --max-age + 1 "
        "rounds fit --queue-capacity) or live (also this round's rows from nodes that "
        "finished earlier, sampled by the queue's own generator: a run depends on the order "
        "its clients happen to run in)",
        ("reproducible", "live"),
        group=EXPERIMENTS,
    )
    queue_port: int = _f(0, "port of the queue service (0: a free one)")
    queue_host: str = _f("127.0.0.1", "address the queue service binds and advertises")

    def _check(self, need: Need) -> None:
        need(self.global_negatives >= 0, "global_negatives", "must be zero or more")
        need(self.queue_capacity > 0, "queue_capacity", "must be positive")
        need(self.queue_quota >= 0, "queue_quota", "must be zero (a quarter of the capacity) or more")
        need(self.max_age >= 0, "max_age", "must be zero or more")
        need(0 <= self.push_fraction <= 1, "push_fraction", "must be in [0, 1]")
        need(self.refresh_every >= 1, "refresh_every", "must be at least 1")
        need(0 <= self.queue_port < 65536, "queue_port", "must be a port number or 0")
        self._check_pull_mode(need)

    def _check_pull_mode(self, need: Need) -> None:
        need(self.pull_mode != "reproducible" or self.max_age > 0
             or self.global_negatives == 0, "max_age",
             "0 with --pull-mode reproducible: pulls see only rows of finished rounds, which "
             "are all older than 0 rounds, so no global negative would ever be pulled: raise "
             "--max-age or set --pull-mode live")


@dataclass
class ServerSettings(_Part):
    """How the server waits for nodes, aggregates their weights and watches for collapse."""

    wait_nodes_timeout: float = _f(
        120.0, "seconds to wait for --min-nodes nodes to be online before a round starts",
        group=MORE,
    )
    aggregation: str = _f("fedavg", "how the server combines the clients' weights", AGGREGATIONS)
    optimizer_state: str = _f(
        "federated",
        "the local optimiser's state (Adam's moments, SGD's momentum) across rounds: federated: "
        "it travels with the weights, is aggregated as they are, and every node's round "
        "continues from it (messages grow 3x with adam, 2x with sgd); reset: a fresh "
        "optimiser every round (see common/optim_state.py)",
        ("federated", "reset"),
        group=EXPERIMENTS,
    )
    # -- the server-averaged key encoder (MonAcoSFL) --
    key_sync: str = _f(
        "local",
        "key-mode ema: where the momentum key encoder lives. local: each node starts it as a "
        "copy of the global weights every round; server: it persists across rounds, travels "
        "with the weights under \"key.*\" arrays, is averaged by the server as they are, "
        "and makes the rows each node pushes (MonAcoSFL, ECML PKDD 2024; messages grow by "
        "one encoder)",
        KEY_SYNCS,
        group=EXPERIMENTS,
    )
    # -- end of the server-averaged key encoder --
    trim_beta: float = _f(
        0.2, "fraction trimmed from each tail (aggregation fedtrimmedavg)",
        group=MORE,
    )
    krum_f: int = _f(0, "number of malicious clients tolerated (aggregation krum)", group=MORE)
    collapse_uniformity: float = _f(
        -0.1,
        "warn of collapse when the server's eval uniformity (head) rises above this "
        "while the training loss falls",
        group=MORE,
    )
    stop_on_collapse: bool = _f(False, "end the run early when collapse is suspected", group=MORE)

    def _check(self, need: Need) -> None:
        need(self.wait_nodes_timeout > 0, "wait_nodes_timeout", "must be positive")
        need(0 <= self.trim_beta < 0.5, "trim_beta", "must be in [0, 0.5)")
        need(self.krum_f >= 0, "krum_f", "must be zero or more")
        need(math.isfinite(self.collapse_uniformity), "collapse_uniformity", "must be finite")


@dataclass
class PrivacySettings(_Part):
    """Example-level DP per client: DP-SGD through Opacus, noisy pushes, one accountant per
    client composing both (docs/privacy.md)."""

    dp: bool = _f(False, "train with DP-SGD (per-example clipping, noise, Poisson sampling); "
                         "no loss setting chosen: --objective moment (docs/privacy.md)")
    max_grad_norm: float = _f(1.0, "per-example gradient clipping norm C (dp)")
    noise_multiplier: float = _f(
        0.0, "DP-SGD noise std over C (dp; 0: derive it from --target-epsilon)"
    )
    target_epsilon: float = _f(
        0.0,
        "epsilon the client's whole planned run (DP-SGD steps and push releases, every "
        "round it could be sampled in) must not exceed; sets the noise (dp; 0: none)",
    )
    delta: float = _f(1e-5, "delta of the reported (epsilon, delta) (dp)", group=MORE)
    push_noise: float = _f(
        0.0,
        "Gaussian noise std added to each pushed unit-norm row before renormalising "
        "(dp; 0: pushes are not covered by the privacy accounting)",
    )
    epsilon_budget: float = _f(
        0.0, "stop the run once the largest client epsilon reaches this (dp; 0: no limit)"
    )

    def _check(self, need: Need) -> None:
        need(math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm",
             "must be positive")
        need(math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
             "noise_multiplier", "must be zero or more")
        need(math.isfinite(self.target_epsilon) and self.target_epsilon >= 0, "target_epsilon",
             "must be zero or more")
        need(0 < self.delta < 1, "delta", "must be in (0, 1)")
        need(math.isfinite(self.push_noise) and self.push_noise >= 0, "push_noise",
             "must be zero or more")
        need(math.isfinite(self.epsilon_budget) and self.epsilon_budget >= 0, "epsilon_budget",
             "must be zero or more")
        if not self.dp:
            for name in ("noise_multiplier", "target_epsilon", "push_noise", "epsilon_budget"):
                need(getattr(self, name) == 0, name,
                     "needs --dp true: without DP-SGD the weights sent to the server are not "
                     "private, so noise or a budget would protect nothing; enable --dp or set it to 0")
        else:
            need(self.noise_multiplier > 0 or self.target_epsilon > 0, "noise_multiplier",
                 "is 0 with --dp true and no --target-epsilon: give the DP-SGD noise, or a target "
                 "epsilon to derive it from")
            need(self.noise_multiplier == 0 or self.target_epsilon == 0, "target_epsilon",
                 "and --noise-multiplier are both set: give one (the noise, or the target it is "
                 "derived from)")


@dataclass
class ObjectiveSettings(_Part):
    """The local objective: InfoNCE (the default), or BYOL and the federated method that
    takes the global model into each client's local one (client/divergence.py)."""

    objective: str = _f(
        "infonce",
        "the local loss: infonce (contrastive, with the negatives of the settings above) or "
        "byol (Grill et al. 2020: a predictor on the online projection regresses an EMA "
        "target's projection of the other view, 2 - 2 cos, both view orders; no negatives, "
        "so the queue settings must be off; --key-mode and --temperature do not apply) or "
        "moment (InfoNCE per example: each query against its momentum key and 1,024 "
        "negatives drawn from a Gaussian with the running second moment of the step's keys, "
        "released with noise under --dp true, plus any global rows; needs --key-mode ema, "
        "--in-batch false and --queue-size 0; see docs/privacy.md)",
        OBJECTIVES,
    )
    byol_update: str = _f(
        "fedbyol",
        "objective byol: how a client takes the global online encoder and predictor: "
        "fedbyol (replaces its own), fedu (Zhuang et al. ICCV 2021: the predictor only when "
        "the divergence is below --fedu-threshold) or fedema (Zhuang et al. ICLR 2022: an "
        "EMA of global into local, weight mu = min(lambda x divergence, 1) on the local one)",
        BYOL_UPDATES,
    )
    byol_tau: float = _f(0.99, "objective byol: EMA momentum of the target encoder, per step")
    fedu_threshold: float = _f(
        0.4, "byol-update fedu: the divergence below which the global predictor replaces the "
             "local one (the divergence is the mean over the online encoder's weight tensors "
             "of their L2 distance, as in the authors' code)")
    fedema_lambda: float = _f(
        0.0, "byol-update fedema: lambda of mu = min(lambda x divergence, 1) (0: autoscaled "
             "per client, lambda = --fedema-autoscale / the first divergence it measures)")
    fedema_autoscale: float = _f(
        0.7, "byol-update fedema with --fedema-lambda 0: the mu each client starts from, "
             "in (0, 1] (tau of the paper's autoscaler)")

    def _check(self, need: Need) -> None:
        need(0 <= self.byol_tau <= 1, "byol_tau", "must be in [0, 1]")
        need(math.isfinite(self.fedu_threshold) and self.fedu_threshold >= 0, "fedu_threshold",
             "must be zero or more")
        need(math.isfinite(self.fedema_lambda) and self.fedema_lambda >= 0, "fedema_lambda",
             "must be zero (autoscaled) or more")
        need(0 < self.fedema_autoscale <= 1, "fedema_autoscale", "must be in (0, 1]")


@dataclass
class FedConfig(ObjectiveSettings, PrivacySettings, ServerSettings, QueueSettings,
                FederationSettings, TrainConfig):
    """Federated training: everything local training takes, plus rounds and the queue."""

    def _check(self, need: Need) -> None:
        need(self.key_sync == "local" or (self.key_mode == "ema" and self.objective == "infonce"),
             "key_sync", "server needs --key-mode ema and --objective infonce: only a momentum "
             "key encoder moves and can be averaged")
        if self.objective == "byol":
            _refuse_with_byol(self, need)
            return
        if self.objective == "moment":
            _check_moment(self, need)
            return
        need(self.in_batch or self.queue_size > 0 or self.global_negatives > 0, "in_batch",
             "is off with no local queue and no global negatives: there would be no negatives")
        if self.dp:
            _refuse_under_dp(self, need)

_SCALARS = (bool, int, float, str)


def _field_type(cls: type, f: dataclasses.Field) -> type:
    tp = _type_hints(cls)[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``cls``'s resolved annotations, once per class: resolving them evaluates every
    annotation of the class (about 2 ms for FedConfig), and a node reads its run config,
    field by field, for every message."""
    return typing.get_type_hints(cls)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def key_name(name: str) -> str:
    return name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


#: The help's group of each part's settings, in the order the help shows them.
PART_GROUPS: dict[type, str] = {
    DataSettings: "data and model", ModelSettings: "data and model",
    OptimSettings: "training", ViewSettings: "training", NegativeSettings: "training",
    EvalSettings: "training", FederationSettings: "federation", ServerSettings: "federation",
    QueueSettings: "global queue", PrivacySettings: "privacy (--dp true)",
    ObjectiveSettings: EXPERIMENTS,
}


def setting_group(f: dataclasses.Field) -> str:
    """The group of the help a setting belongs to: its own (one of :data:`HIDDEN_GROUPS`),
    else its part's."""
    if "group" in f.metadata:
        return f.metadata["group"]
    return next(title for part, title in PART_GROUPS.items() if f.name in part.__annotations__)


#: Short value names in the help, so that a flag and its help share a line.
_METAVARS: dict[type, str] = {int: "N", float: "X"}


class _HelpAll(argparse.Action):
    """``--help-all``: the help with every setting, those of :data:`HIDDEN_GROUPS` too."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for action, text in parser._hidden_help.items():
            action.help = text
        parser.print_help()
        parser.exit()


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: set[str] | None = None,
    exclude: set[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one flag per field of the dataclass ``cls``, with its help and default, in the
    groups of :func:`setting_group`; those of :data:`HIDDEN_GROUPS` show only in
    ``--help-all``, which this adds.

    Flags are left out of the parsed namespace unless given (``argparse.SUPPRESS``),
    so :func:`from_args` can tell an explicit flag from a default and layer flags
    over a saved config. ``defaults`` states a command's own defaults (the same
    mapping must be passed to :func:`from_args` as ``base``).
    """
    chosen = [f for f in fields(cls) if (only is None or f.name in only)
              and not (exclude and f.name in exclude)]
    titles = [*dict.fromkeys(PART_GROUPS.values()), *HIDDEN_GROUPS]
    groups = {title: parser.add_argument_group(title) for title in titles
              if any(setting_group(f) == title for f in chosen)}
    hidden = getattr(parser, "_hidden_help", None)
    if hidden is None:
        hidden = parser._hidden_help = {}
        parser.add_argument("--help-all", action=_HelpAll,
                            help="show this help with every setting, the finer ones and those "
                                 "of experiments too")
    defaults = dict(defaults or {})
    for f in chosen:
        tp = _field_type(cls, f)
        default = defaults.get(f.name, f.default)
        shown = str(default).lower() if tp is bool else default
        text = f"{f.metadata.get('help', '')} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if tp is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        else:
            kwargs.update(type=tp, metavar=_METAVARS.get(tp))
        if "choices" in f.metadata:
            kwargs.update(choices=f.metadata["choices"], metavar=None)
        if setting_group(f) in HIDDEN_GROUPS:
            kwargs["help"] = argparse.SUPPRESS
        action = groups[setting_group(f)].add_argument(flag_name(f.name), **kwargs)
        if setting_group(f) in HIDDEN_GROUPS:
            hidden[action] = text


#: The loss ``--dp true`` selects when none of ``DP_LOSS_CHOICES`` was chosen (by a flag, a
#: saved config, a scenario or a command's defaults): the per-example objective that holds
#: its embeddings apart under DP (docs/privacy.md), at the temperature it was measured at,
#: its negative term weighed twice (on the privacy benchmark above weight 1 at every seed
#: without DP, a tie at epsilon 8: bench/results/privacy_bench_negative_weight.md).
DP_LOSS = {"objective": "moment", "in_batch": False, "key_mode": "ema", "temperature": 0.2,
           "queue_temperature": 0.0, "negative_weight": 2.0}
#: The settings whose choice keeps ``--dp true`` from selecting :data:`DP_LOSS`.
DP_LOSS_CHOICES = ("objective", "in_batch", "key_mode", "queue_size")


def from_args(cls: type[T], args: argparse.Namespace, *, base: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from ``base`` (a command's defaults or a saved config) and explicit flags.

    With ``dp`` true and none of :data:`DP_LOSS_CHOICES` chosen, the loss is
    :data:`DP_LOSS` (its temperatures and negative weight only where not chosen either):
    the default loss
    (in-batch negatives, one network for both views) cannot be trained privately.
    """
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in (base or {}).items() if k in known}
    values.update({name: getattr(args, name) for name in known if hasattr(args, name)})
    if values.get("dp") and "objective" in known and not any(k in values for k in DP_LOSS_CHOICES):
        values = {**DP_LOSS, **values}
    return cls(**values)


def to_run_config(cfg: Any) -> dict[str, bool | int | float | str]:
    """Flatten a config into Flower run-config form (``batch-size = 128``)."""
    return {key_name(f.name): getattr(cfg, f.name) for f in fields(cfg)}


def from_run_config(cls: type[T], run_config: Mapping[str, Any]) -> T:
    """Build ``cls`` from a Flower run config, ignoring keys that are not fields.

    Values are coerced to the field's type (TOML gives ints where floats are meant).
    Unknown keys are allowed because a run config also carries keys of other parts
    of the app (output directory, resume path); a removed setting (:data:`REMOVED`) set
    to anything but its old default is refused.
    """
    check_removed({name: run_config[key_name(name)] for name in REMOVED
                   if key_name(name) in run_config}, "the run config")
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = key_name(f.name)
        if key not in run_config:
            continue
        tp = _field_type(cls, f)
        raw = run_config[key]
        values[f.name] = _parse_bool(str(raw)) if tp is bool and isinstance(raw, str) else tp(raw)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as JSON (``{"kind": ClassName, "config": {...}}``)."""
    payload = {"kind": type(cfg).__name__, "config": to_dict(cfg)}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


#: Settings added after runs were saved, with the value that reproduces those runs: a saved
#: config without the key ran that way, whatever today's default is.
ADDED_SINCE = {"weight_standardization": False}

#: Settings removed because they measured no gain (docs/queue.md, "Removed options"), with
#: the value that turned each off (``None``: any value, it acted only with another one on).
#: A saved config holding that value ran as this version runs and loads without it; any
#: other value is refused by :func:`check_removed`, since dropping it would run something
#: else.
REMOVED: dict[str, Any] = {
    "pull_policy": "uniform", "staleness_gamma": 1.0, "false_negative_mode": "off",
    "false_negative_top_k": 0, "false_negative_threshold": 1.0, "debias_tau_plus": 0.0,
    "neighbour_weight": 0.0, "prototypes": 0, "prototype_weight": None,
    "push_timing": "after",
}
#: The last commit that had each setting of :data:`REMOVED`.
REMOVED_AFTER: dict[str, str] = {
    **dict.fromkeys(("pull_policy", "staleness_gamma", "false_negative_mode",
                     "false_negative_top_k", "false_negative_threshold", "debias_tau_plus",
                     "neighbour_weight", "prototypes", "prototype_weight"), "116213d"),
    "push_timing": "d191f04",
}


def check_removed(values: Mapping[str, Any], where: str) -> None:
    """ValueError naming the first removed setting (:data:`REMOVED`) that ``values`` turn on."""
    for name, off in REMOVED.items():
        if name in values and off is not None and values[name] != off:
            raise ValueError(
                f"{where}: {flag_name(name)} {values[name]!r} was removed (it measured no gain: "
                f"docs/queue.md, 'Removed options'), so this version cannot run it. Set it to "
                f"{off!r}, or remove the key, to run plain fedcontrast; or run commit "
                f"{REMOVED_AFTER[name]}, the last that had it")


def read_config_values(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Return ``(kind, values)`` from a file written by :func:`save_config`, without the
    settings this version no longer has: a removed setting left off is dropped, one turned
    on is refused (:func:`check_removed`), any other unknown key is dropped with a warning
    naming it (CHANGELOG.md says what replaced it); a setting the file predates takes the
    value its run had (:data:`ADDED_SINCE`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        payload = json.loads(path.read_text())
        kind, values = str(payload["kind"]), {**ADDED_SINCE, **dict(payload["config"])}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a FedContrast config.json ({exc})") from exc
    check_removed(values, str(path))
    values = {k: v for k, v in values.items() if k not in REMOVED}
    unknown = sorted(set(values) - {f.name for f in fields(FedConfig)})
    if unknown:
        logger.warning("%s: ignoring %s, no longer a setting (see CHANGELOG.md): %s", path,
                       "this key" if len(unknown) == 1 else "these keys", ", ".join(unknown))
    return kind, {k: v for k, v in values.items() if k not in unknown}


def load_config(path: str | Path) -> TrainConfig:
    """Read a config written by :func:`save_config` (re-runnable as it is)."""
    kind, values = read_config_values(path)
    cls = {c.__name__: c for c in (TrainConfig, FedConfig)}.get(kind)
    if cls is None:
        raise ValueError(f"{path}: unknown config kind {kind!r}")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def push_quota(cfg: FedConfig) -> int:
    """Rows one node may push per round (per encoder version): ``--queue-quota``, or a
    quarter of the queue's capacity. It bounds what one node, honest or not, holds of the
    queue: ``quota * (max_age + 1)`` rows at most."""
    return cfg.queue_quota or max(1, cfg.queue_capacity // 4)


def validate(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first setting that is out of range: the choices, the
    plug-ins, then each part's own ranges and the rules between parts, once each."""

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{flag_name(name)} {what} (got {getattr(cfg, name)!r})")

    for f in fields(cfg):
        if "choices" in f.metadata:
            need(getattr(cfg, f.name) in f.metadata["choices"], f.name,
                 "must be one of " + ", ".join(f.metadata["choices"]))
    for kind in plugins.KINDS:  # imports a plug-in's module, calls nothing
        plugins.check(kind, getattr(cfg, kind))
    for part in reversed(type(cfg).__mro__):  # the parts first, then what ties them together
        check = part.__dict__.get("_check")
        if check is not None:
            check(cfg, need)


#: Why each setting below is refused with DP-SGD (shared with :mod:`client.privacy`).
DP_REFUSED = {
    "in_batch": "in-batch negatives couple the examples of a batch, so per-example clipping "
                "no longer bounds one example's influence: set --in-batch false (the "
                "per-example objective that holds its embeddings apart under DP is "
                "--objective moment --in-batch false --key-mode ema; docs/privacy.md)",
    "norm": "BatchNorm mixes the examples of a batch (its statistics leak them) and Opacus "
            "cannot compute per-example gradients through it: use --norm group, layer or instance",
    "queue_size": "the local queue holds un-noised keys of this client's own data, which as "
                  "negatives would couple examples like in-batch negatives: set --queue-size 0 "
                  "(global negatives, noised own pushes and random rows remain)",
}


def _refuse_under_dp(cfg: FedConfig, need: Need) -> None:
    """The combinations DP-SGD cannot make private (:data:`DP_REFUSED`).

    One network for both views (``--key-mode shared``) is not among them: both views are the
    example's own, and Opacus sums the two passes' per-example gradients
    (``tests/test_privacy.py``)."""
    need(not cfg.in_batch, "in_batch", "with --dp true: " + DP_REFUSED["in_batch"])
    need(cfg.norm != "batch", "norm", "with --dp true: " + DP_REFUSED["norm"])
    need(cfg.queue_size == 0, "queue_size", "with --dp true: " + DP_REFUSED["queue_size"])
    need(cfg.pull_scope == "others" or cfg.push_noise > 0, "pull_scope",
         f"{cfg.pull_scope!r} with --dp true and --push-noise 0 would return this client's "
         "own un-noised rows as negatives, coupling its examples: use --pull-scope others "
         "or noise the pushes")


def _check_moment(cfg: FedConfig, need: Need) -> None:
    """What ``--objective moment`` needs: a momentum key, and no negatives of other
    examples' un-noised keys (in-batch or a local queue), so the loss stays per example."""
    need(cfg.key_mode == "ema", "key_mode",
         "must be ema with --objective moment: the negatives follow the keys' second moment, "
         "and with the model itself as key (shared) the embeddings collapse")
    need(not cfg.in_batch, "in_batch",
         "must be false with --objective moment: its negatives are drawn from the keys' "
         "second moment, one query at a time")
    need(cfg.queue_size == 0, "queue_size",
         "must be 0 with --objective moment: the second moment's samples replace the local queue")
    if cfg.dp:
        _refuse_under_dp(cfg, need)


def _refuse_with_byol(cfg: FedConfig, need: Need) -> None:
    """What ``--objective byol`` has no use for or cannot train with."""
    for name in ("global_negatives", "push_fraction", "queue_size"):
        need(not getattr(cfg, name), name,
             "with --objective byol: BYOL uses no negatives; set --global-negatives 0 "
             "--push-fraction 0 --queue-size 0")
    need(not cfg.dp, "dp", "with --objective byol is refused: BYOL's heads need BatchNorm "
                           "(without it the projection collapses), which mixes the examples of "
                           "a batch, so DP-SGD cannot clip per example (docs/privacy.md); set "
                           "--dp false")


def resolve_device(spec: str) -> Any:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a ``torch.device``, checking it exists."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"--device {spec!r} is not a device (use cpu, cuda, cuda:N or auto)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: supported are cpu, cuda, cuda:N and auto")
    return device
