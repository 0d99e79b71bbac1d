"""What loading the default dataset costs a fresh process: digits through scikit-learn
(``load_digits`` and a stratified ``train_test_split``, as before 1155476) against
``common.datasets`` (the same file and the same indices, without importing scikit-learn),
side by side.

Every process that trains or evaluates on digits pays this once; deployment starts a
ClientApp process for every message, so each round pays it on every node, twice (its
TRAIN and its push query). Each arm runs in a fresh interpreter that has imported torch
already, so the time is the loading alone; the arms alternate, ``--repeats`` times each.
Both arms must produce the same training and test arrays, or the benchmark fails.

    python -m bench.digits_load_bench       # about a minute; results in bench/results/
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import write_result

ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = "import hashlib, json, time, numpy as np, torch\n"
_ARMS = {
    "scikit-learn (load_digits + train_test_split)": """
t = time.perf_counter()
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
b = load_digits()
tr, te = train_test_split(np.arange(len(b.target)), test_size=0.2, stratify=b.target, random_state=0)
x_train, y_train = b.images[tr] / 16.0, b.target[tr]
seconds = time.perf_counter() - t
""",
    "common.datasets (load_dataset('digits'))": """
t = time.perf_counter()
from common.datasets import load_dataset
ds = load_dataset("digits", seed=0)
x_train, y_train = ds.x_train[:, 0].double().numpy(), ds.y_train.numpy()
seconds = time.perf_counter() - t
""",
}
_REPORT = """
digest = hashlib.sha256(np.ascontiguousarray(x_train, dtype=np.float64).tobytes()
                        + np.asarray(y_train, dtype=np.int64).tobytes()).hexdigest()
print(json.dumps({"seconds": seconds, "digest": digest}))
"""


def _one(code: str) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + code + _REPORT], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return float(record["seconds"]), str(record["digest"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per arm (default: 5)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in _ARMS}
    digests: set[str] = set()
    for _ in range(args.repeats):
        for name, code in _ARMS.items():
            seconds, digest = _one(code)
            times[name].append(seconds)
            digests.add(digest)
    if len(digests) != 1:
        raise SystemExit(f"the two arms loaded different training data: {sorted(digests)}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = medians[next(iter(_ARMS))]
    rows = [[name, m * 1e3, min(times[name]) * 1e3, m / baseline] for name, m in medians.items()]
    ours = medians[list(_ARMS)[1]]
    write_result(
        "digits_load_bench",
        ["digits loaded through", "median ms", "min ms", "ratio to scikit-learn"],
        rows,
        summary={"speedup": round(baseline / ours, 1), "repeats": args.repeats,
                 "seconds_saved_per_process": round(baseline - ours, 2),
                 "train_sha256": digests.pop()[:16]},
        notes="Both arms gave byte-identical training images and labels (seed 0). Each time is "
              "one fresh interpreter's, torch already imported; most of the scikit-learn arm is "
              "importing sklearn.datasets and sklearn.model_selection (SciPy under them).",
    )


if __name__ == "__main__":
    main()
