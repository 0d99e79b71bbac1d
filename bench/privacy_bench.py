"""Privacy cost: the `fedcontrast privacy` sweep on a CIFAR-10 slice, and DP-SGD step time.

1. Step time, side by side in this process: the same encoder, batch and negatives,
   blocks of plain steps alternating with blocks of DP-SGD steps (Opacus per-example
   gradients, clipping, noise); the ratio is the DP-SGD overhead.
2. The sweep: the same simulated federation (10 clients, Dirichlet 0.1 by default, a
   stratified slice of the benchmark file about half the quality benchmark's scale) at
   each target epsilon, plus push noise on/off at epsilon 8 and the non-private run with
   the default loss (in-batch negatives). Reported: the table of ``fedcontrast privacy``
   and the figures at epsilon 8 as a fraction of each non-private run and as a share of
   what it gained over the random-init encoder.

    python -m bench.privacy_bench [--data PATH.npz] [--train 2500 --test 500 --rounds 5]
    python -m bench.privacy_bench --data digits     # the same on the embedded digits
    python -m bench.privacy_bench --data digits --steps-only    # the step-time part alone
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import CIFAR_DATA, add_data_arguments, write_result
from bench.compare_bench import write_slice
from client.privacy import DPSGD
from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.datasets import DatasetError, load_dataset
from common.encoders import build_encoder
from simulations.privacy import COLUMNS, SWEEP_DEFAULTS, markdown_table, sweep
from simulations.simulate import Simulation


def step_times(cfg: FedConfig, x: torch.Tensor, blocks: int = 6, per_block: int = 5) -> dict[str, float]:
    """Median seconds per step, plain vs DP-SGD, same model shape, negatives and batch size."""
    negatives = torch.nn.functional.normalize(torch.randn(cfg.global_negatives, cfg.embedding_dim), dim=1)

    class Fixed:  # the same negatives every step (no queue in this measurement)
        def negatives(self, step, device):
            return negatives

        def observe(self, keys):
            pass

    def trainer(private: bool) -> ContrastiveTrainer:
        torch.manual_seed(0)
        model = build_encoder(cfg.encoder, in_channels=x.shape[1], embedding_dim=cfg.embedding_dim,
                              norm=cfg.norm, width=cfg.width,
                              weight_standardization=cfg.weight_standardization)
        dp = (DPSGD(noise_multiplier=1.0, max_grad_norm=cfg.max_grad_norm, num_examples=x.shape[0],
                    batch_size=cfg.batch_size) if private else None)
        return ContrastiveTrainer(model, cfg, device=torch.device("cpu"), sources=[Fixed()], dp=dp)

    arms = {"plain": trainer(False), "dp-sgd": trainer(True)}
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for block in range(blocks):
        name = "plain" if block % 2 == 0 else "dp-sgd"
        for _ in range(per_block):
            idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)
            start = time.perf_counter()
            arms[name].train_step(x[idx])
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def eps8_figures(report: dict) -> dict[str, float | None]:
    """Epsilon 8 (noised pushes) against each non-private reference: the ratio of the
    figures, and its share of what the reference gained over the random-init encoder (a
    ratio near 1 means little when neither run is above random init)."""
    res, init = report["results"], report["random_init"]
    eight = [r for r in res if r["target_epsilon"] == 8.0 and r["push_noise"] > 0]
    refs = {"non_private": [r for r in res if math.isinf(r["target_epsilon"]) and r["axis"] == "budget"],
            "default_loss": [r for r in res if r["axis"] == "default loss"]}
    out: dict[str, float | None] = {}
    for key, name in (("linear_probe_backbone", "linear_probe"), ("knn_backbone", "knn"),
                      ("retrieval_head", "retrieval")):
        out[f"{name}_random_init"] = round(init[key], 4)
        for ref_name, ref in refs.items():
            if not (ref and eight):
                continue
            gain = ref[0][key] - init[key]
            out[f"{name}_at_eps8_fraction_of_{ref_name}"] = round(eight[0][key] / ref[0][key], 3)
            out[f"{name}_{ref_name}_gain_over_random_init"] = round(gain, 4)
            out[f"{name}_at_eps8_share_of_{ref_name}_gain"] = (
                round((eight[0][key] - init[key]) / gain, 3) if gain > 0 else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, str(CIFAR_DATA), train=2500, test=500,
                       accepts="digits (used whole) or an .npz, sliced")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epsilons", default="1,4,8,inf")
    parser.add_argument("--steps-only", action="store_true", help="measure step time only")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="privacy-bench-") as tmp:
        try:
            dataset = (args.data if args.data == "digits"
                       else str(write_slice(Path(args.data), args.train, args.test, Path(tmp) / "slice.npz")))
        except DatasetError as exc:
            raise SystemExit(str(exc)) from exc
        base = FedConfig(**{**SWEEP_DEFAULTS, "dataset": dataset, "rounds": args.rounds,
                            "local_epochs": args.local_epochs, "width": args.width, "batch_size": 64,
                            "partitioner": "dirichlet", "dirichlet_alpha": args.alpha,
                            "eval_every": 0, "device": "cpu", "round_timeout": 1800})
        times = step_times(base, load_dataset(dataset).x_train)
        summary: dict[str, object] = {
            "dp_step_overhead": round(times["dp-sgd"] / times["plain"], 2),
            "plain_step_ms": round(times["plain"] * 1e3, 1),
            "dp_step_ms": round(times["dp-sgd"] * 1e3, 1),
        }
        rows: list[list[str]] = []
        if not args.steps_only:
            epsilons = [float(e) for e in args.epsilons.split(",")]
            report = sweep(replace(base), Simulation(num_clients=args.clients), Path(tmp) / "runs",
                           epsilons=epsilons, push_noise=base.push_noise, push_axis_epsilon=8.0,
                           default_loss_reference=True, timeout=6 * 3600, kept_in=None)
            rows = [[c.strip() for c in line.strip("|").split("|")]
                    for line in markdown_table(report).splitlines()[2:] if line.startswith("| ")]
            summary.update(eps8_figures(report))
    headers = [h for _k, h in COLUMNS]
    name = "privacy_bench" + ("_digits" if args.data == "digits" else "")
    write_result(
        name if not args.steps_only else "privacy_step_time",
        headers if rows else ["arm", "median ms per step"],
        rows or [["plain", summary["plain_step_ms"]], ["dp-sgd", summary["dp_step_ms"]]],
        summary=summary,
        notes=(f"data {Path(args.data).name} (slice {args.train} train / {args.test} test unless digits), "
               f"{args.clients} clients, Dirichlet {args.alpha}, CNN width {args.width}, batch 64, "
               f"{args.rounds} rounds x {args.local_epochs} local epochs, ema key encoder, "
               f"{base.global_negatives} global negatives, no in-batch negatives (but in the "
               "default-loss reference), push fraction "
               f"{base.push_fraction} with push noise {base.push_noise}, delta {base.delta}. Step "
               "time: one torch thread, blocks of 5 steps alternating plain and DP-SGD (noise 1.0, "
               f"clip {base.max_grad_norm}), same batch size and {base.global_negatives} fixed negatives."),
    )


if __name__ == "__main__":
    main()
