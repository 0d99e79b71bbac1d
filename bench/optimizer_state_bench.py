"""Federated optimiser state against a fresh optimiser every round, side by side in one run.

``--optimizer-state federated`` (the default) sends the nodes' Adam moments with the
weights and aggregates them; ``reset`` builds a fresh optimiser every round, as
FedContrast did before. This runs the same federated methods of ``fedcontrast compare``
both ways on the quality benchmark's CIFAR-10 slice, budget, partition and seeds
(``bench.compare_bench``), and reports each method's figures and the per-seed paired
differences (federated - reset). Its recorded result (``bench/results/optimizer_state.md``)
ran at the benchmark's former defaults, 3,000 images and 2 local epochs per round; pass
``--train 3000 --local-epochs 2`` to repeat it.

    python -m bench.optimizer_state_bench [--methods fedavg fedcontrast] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import write_result
from bench.compare_bench import add_setting_arguments, bench_config, slice_or_exit
from simulations.compare import compare
from simulations.reuse import reused_note
from simulations.simulate import Simulation

STATES = ("reset", "federated")
KEYS = (("linear_probe_backbone", "linear probe"), ("knn_backbone", "kNN"),
        ("retrieval_head", "retrieval"), ("uniformity_head", "uniformity"))


def paired(federated: list[dict], reset: list[dict], key: str) -> list[float]:
    """federated - reset per seed (both ran on the same slice, partition and seed)."""
    return [round(a[key] - b[key], 4) for a, b in zip(federated, reset, strict=True)]


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {(max(values) - min(values)) / 2:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedcontrast"],
                        choices=["fedavg", "fedmoco", "fedcontrast"],
                        help="federated methods of `fedcontrast compare` to run both ways")
    parser.add_argument("--name", default="optimizer_state",
                        help="result name under bench/results/ (default: optimizer_state)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="optimizer-state-bench-") as tmp:
        out = args.out or Path(tmp) / "runs"
        sliced = slice_or_exit(args, Path(tmp))
        base = bench_config(str(sliced), args, eval_every=args.rounds)
        for state in STATES:
            report = compare(replace(base, optimizer_state=state), Simulation(num_clients=args.clients),
                             out / state, methods=args.methods, seeds=args.seeds, timeout=6 * 3600,
                             kept_in=args.out)
            results[state] = report["results"]

    rows, summary = [], {}
    for method in args.methods:
        for state in STATES:
            rows.append([method, state, *(spread([r[k] for r in results[state][method]]) for k, _ in KEYS)])
        for key, _header in KEYS[:3]:
            diffs = paired(results["federated"][method], results["reset"][method], key)
            short = key.rsplit("_", 1)[0]
            summary[f"{method}_{short}_federated_minus_reset_per_seed"] = diffs
            summary[f"{method}_{short}_federated_minus_reset"] = round(statistics.fmean(diffs), 4)
    write_result(
        args.name, ["method", "optimizer state", *(h for _k, h in KEYS)], rows, summary=summary,
        notes=(f"Both settings in one run, on the slice, budget and partition of bench.compare_bench: "
               f"{args.train} train / {args.test} test images, {args.clients} clients, Dirichlet "
               f"{args.alpha}, CNN width {args.width}, batch 64, {args.rounds} rounds x "
               f"{args.local_epochs} local epochs, seeds {args.seeds}; ± is half the range over seeds. "
               "reset: a fresh Adam every round; federated: the nodes' Adam moments aggregated "
               "with the weights and continued. "
               + reused_note(r for by_method in results.values() for runs in by_method.values()
                             for r in runs)).strip(),
    )


if __name__ == "__main__":
    main()
