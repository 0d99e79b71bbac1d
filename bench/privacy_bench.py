"""Privacy cost: private contrastive training against its non-private references, and
DP-SGD step time.

1. Step time, side by side in this process: the same encoder, batch and negatives,
   blocks of plain steps alternating with blocks of DP-SGD steps (Opacus per-example
   gradients, clipping, noise); the ratio is the DP-SGD overhead.
2. The table: per seed, the ``fedcontrast privacy`` sweep (its per-example objective,
   ``--objective moment``, no queue rows) at epsilon 8 and without DP, its non-private
   default-loss reference (in-batch negatives), and the same private run with the queue's
   noisy rows (``QUEUE_ROWS``); at the first seed also epsilon 1 and 4. Every arm has the
   same data, encoder, rounds and batch (equal examples processed), and starts from the
   same encoder: by default the random init pretrained for 10 epochs on 20,000 synthetic
   dead-leaves images (``--pretrain-epochs``; no one's data, no privacy cost;
   ``common/synthetic.py``, after Baradad et al. 2021 and Tang et al. 2023), once per seed.
   Reported: each arm's mean and half-range over seeds, the random-init and pretrained
   encoders, each arm's share of the default loss's gain over random init, and its gain
   over the pretrained start (what its own training added).

    python -m bench.privacy_bench [--data PATH.npz] [--train 10000 --test 5000] [--seeds 0 1 2]
    python -m bench.privacy_bench --data digits     # the same on the embedded digits
    python -m bench.privacy_bench --steps-only      # the step-time part alone
    python -m bench.privacy_bench --pretrain-epochs 0   # every run from random init
    python -m bench.privacy_bench --negative-weights 1,2 --no-queue-arm   # two weights

The per-example runs weigh their negative term as ``--dp true`` does (``--negative-weight``
2); ``--negative-weights 1,2`` runs every arm at weight 1 and the per-example runs of
``--epsilons`` once more at weight 2, from the same start and seeds;
``--no-queue-arm`` leaves out the runs with the queue's rows; ``--name`` names the result
files (``bench/results/NAME.{md,json}``).

Defaults: 2 clients of 5,000 images each (IID), batch 256, 8 rounds x 1 local epoch, CNN
width 16, embedding dimension 32, delta 1e-5, each seed's runs from one encoder pretrained
on synthetic images: 14 runs, 73 minutes on 2 cores, the pretraining included, a
low-priority pilot beside it for about 12 of them
(``bench/results/privacy_bench.md``, 2026-12-06, 151ae3c, at negative weight 1; from
random init, at 6a07da1, 65 minutes: ``docs/experiments.md``).
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
from simulations.privacy import SWEEP_DEFAULTS, sweep
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
        return ContrastiveTrainer(model, cfg, device=torch.device("cpu"),
                                  sources=[Fixed()] if cfg.global_negatives else [], dp=dp)

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


#: The figures the table reports, and their headers.
FIGURES = (("linear_probe_backbone", "linear probe"), ("knn_backbone", "kNN"),
           ("retrieval_head", "retrieval"), ("uniformity_head", "uniformity"))
#: The figures whose gain over random init is reported as a share of the default loss's.
GAINS = FIGURES[:3]
DEFAULT_ARM = "no DP, default loss (in-batch negatives)"


def arm_name(result: dict) -> str:
    """The table's name for one run of a sweep."""
    if result["axis"] == "default loss":
        return DEFAULT_ARM
    queue = "queue rows" if "global" in result["negatives"] else "no queue rows"
    weight = result.get("negative_weight", 1.0)
    queue += f", negative weight {weight:g}" if weight != 1 else ""
    eps = result["target_epsilon"]
    return (f"no DP, per-example, {queue}" if math.isinf(eps)
            else f"epsilon {eps:g}, per-example, {queue}")


def aggregate(runs: list[tuple[int, dict]], random_init: dict[int, dict],
              pretrained_init: dict[int, dict] | None = None,
              ) -> tuple[list[str], list[list[str]], dict]:
    """Per arm over seeds: mean and half-range of each figure, and the share of the default
    loss's mean gain over random init; with ``pretrained_init`` (every run started from
    the synthetically pretrained encoder) also its row and each arm's mean gain over it,
    what the run's training added. Returns headers, rows and a summary."""
    arms: dict[str, list[tuple[int, dict]]] = {}
    for seed, result in runs:
        arms.setdefault(arm_name(result), []).append((seed, result))

    def spread(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.4f}" + (f" ± {(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else "")

    def gain(members: list[tuple[int, dict]], key: str, start: dict[int, dict]) -> float:
        return statistics.fmean(r[key] - start[s][key] for s, r in members)

    reference = arms.get(DEFAULT_ARM)
    headers = ["arm", "seeds", "reported ε", "DP-SGD σ", *(h for _k, h in FIGURES),
               "share of the default loss's gain (probe / kNN / retrieval)"]
    if pretrained_init:
        headers.append("over the pretrained start (probe / kNN / retrieval)")
    seeds = sorted(random_init)

    def shares_of(start: list[tuple[int, dict]]) -> str:
        """This start's or arm's gains over random init as shares of the default loss's."""
        refs = [gain(reference, k, random_init) if reference else 0.0 for k, _h in GAINS]
        return " / ".join(f"{gain(start, k, random_init) / ref:.0%}" if ref > 0 else "–"
                          for (k, _h), ref in zip(GAINS, refs, strict=True))

    rows = [["random init", ",".join(map(str, seeds)), "–", "–",
             *(spread([random_init[s][k] for s in seeds]) for k, _h in FIGURES), "–"]]
    if pretrained_init:
        rows[0].append("–")
        start = [(s, pretrained_init[s]) for s in seeds]
        rows.append(["pretrained init (synthetic images, no data)", ",".join(map(str, seeds)),
                     "–", "–", *(spread([r[k] for _s, r in start]) for k, _h in FIGURES),
                     shares_of(start), "–"])
    summary: dict[str, object] = {}
    for name, members in arms.items():
        eps = [r["epsilon"] for _s, r in members]
        sigma = [v for _s, r in members for v in r["noise_multiplier"] if v > 0]
        for key, _h in GAINS:
            summary[f"{name}: {key} gain"] = round(gain(members, key, random_init), 4)
            if pretrained_init:
                summary[f"{name}: {key} over the pretrained start"] = round(
                    gain(members, key, pretrained_init), 4)
        rows.append([name, ",".join(str(s) for s, _r in members),
                     "∞" if math.isinf(eps[0]) else f"{max(eps):.3g}",
                     ("–" if not sigma else f"{min(sigma):.3g}" if min(sigma) == max(sigma)
                      else f"{min(sigma):.3g}-{max(sigma):.3g}"),
                     *(spread([r[k] for _s, r in members]) for k, _h in FIGURES),
                     shares_of(members),
                     *((" / ".join(f"{gain(members, k, pretrained_init):+.3f}" for k, _h in GAINS),)
                       if pretrained_init else ())])
    return headers, rows, summary


def per_seed(runs: list[tuple[int, dict]], random_init: dict[int, dict],
             pretrained_init: dict[int, dict] | None = None) -> dict:
    """Every run's figures by seed and arm, beside each seed's starts: what a later run
    needs for a paired comparison (the table has means and half-ranges only)."""
    return {"per_seed": [{"seed": seed, "arm": arm_name(r), **{k: r[k] for k, _h in FIGURES}}
                         for seed, r in runs],
            "random_init": random_init, "pretrained_init": pretrained_init}


#: The private arm with the global queue's rows: 256 per step, pushes of 5% at noise 24.
QUEUE_ROWS = {"global_negatives": 256, "push_fraction": 0.05, "push_noise": 24.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, str(CIFAR_DATA), train=10000, test=5000,
                       accepts="digits (used whole) or an .npz, sliced")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--partitioner", default="iid", choices=("iid", "dirichlet"))
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", default="8,inf", help="budgets run at every seed")
    parser.add_argument("--first-seed-epsilons", default="1,4",
                        help="budgets run at the first seed only")
    parser.add_argument("--pretrain-epochs", type=int, default=10,
                        help="every run starts from the encoder pretrained this many epochs on "
                             "synthetic dead-leaves images (no data, no privacy cost; 0: random init)")
    parser.add_argument("--pretrain-images", type=int, default=20000,
                        help="how many dead-leaves images to pretrain on")
    parser.add_argument("--negative-weights", default=None,
                        help="per-example runs at each of these --negative-weight values, side by "
                             "side (the first: every arm; the others: the --epsilons runs; "
                             "default: the one --dp true selects)")
    parser.add_argument("--queue-arm", action=argparse.BooleanOptionalAction, default=True,
                        help="also the private runs with the queue's noisy rows")
    parser.add_argument("--name", default=None,
                        help="result file name (default: privacy_bench, privacy_bench_digits "
                             "on digits, privacy_step_time with --steps-only)")
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
        try:  # a flag out of range (a negative --pretrain-epochs, say): one line, no traceback
            base = FedConfig(**{**SWEEP_DEFAULTS, "dataset": dataset, "rounds": args.rounds,
                                "local_epochs": args.local_epochs, "width": args.width,
                                "embedding_dim": args.embedding_dim, "batch_size": args.batch_size,
                                "partitioner": args.partitioner, "dirichlet_alpha": args.alpha,
                                "eval_every": 0, "device": "cpu", "round_timeout": 3600,
                                "pretrain_epochs": args.pretrain_epochs,
                                "pretrain_images": args.pretrain_images})
            try:
                weights = ([float(w) for w in args.negative_weights.split(",")]
                           if args.negative_weights else [base.negative_weight])
            except ValueError:
                raise ValueError(f"--negative-weights must be numbers separated by commas "
                                 f"(got {args.negative_weights!r})") from None
            for w in weights:  # refused here, before anything runs, unless in_batch is off and w >= 1
                replace(base, negative_weight=w)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        times = step_times(base, load_dataset(dataset).x_train)
        summary: dict[str, object] = {
            "dp_step_overhead": round(times["dp-sgd"] / times["plain"], 2),
            "plain_step_ms": round(times["plain"] * 1e3, 1),
            "dp_step_ms": round(times["dp-sgd"] * 1e3, 1),
        }
        headers, rows = ["arm", "median ms per step"], [["plain", summary["plain_step_ms"]],
                                                        ["dp-sgd", summary["dp_step_ms"]]]
        details = None
        if not args.steps_only:
            sim = Simulation(num_clients=args.clients)
            runs, random_init, pretrained_init = [], {}, {}
            every = [float(e) for e in args.epsilons.split(",")]
            first = [float(e) for e in args.first_seed_epsilons.split(",") if e]
            private = [e for e in every if math.isfinite(e)]
            for i, seed in enumerate(args.seeds):
                cfg = replace(base, seed=seed, negative_weight=weights[0])
                report = sweep(cfg, sim, Path(tmp) / f"seed{seed}",
                               epsilons=every + (first if i == 0 else []),
                               push_noise=base.push_noise, push_axis_epsilon=None,
                               default_loss_reference=True, timeout=6 * 3600, kept_in=None)
                tag = {"negative_weight": weights[0]}
                runs += [(seed, r if r["axis"] == "default loss" else {**r, **tag})
                         for r in report["results"]]
                random_init[seed] = report["random_init"]
                if "pretrained_init" in report:
                    pretrained_init[seed] = report["pretrained_init"]
                pretrained_dir = Path(tmp) / f"seed{seed}" / "pretrained"
                if private and args.queue_arm:  # the same private runs with the queue's noisy rows
                    rows = sweep(replace(cfg, **QUEUE_ROWS), sim, Path(tmp) / f"seed{seed}-queue",
                                 epsilons=private, push_noise=QUEUE_ROWS["push_noise"],
                                 push_axis_epsilon=None, timeout=6 * 3600, kept_in=None,
                                 pretrained_dir=pretrained_dir)
                    runs += [(seed, {**r, **tag}) for r in rows["results"]]
                for w in weights[1:]:  # the same per-example runs, the negative term weighed w
                    rows = sweep(replace(cfg, negative_weight=w), sim, Path(tmp) / f"seed{seed}-w{w:g}",
                                 epsilons=every, push_noise=base.push_noise, push_axis_epsilon=None,
                                 timeout=6 * 3600, kept_in=None, pretrained_dir=pretrained_dir)
                    runs += [(seed, {**r, "negative_weight": w}) for r in rows["results"]]
            headers, rows, gains = aggregate(runs, random_init, pretrained_init or None)
            summary.update(gains)
            summary["runs"] = len(runs)
            details = per_seed(runs, random_init, pretrained_init or None)
    name = args.name or ("privacy_step_time" if args.steps_only
                         else "privacy_bench" + ("_digits" if args.data == "digits" else ""))
    write_result(
        name, headers, rows, summary=summary,
        notes=(f"data {Path(args.data).name} (slice {args.train} train / {args.test} test unless digits), "
               f"{args.clients} client{'s' if args.clients != 1 else ''} ({args.partitioner}), "
               f"CNN width {args.width}, embedding "
               f"dimension {args.embedding_dim}, batch {args.batch_size}, {args.rounds} rounds x "
               f"{args.local_epochs} local epochs; "
               + (f"every run started from the encoder pretrained {args.pretrain_epochs} epochs on "
                  f"{args.pretrain_images} synthetic dead-leaves images (no data); "
                  if args.pretrain_epochs else "every run started from random init; ")
               + f"per-example runs: --objective {base.objective}, "
               f"temperature {base.temperature}, ema key encoder, negative weight "
               f"{' and '.join(f'{w:g}' for w in weights)}; the arms with queue rows: "
               f"{QUEUE_ROWS['global_negatives']} global negatives per step, pushes at rate "
               f"{QUEUE_ROWS['push_fraction']} with noise {QUEUE_ROWS['push_noise']:g}; delta "
               f"{base.delta}. ± is half the range over seeds. Share: each arm's mean gain over "
               "random init as a share of the default loss's (which started from the same init). "
               + ("Over the pretrained start: each arm's mean gain over the pretrained init, "
                  "what its own training added. " if args.pretrain_epochs else "")
               + "Step time: one torch thread, blocks of 5 steps alternating plain and DP-SGD (noise "
               f"1.0, clip {base.max_grad_norm}), same batch size and negatives ({base.objective}, "
               f"{base.global_negatives} fixed rows)."),
        details=details,
    )


if __name__ == "__main__":
    main()
