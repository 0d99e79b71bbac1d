"""fedavg, fedcontrast and FedEMA at ResNet-18 scale on one CUDA device, in one process.

The GPU host this is prepared for has torch, grpcio, protobuf, scikit-learn and
matplotlib, but not Flower, Ray or Opacus, and no package registry. So the federation's
rounds run in this process (:mod:`simulations.in_process`): every client's own round
(:func:`client.round.train_round`, :func:`client.byol_round.train_byol_round`), FedAvg,
and for fedcontrast the real queue service on loopback; the clients take turns on the
one GPU, so each holds its model there only while it trains. ``--client-gpus`` of
``simulate`` is tested on the CPU; this measures what the GPU gives per method: seconds
per round, examples per second, peak GPU memory, and the encoder's kNN, linear probe
and retrieval against the same encoder at random init.

Run it from the repository root (nothing to install); only 64 MiB travel with a working
tree, so cut a slice of the benchmark file first and carry it::

    python -m bench.gpu_bench --write-slice .data/cifar_slice.npz --data ../shared/data/cifar10_jpeg.npz
    python -m bench.gpu_bench --data .data/cifar_slice.npz            # on the GPU host

Defaults (10,000 / 2,000 images, 10 clients, Dirichlet 0.1, ResNet-18 of width 64,
batch 256, 3 rounds of 1 local epoch per method) are sized to finish the three methods
within about 5 minutes on one H100; ``--budget-s`` stops a method's rounds early when its
share of the budget is spent, and the table says how many rounds each ran. On a CPU,
``--encoder cnn --width 4`` and a few hundred images make a smoke test (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import CIFAR_DATA, add_data_arguments, write_result
from client.data import partition_indices
from common.config import FedConfig, resolve_device
from common.datasets import load_dataset, subset
from common.evaluation import evaluate_encoder
from common.model import build_model
from common.plugins import make_views
from simulations.in_process import run_federation
from simulations.methods import method_config

METHODS = ("fedavg", "fedcontrast", "fedema")
REPORTED = (("knn_backbone", "kNN"), ("linear_probe_backbone", "linear probe"),
            ("retrieval_head", "retrieval"))


def write_slice(source: str, n_train: int, n_test: int, target: Path) -> Path:
    """A stratified slice of an ``.npz`` as uint8 images, small enough to travel."""
    data = subset(load_dataset(source), n_train, n_test, seed=0)

    def uint8_nhwc(x: torch.Tensor) -> np.ndarray:
        return (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)

    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, x_train=uint8_nhwc(data.x_train), y_train=data.y_train.numpy(),
             x_test=uint8_nhwc(data.x_test), y_test=data.y_test.numpy(),
             class_names=np.array(data.class_names))
    return target


def base_config(args: argparse.Namespace) -> FedConfig:
    return FedConfig(dataset=args.data, encoder=args.encoder, width=args.width,
                     batch_size=args.batch_size, rounds=args.rounds, local_epochs=args.local_epochs,
                     partitioner="dirichlet", dirichlet_alpha=args.alpha, min_nodes=1,
                     device=args.device, eval_every=0, seed=args.seed)


def run_method(method: str, base: FedConfig, data, xs: list[torch.Tensor], deadline: float,
               device: torch.device) -> dict[str, float | int | str]:
    """One method's federation, evaluated; its row of figures."""
    cfg = method_config(method, base)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start = time.perf_counter()
    model, records = run_federation(cfg, xs, data.in_channels,
                                    on_round=lambda _record, _model: time.monotonic() > deadline)
    train_s = time.perf_counter() - start
    views = make_views(cfg)
    trained = evaluate_encoder(model.to(device), data, device=device, views=views, seed=cfg.seed,
                               linear_probe=True)
    initial = evaluate_encoder(build_model(cfg, data.in_channels).to(device), data, device=device,
                               views=views, seed=cfg.seed, linear_probe=True)
    examples = sum(r.examples for r in records)
    row: dict[str, float | int | str] = {
        "method": method, "rounds": len(records), "s_per_round": train_s / max(1, len(records)),
        "examples_per_s": examples / train_s if train_s else 0.0,
        "peak_gpu_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else 0.0)}
    for key, _ in REPORTED:
        row[key], row[f"{key}_random_init"] = trained[key], initial[key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser, str(CIFAR_DATA), train=10_000, test=2_000)
    parser.add_argument("--write-slice", type=Path, default=None,
                        help="write the --train/--test slice of --data to this .npz and stop")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=(*METHODS, "fedcontrast-key"))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="seconds of training for all methods together; a method whose share "
                             "is spent stops after its current round")
    parser.add_argument("--name", default="gpu_bench", help="result name in bench/results/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.write_slice is not None:
        print(f"written: {write_slice(args.data, args.train, args.test, args.write_slice)}")
        return
    device = resolve_device(args.device)
    data = load_dataset(args.data)
    if data.x_train.shape[0] > args.train:
        data = subset(data, args.train, args.test, seed=0)
    base = replace(base_config(args), device=str(device))
    parts = partition_indices(base, data.y_train, args.clients)
    xs = [data.x_train[torch.as_tensor(p, dtype=torch.long)] for p in parts]
    rows = []
    share = args.budget_s / len(args.methods)
    for method in args.methods:
        rows.append(run_method(method, base, data, xs, time.monotonic() + share, device))
    headers = ["method", "rounds", "s/round", "examples/s", "peak GPU GiB",
               *[f"{h} (random init)" for _, h in REPORTED]]
    table = [[r["method"], r["rounds"], f"{r['s_per_round']:.1f}", f"{r['examples_per_s']:.0f}",
              f"{r['peak_gpu_gib']:.2f}",
              *[f"{r[k]:.3f} ({r[f'{k}_random_init']:.3f})" for k, _ in REPORTED]] for r in rows]
    write_result(args.name, headers, table, summary={"device": str(device), "clients": args.clients,
                                                     "train_images": int(data.x_train.shape[0])},
                 notes="Rounds run in one process (simulations/in_process.py): clients take turns "
                       "on the device; fedcontrast's queue is the real service on loopback.")


if __name__ == "__main__":
    main()
