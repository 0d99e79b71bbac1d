"""Ablation of the negative-sampling options (issue #7): each alone, then the best combination.

At half the scale the quality benchmark (``bench.compare_bench``) had until 2026-12-06
(3,000 train images, 8 rounds x 2 local epochs; it has since moved to 10,000 images and 1
local epoch): a stratified slice of 1,500 train images and 5,000 held-out images (one
accuracy's sampling error about 0.007) of the CIFAR-10 benchmark file
(``../shared/data/cifar10_jpeg.npz``, which a user's checkout does not have: pass
``--data``), 10 clients, Dirichlet alpha 0.1, the benchmark's encoder, batch and views, 8
rounds x 2 local epochs. Rows, each a simulated federation evaluated on the
held-out slice (linear probe and kNN on backbone features):

- ``fedavg`` and plain ``fedcontrast`` (the default FedConfig), every seed of ``--seeds``;
- ``fedcontrast`` with each option alone (:data:`OPTIONS`), the first seed only;
- the best combination, every seed: per family of options (hard negatives, queue
  temperature, normalisation, number of queue negatives, key encoder), the
  single option with the largest linear-probe gain over plain fedcontrast at the same seed
  if positive; with no positive gain, the best option alone.

The pull policies, staleness weighting, false-negative cancellation and debiasing this
benchmark also measured until 116213d, and the push timing it measured until d191f04,
were removed for measuring no gain (docs/queue.md, "Removed options"); their rows stay in
``bench/results/``.

An option "beats the spread" when its gain exceeds plain fedcontrast's seed-to-seed range
(max - min over seeds). This benchmark changes no default: it says where a change would
be supported.

    python -m bench.negatives_ablation_bench [--data FILE.npz|digits] [--train 1500]
        [--test 5000] [--rounds 8] [--local-epochs 2] [--seeds 0 1] [--options NAME ...]

An ``.npz`` file is sliced (``--train``, ``--test``, stratified); any other
dataset spec (``digits`` for a smoke run) is used whole. ``--name`` names the result.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import CIFAR_DATA, add_data_arguments, write_result
from bench.compare_bench import bench_config, write_slice
from common.config import FedConfig
from common.datasets import DatasetError, load_dataset
from common.errors import UsageError
from simulations.compare import run_federated
from simulations.methods import method_config
from simulations.simulate import Simulation

#: name -> (family, settings over plain fedcontrast). One family's options exclude each other.
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "hard negatives beta 1": ("hard negatives", {"hard_negative_beta": 1.0}),
    "queue temperature 0.2": ("queue temperature", {"queue_temperature": 0.2}),
    "queue temperature 1": ("queue temperature", {"queue_temperature": 1.0}),
    "norm instance": ("normalisation", {"norm": "instance"}),
    "norm layer": ("normalisation", {"norm": "layer"}),
    "norm batch": ("normalisation", {"norm": "batch"}),
    "global negatives 16": ("queue negatives", {"global_negatives": 16}),
    "global negatives 512": ("queue negatives", {"global_negatives": 512}),
    "key mode ema": ("key encoder", {"key_mode": "ema"}),
    "key mode frozen": ("key encoder", {"key_mode": "frozen"}),
}
LP, KNN = "linear_probe_backbone", "knn_backbone"


def best_combination(gains: dict[str, float]) -> dict[str, Any]:
    """Settings of the best option per family with a positive gain."""
    best: dict[str, str] = {}
    for name, gain in gains.items():
        family = OPTIONS[name][0]
        if gain > 0 and (family not in best or gain > gains[best[family]]):
            best[family] = name
    chosen = list(best.values())
    if not chosen and gains:
        chosen = [max(gains, key=gains.get)]
    settings: dict[str, Any] = {}
    for name in chosen:
        settings.update(OPTIONS[name][1])
    return settings


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', '-')}={v}" for k, v in settings.items()) or "defaults"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, str(CIFAR_DATA), train=1500, test=5000,
                       accepts="an .npz (sliced) or any other dataset spec (used whole)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS),
                        metavar="NAME", help="options to run alone (default: all)")
    parser.add_argument("--name", default="negatives_ablation", help="result file name")
    parser.add_argument("--timeout", type=float, default=6 * 3600,
                        help="seconds allowed to one federated run")
    parser.add_argument("--retries", type=int, default=1,
                        help="times a failed federated run is started again (on a busy host "
                             "Ray's start can time out)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    sliced = args.data.endswith(".npz")
    if sliced and not Path(args.data).is_file():
        raise SystemExit(
            f"dataset not found: {args.data}. This benchmark runs on the CIFAR-10 benchmark "
            "file, which a user's checkout does not have: pass --data PATH.npz (arrays "
            "x_train, y_train, x_test, y_test), or --data digits for a smoke run"
        )
    sim = Simulation(num_clients=args.clients)
    with tempfile.TemporaryDirectory(prefix="negatives-ablation-") as tmp:
        out = args.out or Path(tmp) / "runs"
        try:
            spec = str(write_slice(Path(args.data), args.train, args.test,
                                   Path(tmp) / "slice.npz")) if sliced else args.data
        except DatasetError as exc:
            raise SystemExit(str(exc)) from exc
        base = bench_config(spec, args, eval_every=args.rounds)
        data = {seed: load_dataset(spec, seed=seed) for seed in args.seeds}

        def run(label: str, cfg: FedConfig, seeds: list[int]) -> list[dict[str, Any]]:
            results = []
            for seed in seeds:
                for attempt in range(args.retries + 1):
                    run_out = out / (re.sub(r"[^A-Za-z0-9.+-]+", "_", label)
                                     + f"-seed{seed}" + (f"-retry{attempt}" if attempt else ""))
                    try:
                        result = run_federated(label, replace(cfg, seed=seed), sim, data[seed],
                                               run_out, args.timeout)
                        break
                    except UsageError as exc:
                        if attempt == args.retries:
                            raise
                        print(f"{exc}; starting it again", flush=True)
                results.append({**result, "seed": seed})
                print(f"{label} seed {seed}: linear probe {results[-1][LP]:.4f}, "
                      f"kNN {results[-1][KNN]:.4f}, {results[-1]['wall_time_s']:.0f} s", flush=True)
            return results

        rows: dict[str, tuple[str, list[dict[str, Any]]]] = {
            "fedavg": ("in-batch negatives only (SimCLR): shared key, no queue",
                       run("fedavg", method_config("fedavg", base), args.seeds)),
            "fedcontrast": ("defaults", run("fedcontrast", base, args.seeds)),
        }
        for name in args.options:
            settings = OPTIONS[name][1]
            rows[name] = (_describe(settings), run(name, replace(base, **settings), args.seeds[:1]))
        plain = {r["seed"]: r for r in rows["fedcontrast"][1]}
        spread = {k: max(r[k] for r in plain.values()) - min(r[k] for r in plain.values())
                  for k in (LP, KNN)}

        def gain(results: list[dict[str, Any]], key: str) -> float:
            """Mean over the row's seeds of (row - plain fedcontrast at the same seed)."""
            return statistics.fmean(r[key] - plain[r["seed"]][key] for r in results)

        gains = {name: gain(rows[name][1], LP) for name in args.options}
        combination = best_combination(gains)
        rows["best combination"] = (_describe(combination),
                                    run("best combination", replace(base, **combination), args.seeds))

    table = []
    beats: list[str] = []
    for name, (settings, results) in rows.items():  # settings: a description
        delta = {k: gain(results, k) for k in (LP, KNN)}
        beat = len(args.seeds) > 1 and name != "fedcontrast" and delta[LP] > spread[LP]
        if beat and name in OPTIONS:
            beats.append(name)
        table.append([name, settings, ",".join(str(r["seed"]) for r in results),
                      _cell([r[LP] for r in results]), _cell([r[KNN] for r in results]),
                      _cell([r["uniformity_head"] for r in results]),
                      "" if name == "fedcontrast" else f"{delta[LP]:+.4f}",
                      "" if name == "fedcontrast" else f"{delta[KNN]:+.4f}",
                      "yes" if beat else "no",
                      round(statistics.fmean(r["wall_time_s"] for r in results))])
    write_result(
        args.name,
        ["row", "settings over plain fedcontrast", "seeds", "linear probe", "kNN",
         "uniformity (head)", "Δ linear probe", "Δ kNN", "Δ linear probe > seed spread",
         "wall time per run (s)"],
        table,
        summary={
            "dataset": f"{args.data} ({args.train} train / {args.test} test slice)"
                       if sliced else f"{args.data} (whole)",
            "clients": args.clients, "dirichlet_alpha": args.alpha, "rounds": args.rounds,
            "local_epochs": args.local_epochs, "seeds": args.seeds,
            "plain_fedcontrast_seed_range": {k: round(v, 4) for k, v in spread.items()},
            "options_beating_the_spread": beats or "none",
            "best_combination": _describe(combination),
            "defaults": "unchanged (this benchmark only reports; change a default only where "
                        "its gain exceeds the seed-to-seed spread)",
            "per_seed": {name: {r["seed"]: {k: round(r[k], 4) for k in (LP, KNN)}
                                for r in results} for name, (_s, results) in rows.items()},
        },
        notes=("Δ = mean over the row's seeds of (row - plain fedcontrast at the same seed); "
               "'> seed spread' compares it with plain fedcontrast's range over seeds (needs "
               "2 or more seeds). Each option alone ran on the first seed only; fedavg, plain fedcontrast and the best combination on every seed "
               "(± is half the range over seeds). Linear probe and kNN (k=20) on backbone "
               "features of the held-out split; uniformity of the projection head. "
               f"Plain fedcontrast = the default FedConfig: {base.global_negatives} global "
               f"negatives, max age {base.max_age}, key mode {base.key_mode}, in-batch "
               f"{base.in_batch}, CNN width {base.width} ({base.norm} norm), batch "
               f"{base.batch_size}."),
    )


if __name__ == "__main__":
    main()
