"""Learning curve: what `centralized` and `fedavg` learn against sample budget, on the
CIFAR-10 benchmark file, for two encoder widths.

A point is a number of distinct training images and a number of passes over them; its
sample budget is their product. The default points spend 1, 4 and 16 epochs' worth of a
10,000-image slice (10k, 40k and 160k samples) as passes over those 10,000 images, and
the 4 and 16 epochs' worth again as 1 and 4 passes over 40,000 distinct images, so the
curve says whether more distinct images beat more passes at an equal budget.

``centralized`` trains one encoder on all the point's images (``train_in_process`` of
``compare``); ``fedavg`` splits them over ``--clients`` clients (Dirichlet ``--alpha``)
and runs one round per pass, each of one local epoch, in this process
(:func:`simulations.in_process.run_federation`: the clients' own round code and FedAvg,
without the simulation engine, whose start would dominate the small points). Both use
the settings of ``bench/compare_bench.py`` (batch 64, the defaults that learn).

Every point is evaluated on the same images: the kNN bank and the linear probe's
training set are the 10,000-image slice, the held-out set its ``--test`` test images,
so only the encoder changes between points. kNN (k = 20) and linear probe read the
backbone; retrieval is the head's instance retrieval.

    python -m bench.learning_curve_bench [--data PATH.npz] [--widths 16 32]
        [--points 10000x1 10000x4 10000x16 40000x1 40000x4] [--out DIR]

Each finished point is kept in ``--out`` (one JSON file, with the data, test size,
clients and alpha it ran with) and reused when a command with the same settings runs
again, so a stopped curve goes on where it stopped. Writes
``bench/results/learning_curve.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench.common import CIFAR_DATA, RESULTS_DIR, write_result
from bench.compare_bench import bench_config
from client.data import partition_indices
from common.config import FedConfig
from common.datasets import Dataset, DatasetError, load_dataset, subset
from common.evaluation import evaluate_encoder
from common.model import build_model
from common.plugins import make_views
from simulations.compare import train_in_process
from simulations.in_process import run_federation
from simulations.methods import method_config

METHODS = ("centralized", "fedavg")
REPORTED = (("knn_backbone", "kNN"), ("linear_probe_backbone", "linear probe"),
            ("retrieval_head", "retrieval"))
EVAL_TRAIN = 10_000


def parse_point(text: str) -> tuple[int, int]:
    """``"40000x4"`` -> (40000 images, 4 passes)."""
    try:
        images, passes = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is IMAGESxPASSES, e.g. 10000x4, not {text!r}") from None
    if images < 2 or passes < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need at least 2 images and 1 pass")
    return images, passes


def point_config(args: argparse.Namespace, dataset: str, width: int, passes: int) -> FedConfig:
    """The benchmark's settings with one round (centralized: one round-equivalent) per pass."""
    ns = SimpleNamespace(rounds=passes, local_epochs=1, width=width, alpha=args.alpha)
    return replace(bench_config(dataset, ns, eval_every=0), seed=args.seed)


def evaluate(model: torch.nn.Module, cfg: FedConfig, data: Dataset) -> dict[str, float]:
    device = torch.device("cpu")
    out = evaluate_encoder(model.to(device), data, device=device, views=make_views(cfg),
                           seed=cfg.seed, linear_probe=True)
    return {key: float(out[key]) for key, _ in REPORTED}


def train_point(method: str, cfg: FedConfig, x: torch.Tensor, y: torch.Tensor, in_channels: int,
                clients: int, eval_data: Dataset) -> torch.nn.Module:
    if method == "centralized":
        return train_in_process(method_config(method, cfg), x, eval_data)
    parts = partition_indices(cfg, y, clients)
    xs = [x[torch.as_tensor(p, dtype=torch.long)] for p in parts if len(p) >= 2]
    model, _records = run_federation(method_config(method, cfg), xs, in_channels)
    return model


def run_point(args: argparse.Namespace, method: str, width: int, images: int, passes: int,
              pools: dict[int, tuple[torch.Tensor, torch.Tensor]], eval_data: Dataset) -> dict[str, Any]:
    """One point, reused from ``--out`` when it finished before with the same settings."""
    path = args.out / f"{method}-w{width}-{images}x{passes}-seed{args.seed}.json"
    settings = {"data": str(args.data.resolve()), "test": args.test, "clients": args.clients,
                "alpha": args.alpha}
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("settings") == settings:
            return kept
        print(f"{path.name}: kept with other settings ({kept.get('settings')}); trained again")
    cfg = point_config(args, str(args.data), width, passes)
    x, y = pools[images]
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    model = train_point(method, cfg, x, y, eval_data.in_channels, args.clients, eval_data)
    train_s = time.perf_counter() - start
    row = {"method": method, "width": width, "images": images, "passes": passes, "settings": settings,
           "samples": images * passes, "train_s": round(train_s, 1),
           **evaluate(model, cfg, eval_data)}
    path.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{method:12s} width {width:3d} {images:6d} x {passes:2d}: kNN {row['knn_backbone']:.3f} "
          f"probe {row['linear_probe_backbone']:.3f} retrieval {row['retrieval_head']:.3f} "
          f"({train_s:.0f} s)", flush=True)
    return row


def plot(rows: list[dict[str, Any]], random_init: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(REPORTED), figsize=(5 * len(REPORTED), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], REPORTED, strict=True):
        for (method, width, images) in sorted({(r["method"], r["width"], r["images"]) for r in rows}):
            line = sorted((r["samples"], r[key]) for r in rows
                          if (r["method"], r["width"], r["images"]) == (method, width, images))
            ax.plot(*zip(*line, strict=True), marker="o",
                    linestyle="-" if method == "centralized" else "--",
                    label=f"{method}, width {width}, {images // 1000}k images")
        for width, figures in random_init.items():
            ax.axhline(figures[key], color="grey", linewidth=0.8, linestyle=":")
            ax.text(0.01, figures[key], f"random init, width {width}", fontsize=7, va="bottom",
                    transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_xlabel("training samples (images x passes)")
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=CIFAR_DATA,
                        help="the CIFAR-10 benchmark .npz (not part of a checkout)")
    parser.add_argument("--test", type=int, default=5000, help="held-out images")
    parser.add_argument("--points", type=parse_point, nargs="+",
                        default=[parse_point(p) for p in ("10000x1", "10000x4", "10000x16",
                                                          "40000x1", "40000x4")])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (fedavg)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/learning-curve"),
                        help="one JSON file per finished point, reused by the same command")
    parser.add_argument("--name", default="learning_curve", help="result name in bench/results/")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the library's progress lines; this prints its own
    try:
        curve(args)
    finally:
        logging.disable(logging.NOTSET)


def curve(args: argparse.Namespace) -> None:
    """Every point of ``args`` (trained or reused), then the table and the plot."""
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        full = load_dataset(str(args.data))
    except DatasetError as exc:
        raise SystemExit(f"{exc}: pass --data PATH.npz (the CIFAR-10 benchmark file)") from exc
    eval_data = subset(full, min(EVAL_TRAIN, len(full.y_train)), args.test, seed=0)
    pools = {}
    for images, _ in args.points:
        pool = eval_data if images == len(eval_data.y_train) else subset(full, images, 1, seed=0)
        pools[images] = (pool.x_train, pool.y_train)
    random_init = {w: evaluate(build_model(point_config(args, str(args.data), w, 1), full.in_channels),
                               point_config(args, str(args.data), w, 1), eval_data)
                   for w in args.widths}
    rows = [run_point(args, method, width, images, passes, pools, eval_data)
            for width in args.widths for images, passes in args.points for method in args.methods]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(rows, random_init, RESULTS_DIR / f"{args.name}.png")
    headers = ["method", "width", "images x passes", "samples", "train s",
               *[f"{h} (vs random init)" for _, h in REPORTED]]
    table = [[r["method"], r["width"], f"{r['images']} x {r['passes']}", r["samples"], r["train_s"],
              *[f"{r[k]:.3f} ({r[k] - random_init[r['width']][k]:+.3f})" for k, _ in REPORTED]]
             for r in rows]
    write_result(args.name, headers, table,
                 summary={"random_init": random_init, "test_images": args.test,
                          "sampling_error_one_accuracy": round(math.sqrt(0.25 / args.test), 4)},
                 notes=(f"CIFAR-10 benchmark file; evaluation on the stratified {EVAL_TRAIN}-image "
                        f"slice (kNN bank, probe training) and {args.test} held-out images for every "
                        f"point; fedavg: {args.clients} clients, Dirichlet alpha {args.alpha}, one "
                        "round of one local epoch per pass, in one process; centralized: one "
                        "encoder on all the point's images. Settings of bench/compare_bench.py "
                        f"(batch 64), seed {args.seed}, one thread per run."))


if __name__ == "__main__":
    main()
