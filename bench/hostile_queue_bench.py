"""Normal queue traffic with and without the worst requests known beside it.

`fedcontrast queue-server` runs as a child process. Normal traffic: honest clients
(one token each, threads of this process) loop over a Pull of 256 float16 rows and a
Push of 32 rows, as trainers do. Hostile traffic, from a second child process so that
building its messages does not compete with the honest clients for a GIL: two valid
tokens each sending, as fast as their per-token limit lets them,

- a Push whose shape has 3 million entries (27 MB, refused by size before parsing),
- 31 MiB of raw bytes to Pull (refused by size),
- the largest seeded Pull the server allows, in float32 with versions (valid, and the
  most work a valid request makes),

and an unauthenticated thread sending garbage. Slices without and with the attack
alternate; the table gives the normal calls' p50 and p99 in each, and the summary the
p99 ratio (with / without).

    python -m bench.hostile_queue_bench            # about 1.5 min; results in bench/results/
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import torch
import torch.nn.functional as F

from bench.common import write_result
from client.stub import QueueClient
from common.config import DEFAULT_MAX_MESSAGE_BYTES
from common.runtime.wire import TOKEN_METADATA_KEY
from proto import negatives_pb2 as pb
from server.service import SERVICE_NAME

DIM, CAPACITY = 128, 4096
HONEST = [f"honest-{i}" for i in range(4)]
HOSTILE = ["hostile-0", "hostile-1"]
ADMIN = "bench-admin"
PULL_ROWS, PUSH_ROWS = 256, 32
#: Threads per hostile token: more than its calls-in-flight limit, so it is always at it.
THREADS_PER_HOSTILE_TOKEN = 6


# ----------------------------------------------------------------- hostile side


def worst_requests() -> list[tuple[str, bytes]]:
    """(method, serialized request) of the most expensive requests known."""
    huge_shape = pb.PushRequest(
        embeddings=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**62] * 3_000_000)
    ).SerializeToString()
    largest_pull = pb.PullRequest(count=CAPACITY, seed=1, include_versions=True,
                                  dtype=pb.DTYPE_FLOAT32).SerializeToString()
    return [("Push", huge_shape), ("Pull", bytes(DEFAULT_MAX_MESSAGE_BYTES - 2**20)),
            ("Pull", largest_pull)]


def attack(address: str, seconds: float) -> None:
    """Child process: send the worst requests for ``seconds``; print the status counts."""
    requests = worst_requests()
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def send(token: str | None, offset: int) -> None:
        with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)
        ]) as channel:
            methods = {m: channel.unary_unary(f"/{SERVICE_NAME}/{m}") for m in ("Push", "Pull")}
            metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
            i = offset
            while time.monotonic() < deadline:
                method, raw = requests[i % len(requests)] if token else ("Pull", os.urandom(64))
                i += 1
                try:
                    methods[method](raw, metadata=metadata, timeout=30)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[f"{method} {code}"] += 1

    threads = [threading.Thread(target=send, args=(token, i))
               for token in HOSTILE for i in range(THREADS_PER_HOSTILE_TOKEN)]
    threads.append(threading.Thread(target=send, args=(None, 0)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(" ".join(f"{k.replace(' ', ':')}={v}" for k, v in sorted(codes.items())), flush=True)


# ------------------------------------------------------------------ honest side


def normal_traffic(address: str, seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of every honest call over ``seconds``, and the failed calls."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def work(token: str, seed: int) -> None:
        nonlocal failures
        rows = F.normalize(torch.randn(PUSH_ROWS, DIM, generator=torch.Generator().manual_seed(seed)),
                           dim=1)
        mine, failed = [], 0
        with QueueClient(address, token, timeout=30, retries=0) as client:
            while time.monotonic() < deadline:
                for call in (lambda: client.pull(PULL_ROWS, max_age=None),
                             lambda: client.push(rows, version=0)):
                    start = time.perf_counter()
                    ok = call()
                    mine.append((time.perf_counter() - start) * 1e3)
                    failed += ok is None or ok is False
        with lock:
            latencies.extend(mine)
            failures += failed

    threads = [threading.Thread(target=work, args=(t, i)) for i, t in enumerate(HONEST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each slice")
    parser.add_argument("--slices", type=int, default=3,
                        help="slices of each kind (without, with the attack), alternating")
    parser.add_argument("--attack", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        attack(args.attack, args.seconds)
        return 0

    torch.set_num_threads(1)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.txt"
        tokens.write_text("".join(f"{t} {i}\n" for i, t in enumerate(HONEST + HOSTILE))
                          + f"{ADMIN} admin\n")
        tokens.chmod(0o600)
        server = subprocess.Popen(
            [sys.executable, "-c", "import sys; from common.runtime.cli import main; sys.exit(main())",
             "queue-server", "--insecure", "--dim", str(DIM), "--capacity", str(CAPACITY),
             "--tokens-file", str(tokens)],
            cwd=root, env=env, stdout=subprocess.PIPE, text=True,
        )
        try:
            address = server.stdout.readline().split("listening on ", 1)[1].split()[0]
            with QueueClient(address, HONEST[0], timeout=30) as seed:  # a full queue to pull from
                for _ in range(CAPACITY // 256):
                    seed.push(F.normalize(torch.randn(256, DIM), dim=1), version=0)
            phases: dict[str, list[float]] = {"without": [], "with": []}
            failures = Counter()
            hostile = Counter()
            for _ in range(args.slices):
                for phase in ("without", "with"):
                    attacker = None
                    if phase == "with":
                        attacker = subprocess.Popen(
                            [sys.executable, "-m", "bench.hostile_queue_bench", "--attack",
                             address, "--seconds", str(args.seconds + 2)],
                            cwd=root, env=env, stdout=subprocess.PIPE, text=True,
                        )
                        time.sleep(2)  # let it reach full rate
                    latencies, failed = normal_traffic(address, args.seconds)
                    phases[phase] += latencies
                    failures[phase] += failed
                    if attacker is not None:
                        out, _ = attacker.communicate(timeout=120)
                        hostile.update({k: int(v) for k, v in
                                        (item.split("=") for item in out.split())})
            with QueueClient(address, ADMIN, timeout=30) as admin:
                rejected = admin.stats()["rejected"]
        finally:
            server.terminate()
            server.wait(timeout=30)

    rows = [[phase, len(lat), statistics.median(lat), p99(lat), failures[phase]]
            for phase, lat in phases.items()]
    ratio = p99(phases["with"]) / p99(phases["without"])
    summary = {
        "normal_p99_ratio_with_over_without": round(ratio, 2),
        "hostile_calls_by_status": dict(sorted(hostile.items())),
        "server_rejected": rejected,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    notes = (
        f"Normal: {len(HONEST)} honest clients (threads, one token each), each looping "
        f"Pull {PULL_ROWS} x {DIM} float16 and Push {PUSH_ROWS} rows; latency per call. "
        f"Attack: {len(HOSTILE)} valid tokens x {THREADS_PER_HOSTILE_TOKEN} threads (the "
        f"server lets each token have 4 calls in flight) cycling a Push with a 3,000,000-entry "
        f"shape, 31 MiB of raw bytes to Pull, and the largest seeded float32 Pull with "
        f"versions; plus one unauthenticated thread sending garbage. Server: "
        f"`fedcontrast queue-server` defaults (8 RPC threads, 32 MiB messages), capacity "
        f"{CAPACITY}, dim {DIM}. {args.slices} slices of {args.seconds:g} s each way, "
        f"alternating."
    )
    write_result("hostile_queue_bench", ["traffic beside it", "normal calls", "p50 ms", "p99 ms",
                                         "failed"], rows, summary, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
