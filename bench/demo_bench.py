"""Does the demo learn? ``train-local`` and ``simulate`` with their defaults on digits.

Runs each command as a user does (``fedcontrast COMMAND --dataset digits --seed S``,
every other setting its default; ``simulate`` is what ``make demo`` runs) and compares,
on held-out digits, the trained encoder with the same architecture at its random
initialisation: kNN (k = 20) and linear probe on the backbone, instance retrieval at the
head. ``simulate``'s figures are what its end-of-run table prints
(:func:`client.train_local.evaluate_run` on its run directory); ``train-local``'s are its
``summary.json``. The demo passes when the trained kNN is above random init at every
seed and by at least 0.01 on the mean, and the mean probe change is not negative.

    python -m bench.demo_bench [--seeds 0,1,2] [--commands train-local,simulate]
                               [--simulate-args "--rounds 5"] [--train-local-args "--epochs 10"]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_result
from client.train_local import evaluate_run

COMMANDS = ("train-local", "simulate")
#: metric of the table -> short name in its header
METRICS = {"knn_backbone": "kNN", "linear_probe_backbone": "probe", "retrieval_head": "retrieval"}
#: The bar the demo has to clear on held-out kNN: the least mean gain over random init.
MIN_MEAN_KNN_GAIN = 0.01


def run_command(command: str, seed: int, out: Path, extra: list[str], timeout: float) -> float:
    """Run ``fedcontrast COMMAND --dataset digits --seed SEED --out OUT EXTRA``; its wall seconds."""
    argv = [sys.executable, "-m", "common.runtime.cli", command, "--dataset", "digits",
            "--seed", str(seed), "--out", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv[2:])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def figures(command: str, seed: int, out: Path) -> dict[str, Any]:
    """Trained and random-init figures of a finished run, as its end-of-run table shows them."""
    if command == "train-local":
        return json.loads((out / "summary.json").read_text())
    return evaluate_run(out, seed=seed)


def verdict(deltas: dict[str, list[float]]) -> str:
    knn, probe = deltas["knn_backbone"], deltas["linear_probe_backbone"]
    ok = (min(knn) > 0 and statistics.mean(knn) >= MIN_MEAN_KNN_GAIN
          and statistics.mean(probe) >= 0)
    return "pass" if ok else "fail"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--commands", default=",".join(COMMANDS),
                        help="comma-separated subset of train-local, simulate (default: both)")
    parser.add_argument("--simulate-args", default="",
                        help='extra flags for simulate, e.g. "--rounds 5" (default: none, the defaults)')
    parser.add_argument("--train-local-args", default="",
                        help="extra flags for train-local (default: none, the defaults)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (default: 1800)")
    parser.add_argument("--name", default="demo_bench", help="result file name (default: demo_bench)")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {"train-local": shlex.split(args.train_local_args) + ["--quiet"],
             "simulate": shlex.split(args.simulate_args)}
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for command in args.commands.split(","):
            deltas: dict[str, list[float]] = {m: [] for m in METRICS}
            for seed in seeds:
                out = Path(tmp) / f"{command}-{seed}"
                wall = run_command(command, seed, out, extra[command], args.timeout)
                fig = figures(command, seed, out)
                row: list[Any] = [command, seed]
                for metric in METRICS:
                    trained, init = fig["trained"][metric], fig["random_init"][metric]
                    deltas[metric].append(trained - init)
                    row += [round(trained, 4), round(init, 4), f"{trained - init:+.4f}"]
                rows.append([*row, round(wall)])
                print(" ".join(map(str, rows[-1])), flush=True)
            rows.append([command, "mean", *[v for m in METRICS for v in
                                            ("", "", f"{statistics.mean(deltas[m]):+.4f}")], ""])
            summary[f"{command}_mean_change"] = {m: round(statistics.mean(d), 4)
                                                 for m, d in deltas.items()}
            summary[f"{command}_verdict"] = verdict(deltas)
    headers = ["command", "seed"] + [f"{short} {part}" for short in METRICS.values()
                                     for part in ("trained", "random init", "change")] + ["wall s"]
    flags = {c: shlex.join(extra[c]) for c in args.commands.split(",")}
    write_result(args.name, headers, rows, summary, notes=(
        "Each row: `fedcontrast COMMAND --dataset digits --seed SEED` with these extra flags: "
        + "; ".join(f"{c}: `{f or '(none)'}`" for c, f in flags.items())
        + ". Held-out digits (360 images at every seed: one image is 0.0028); kNN and probe "
        "on the backbone, retrieval at the head (second view among 256 candidates). The seed "
        "also fixes the train/test split, so each seed has its own random init. Verdict: "
        f"pass when the kNN change is above 0 at every seed and >= {MIN_MEAN_KNN_GAIN} on the "
        "mean, and the mean probe change is >= 0. Wall s: the whole command, on a shared machine."))


if __name__ == "__main__":
    main()
