"""What submitting the app costs before a run starts: the FAB built from the checkout
against the FAB built from the staged copy (``server.deploy.stage_app``), side by side.

``flwr run DIR`` walks every file under ``DIR`` before it filters them by the app's
``fab-include``; a checkout holds ``.venv`` and ``runs/``. Every ``fedcontrast
server`` / ``simulate`` / ``compare`` / ``privacy`` run pays this once. Both arms build
the FAB in this process with Flower's own builder (``flwr.cli.build``), alternating,
``--repeats`` times each; the staged arm includes copying the files. Both FABs must be
byte-identical, or the benchmark fails.

    python -m bench.fab_bench            # about a minute; results in bench/results/
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import write_result
from server.deploy import app_dir, stage_app


def _count_files(root: Path) -> int:
    return sum(len(files) for _dir, _sub, files in os.walk(root))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="builds per arm (default: 5)")
    args = parser.parse_args(argv)
    from flwr.cli.build import build_fab_from_disk

    root = app_dir()
    times: dict[str, list[float]] = {"checkout": [], "staged": []}
    digests: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            start = time.perf_counter()
            fab = build_fab_from_disk(root)
            times["checkout"].append(time.perf_counter() - start)
            digests.add(hashlib.sha256(fab).hexdigest())
            start = time.perf_counter()
            fab = build_fab_from_disk(stage_app(Path(tmp) / "fab-source"))
            times["staged"].append(time.perf_counter() - start)
            digests.add(hashlib.sha256(fab).hexdigest())
        staged_files = _count_files(Path(tmp) / "fab-source")
    if len(digests) != 1:
        raise SystemExit(f"the two arms built different FABs: {sorted(digests)}")
    checkout, staged = (statistics.median(times[k]) for k in ("checkout", "staged"))
    rows = [["checkout (flwr run REPO)", _count_files(root), checkout * 1e3, 1.0],
            ["staged copy (flwr run FLWR_HOME/fab-source)", staged_files, staged * 1e3,
             staged / checkout]]
    write_result(
        "fab_bench",
        ["FAB built from", "files walked", "median ms", "ratio to checkout"],
        rows,
        summary={"speedup": round(checkout / staged, 1), "repeats": args.repeats,
                 "fab_sha256": digests.pop()[:16], "seconds_saved_per_run": round(checkout - staged, 2)},
        notes="Both arms built byte-identical FABs. The checkout arm walks .venv and any runs/ "
              "in the repository; its time grows with them.",
    )


if __name__ == "__main__":
    main()
