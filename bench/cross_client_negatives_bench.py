"""What a negative from another client's data must carry to pay under label skew.

Centralized training on the quality benchmark's CIFAR-10 slice (``bench.compare_bench``:
10 clients, Dirichlet alpha 0.1, the same encoder, batch, views and 16 sample-epochs), in
which every batch comes from one client's partition (``compare``'s
``centralized-skewed``). Each step may add K extra negatives: embeddings of items drawn
from the *other* partitions, made by the current model itself, so they are as fresh and
as consistent with the queries as negatives can be. Arms:

- ``skewed``: no extra negatives (``centralized-skewed``);
- ``skewed + detached``: the extra embeddings without gradient, as every queue row is
  (a global queue with no staleness at all);
- ``skewed + head gradient``: backbone without gradient, projection head with it;
- ``skewed + full gradient``: gradient through the whole model, as if the items shared
  the batch (what no exchange of embeddings can give: it needs the items);
- ``mixed``: batches drawn from all data (``compare``'s ``centralized``).

If ``full gradient`` recovers ``mixed`` and ``detached`` does not, the value of
cross-client negatives lies in the gradient they receive, which rows of a queue cannot.

    python -m bench.cross_client_negatives_bench [--data FILE.npz] [--train 3000]
        [--test 5000] [--seeds 0 1 2] [--extra 64]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
from dataclasses import replace

import torch
from torch import Tensor
from torch.nn import functional as F

from bench.common import write_result
from bench.compare_bench import add_setting_arguments, bench_config
from client.data import partition_indices
from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.datasets import Dataset, DatasetError, load_dataset, subset
from common.evaluation import evaluate_encoder
from common.model import build_model
from common.plugins import make_views
from common.schedule import cosine_lr
from simulations.compare import client_batches, examples_per_round, round_batches
from simulations.methods import SIMCLR

ARMS = ("skewed", "skewed + detached", "skewed + head gradient", "skewed + full gradient", "mixed")
METRICS = (("linear_probe_backbone", "linear probe"), ("knn_backbone", "kNN"),
           ("retrieval_head", "retrieval"), ("uniformity_head", "uniformity"))


class ExtraNegativesTrainer(ContrastiveTrainer):
    """A trainer that adds, every step, embeddings of items from other partitions as
    negatives, with gradient through none, the head, or all of the model (``grad``)."""

    def __init__(self, *args, items: Tensor, extra: int, grad: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.items, self.extra, self.grad = items, extra, grad
        self.pool = torch.arange(0)  # indices of the items a step may draw: set per batch

    def _extra_negatives(self) -> Tensor:
        pick = self.pool[torch.randperm(len(self.pool), generator=self.generator)[:self.extra]]
        views = self.augment(self.items[pick], self.generator).to(self.device)  # K x C x H x W
        if self.grad == "full":
            return self.model(views)  # K x D
        if self.grad == "head":
            with torch.no_grad():
                features = self.model.features(views)  # K x F
            return F.normalize(self.model.head(features), dim=1)
        with torch.no_grad():
            return self.model(views)

    def view_loss(self, v1, v2, negatives):
        return super().view_loss(v1, v2, self._extra_negatives())


def train(cfg: FedConfig, data: Dataset, arm: str, parts: list[Tensor], extra: int):
    """One arm for ``cfg.rounds`` round-equivalents of the federated budget; the model."""
    model = build_model(cfg, data.in_channels)
    generator = torch.Generator().manual_seed(cfg.seed)
    lr_at = cosine_lr(cfg.lr, cfg.rounds)
    state = {"round": 1}
    kwargs = {"device": torch.device("cpu"), "generator": generator,
              "lr_schedule": lambda _step: lr_at(state["round"] - 1)}
    grad = {"skewed + detached": "none", "skewed + head gradient": "head",
            "skewed + full gradient": "full"}.get(arm)
    if grad is None:
        trainer = ContrastiveTrainer(model, cfg, **kwargs)
    else:
        trainer = ExtraNegativesTrainer(model, cfg, items=data.x_train, extra=extra, grad=grad, **kwargs)
    owner = torch.empty(len(data.y_train), dtype=torch.long)
    for p, idx in enumerate(parts):
        owner[idx] = p
    others = [torch.cat([q for j, q in enumerate(parts) if j != p]) for p in range(len(parts))]
    batches = client_batches([torch.arange(len(owner))] if arm == "mixed" else parts,
                             cfg.batch_size, generator)
    schedule = round_batches(batches, examples_per_round(cfg, len(owner), cfg.fraction_train))
    for rnd, round_ in zip(range(1, cfg.rounds + 1), schedule, strict=False):  # endless schedule
        state["round"] = rnd
        for idx in round_:
            if grad is not None:
                trainer.pool = others[int(owner[idx[0]])]
            loss, _k, _had = trainer.train_step(data.x_train[idx])
            if not math.isfinite(loss):
                raise FloatingPointError(f"{arm}: loss became {loss} in round {rnd}")
    return trainer.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_arguments(parser)
    parser.add_argument("--extra", type=int, default=64,
                        help="extra negatives per step from other partitions (default: 64)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM",
                        help=f"arms to run, quoted (default: all: {', '.join(ARMS)})")
    parser.add_argument("--name", default="cross_client_negatives",
                        help="result name under bench/results/ (default: %(default)s)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    try:
        full = load_dataset(args.data)
    except DatasetError as exc:
        raise SystemExit(f"{exc}: pass --data PATH.npz (the CIFAR-10 benchmark file is not part "
                         "of a checkout)") from exc
    data = subset(full, args.train, args.test, seed=0)
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        # compare's centralized settings at the quality benchmark's budget
        cfg = replace(bench_config(args.data, args, eval_every=0), seed=seed, **SIMCLR)
        parts = [torch.as_tensor(p, dtype=torch.long)
                 for p in partition_indices(cfg, data.y_train, args.clients)]
        for arm in args.arms:
            model = train(cfg, data, arm, parts, args.extra)
            res = evaluate_encoder(model, data, device=torch.device("cpu"), views=make_views(cfg),
                                   seed=seed, linear_probe=True)
            results[arm].append(res)
            print(f"seed {seed} {arm:24s} " + "  ".join(f"{h} {res[k]:.4f}" for k, h in METRICS),
                  flush=True)

    def cell(arm: str, key: str) -> str:
        values = [r[key] for r in results[arm]]
        spread = (max(values) - min(values)) / 2
        return f"{statistics.fmean(values):.4f} ± {spread:.3f}" if len(values) > 1 else f"{values[0]:.4f}"

    summary: dict[str, object] = {}
    if "skewed" in results:
        for arm in args.arms:
            if arm == "skewed":
                continue
            for key, header in METRICS[:2]:
                diffs = [round(a[key] - b[key], 4) for a, b in zip(results[arm], results["skewed"], strict=True)]
                summary[f"{arm} - skewed, {header}, per seed"] = diffs
    write_result(
        args.name,
        ["arm", *(h for _k, h in METRICS)],
        [[arm, *(cell(arm, k) for k, _h in METRICS)] for arm in args.arms],
        summary=summary,
        notes=(f"CIFAR-10 benchmark file, stratified slice of {args.train} train / {args.test} test "
               f"images, partitions of {args.clients} clients by Dirichlet alpha {args.alpha} (seeded "
               f"like the federated runs), CNN width {args.width} (GroupNorm), batch 64, "
               f"{args.rounds * args.local_epochs} epochs on one process (the quality benchmark's "
               f"sample-epochs), {args.extra} extra negatives per step from the other partitions, "
               f"seeds {args.seeds}; ± is half the range over seeds. Linear probe and kNN on "
               "backbone features, retrieval and uniformity of the head, on the held-out slice."),
    )


if __name__ == "__main__":
    main()
