"""``fedcontrast train-local``: contrastive training on one dataset.

The building block of every client, and the centralized upper bound of the
federated experiments. Writes a run directory (see :mod:`common.runtime.rundir`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.negatives import LocalQueue
from client.trainer import ContrastiveTrainer, cosine_lr
from common import model as run_model
from common.checkpoint import encoder_from_spec, load_encoder, read_checkpoint, save_encoder
from common.config import (
    FedConfig,
    TrainConfig,
    from_args,
    read_config_values,
    resolve_device,
)
from common.datasets import Dataset, load_dataset
from common.encoders import ContrastiveModel
from common.errors import UsageError
from common.evaluation import evaluate_encoder, raw_pixel_knn
from common.plugins import make_views
from common.runtime.rundir import RunDir

logger = logging.getLogger(__name__)

PLOTTED = ("loss", "retrieval_head", "alignment_head", "uniformity_head", "knn_backbone",
           "retrieval_backbone")


def train_local(cfg: TrainConfig, out: Path, *, quiet: bool = False,
                console: Console | None = None,
                trainer_factory: Callable[..., ContrastiveTrainer] = ContrastiveTrainer,
                ) -> dict[str, Any]:
    """Train on ``cfg.dataset`` for ``cfg.epochs`` and write the run directory; return the summary.

    ``trainer_factory``: called as :class:`ContrastiveTrainer` is, to build the trainer (a
    subclass with another loss, or one with DP-SGD; ``bench/objective_pilots.py``).
    """
    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    run = RunDir(out)
    run.write_config(cfg)
    run.write_versions(device=str(device))
    spec = run_model.model_spec(cfg, data.in_channels)
    random_init = run_model.build_model(cfg, data.in_channels).eval()
    model = run_model.initial_model(cfg, data, device)
    pretrained = copy.deepcopy(model).eval() if cfg.pretrain_epochs else None
    views = make_views(cfg)

    def evaluate(m: ContrastiveModel, final: bool = False) -> dict[str, float]:
        return evaluate_encoder(m, data, device=device, views=views, seed=cfg.seed,
                                linear_probe=final)

    steps_per_epoch = max(1, -(-len(data.x_train) // cfg.batch_size))
    sources = [LocalQueue(cfg.queue_size, cfg.embedding_dim)] if cfg.queue_size else []
    trainer = trainer_factory(
        model, cfg, device=device, sources=sources,
        lr_schedule=cosine_lr(cfg.lr, cfg.epochs * steps_per_epoch),
    )
    run.append_metrics({"epoch": 0, "loss": float("nan"), **evaluate(model)})
    start = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=console, disable=quiet, transient=False) as progress:
        epochs = progress.add_task("epochs", total=cfg.epochs, info="")
        steps = progress.add_task("steps", total=steps_per_epoch, info="")
        for epoch in range(1, cfg.epochs + 1):
            progress.reset(steps, total=steps_per_epoch)
            stats = trainer.train_epoch(
                data.x_train,
                on_step=lambda i, n, loss: progress.update(steps, completed=i, info=f"loss {loss:.3f}"),
            )
            row: dict[str, Any] = {"epoch": epoch, **stats.as_dict(),
                                   "elapsed_s": time.perf_counter() - start}
            if cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                row.update(evaluate(model))
            run.append_metrics(row)
            save_encoder(model, spec, run.file("encoder.pt"), epoch=epoch)
            info = f"loss {stats.loss:.3f}"
            if "retrieval_head" in row:
                info += f"  retrieval {row['retrieval_head']:.3f}  kNN {row['knn_backbone']:.3f}"
            progress.update(epochs, advance=1, info=info)
            logger.info("epoch %d/%d %s", epoch, cfg.epochs, info)
    if cfg.epochs == 0:
        save_encoder(model, spec, run.file("encoder.pt"), epoch=0)
    logger.info("measuring the trained encoder beside its random init on held-out %s",
                data.name)
    summary = _summary(cfg, data, device, start, trained=evaluate(model, final=True),
                       random_init=evaluate(random_init, final=True))
    if pretrained is not None:
        summary["pretrained_init"] = evaluate(pretrained, final=True)
    run.write_json("summary.json", summary)
    run.plot("epoch", PLOTTED, title=f"train-local on {data.name}", random_init=summary["random_init"])
    return summary


def _summary(cfg: TrainConfig, data: Dataset, device: torch.device, start: float, *,
             trained: dict[str, float], random_init: dict[str, float]) -> dict[str, Any]:
    """``summary.json`` of a train-local run that started at ``start`` (perf_counter)."""
    return {
        "dataset": data.name,
        "device": str(device),
        "epochs": cfg.epochs,
        "train_examples": len(data.x_train),
        "test_examples": len(data.x_test),
        "wall_time_s": time.perf_counter() - start,
        "trained": trained,
        "random_init": random_init,
        "raw_pixel_knn": raw_pixel_knn(data),
    }


#: The figures a user reads first: what the downstream features and the objective gained.
HEADLINE = ("knn_backbone", "linear_probe_backbone", "retrieval_head", "uniformity_head")
#: How to read the table, one line under it (the random init is the same architecture
#: before training, measured on the same held-out data).
HOW_TO_READ = "change = trained - random init: > 0 is better (< 0 for alignment, uniformity)"


def summary_table(summary: dict[str, Any]) -> Table:
    """What training changed: trained, random init and their difference, headline first."""
    table = Table(title=f"held-out {summary['dataset']}: what training changed",
                  caption=HOW_TO_READ, min_width=len(HOW_TO_READ) + 2)
    table.add_column("metric")
    table.add_column("trained", justify="right")
    table.add_column("random init", justify="right")
    table.add_column("change", justify="right")
    trained, initial = summary["trained"], summary["random_init"]
    keys = [k for k in HEADLINE if k in trained] + [k for k in trained if k not in HEADLINE]
    for key in keys:
        table.add_row(key, f"{trained[key]:.4f}", f"{initial[key]:.4f}",
                      f"{trained[key] - initial[key]:+.4f}")
    table.add_row("knn_raw_pixels", f"{summary['raw_pixel_knn']:.4f}", "", "")
    return table


def evaluate_run(run: Path, dataset: str | None = None, *, seed: int | None = None,
                 device: str = "auto", views: str | None = None) -> dict[str, Any]:
    """Held-out figures of a run's encoder beside the same architecture at random init.

    ``run`` is a run directory (its ``encoder.pt`` and ``config.json``) or a checkpoint;
    ``dataset``, ``seed`` (the data split and the views) and ``views`` default to the
    run's own: another seed would split ``digits`` so that training items are tested.
    Returns ``{"dataset", "trained", "random_init", "raw_pixel_knn"}`` with kNN, linear
    probe, retrieval, alignment and uniformity at the backbone and the head.
    """
    if not run.exists():
        raise UsageError(f"no run directory or encoder checkpoint at {run}")
    run_dir = run if run.is_dir() else run.parent
    kind, base = (read_config_values(run_dir) if (run_dir / "config.json").exists()
                  else (TrainConfig.__name__, {}))
    dataset = dataset or base.get("dataset")
    if not dataset:
        raise UsageError(f"{run_dir} has no config.json: say which data with --dataset")
    # A federated run's settings hold as a FedConfig only (--in-batch false with global
    # negatives, as under DP, is no valid local training).
    cls = FedConfig if kind == FedConfig.__name__ else TrainConfig
    known = {k: v for k, v in base.items() if k in cls.__dataclass_fields__}
    cfg = cls(**{**known, **({"views": views} if views else {})})
    seed = cfg.seed if seed is None else seed
    torch_device = resolve_device(device)
    data = load_dataset(dataset, seed=seed)
    model = load_encoder(run, device=torch_device)
    if model.in_channels != data.in_channels:
        raise UsageError(f"the encoder takes {model.in_channels}-channel items, {dataset} has "
                         f"{data.in_channels}")
    torch.manual_seed(cfg.seed)  # the run's own initialisation, for a like-for-like baseline
    # the trained encoder's own architecture, initialised as the run was
    random_init = encoder_from_spec(read_checkpoint(run)["spec"])
    kw = dict(device=torch_device, views=make_views(cfg), seed=seed, linear_probe=True)
    return {"dataset": data.name, "trained": evaluate_encoder(model, data, **kw),
            "random_init": evaluate_encoder(random_init, data, **kw),
            "raw_pixel_knn": raw_pixel_knn(data)}


def run_evaluate(args: argparse.Namespace) -> int:
    summary = evaluate_run(args.run, args.dataset, seed=args.seed, device=args.device,
                           views=args.views)
    Console().print(summary_table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def run_train_local(args: argparse.Namespace) -> int:
    base = read_config_values(args.config)[1] if args.config else None
    cfg = from_args(TrainConfig, args, base=base)
    out = args.out or Path("runs") / f"train-local-{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    console = Console(stderr=True)
    summary = train_local(cfg, out, quiet=args.quiet, console=console)
    Console().print(summary_table(summary))
    print(f"run directory: {Path(out).resolve()}")
    return 0
