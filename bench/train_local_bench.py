"""Does ``train-local`` learn? Trained vs random-init encoder over several seeds.

Runs the default ``fedcontrast train-local`` on digits for each seed and compares,
on held-out data and on the same augmented pairs, the trained encoder with the same
architecture at its random initialisation: instance retrieval (second view among
256 candidates), alignment, uniformity, kNN and linear probe, at the backbone and
the projection head. Learning is shown when the worst trained seed beats the best
random-init seed (margin > seed spread). Raw-pixel kNN is given for reference.

    python -m bench.train_local_bench [--seeds 0 1 2] [--epochs 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from bench.common import add_data_arguments, write_result
from client.train_local import train_local
from common.config import TrainConfig

# metric -> True when higher is better
METRICS = {
    "retrieval_head": True, "retrieval_backbone": True,
    "alignment_head": False, "uniformity_head": False, "uniformity_backbone": False,
    "knn_backbone": True, "linear_probe_backbone": True,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    add_data_arguments(parser, "digits")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = TrainConfig(dataset=args.data, seed=seed, epochs=args.epochs, eval_every=0)
            runs.append(train_local(cfg, Path(tmp) / f"seed{seed}", quiet=True))
            print(f"seed {seed}: {runs[-1]['wall_time_s']:.0f} s", flush=True)
    rows, margins = [], {}
    for metric, higher in METRICS.items():
        trained = [r["trained"][metric] for r in runs]
        init = [r["random_init"][metric] for r in runs]
        # margin: worst trained seed against best random-init seed (positive = learned)
        margin = (min(trained) - max(init)) if higher else (min(init) - max(trained))
        spread = max(max(trained) - min(trained), max(init) - min(init))
        margins[metric] = margin
        rows.append([metric, "higher" if higher else "lower", statistics.mean(trained),
                     max(trained) - min(trained), statistics.mean(init), max(init) - min(init),
                     margin, "yes" if margin > spread else "no"])
    pixel = statistics.mean(r["raw_pixel_knn"] for r in runs)
    write_result(
        "train_local_bench",
        ["metric", "better", "trained mean", "trained spread", "random-init mean",
         "random-init spread", "margin (worst trained vs best init)", "margin > spread"],
        rows,
        summary={"dataset": args.data, "seeds": args.seeds, "epochs": args.epochs,
                 "raw_pixel_knn": round(pixel, 4),
                 "mean_wall_time_s": round(statistics.mean(r["wall_time_s"] for r in runs), 1)},
        notes="spread = max - min over seeds. Same held-out pairs for trained and random init.",
    )


if __name__ == "__main__":
    main()
