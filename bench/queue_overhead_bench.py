"""What do global negatives cost a client? Training-step time with and without the queue.

One process, one encoder, the same batches: steps that pull ``--negatives`` rows
from the real queue service on loopback (filled with that many unit rows, as in a
running federation) alternate, block by block, with steps that use in-batch
negatives only. Reports the step time of each, their ratio, and the queue's share
of a with-queue step (time inside the Pull call). Then the push at a round's end:
embedding and pushing ``--push-fraction`` of the local data, against the round's
training time.

    python -m bench.queue_overhead_bench [--negatives 4096] [--data digits] [--steps 60]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from bench.common import add_data_arguments, write_result
from client.app import push_keys
from client.stub import GlobalNegatives, QueueClient
from client.trainer import ContrastiveTrainer
from common.config import FedConfig
from common.datasets import load_dataset
from common.encoders import build_encoder
from server.queue import NegativeQueue
from server.service import QueueServer


class TimedSource:
    """A negative source that records the time spent fetching (the Pull round trips)."""

    def __init__(self, inner: GlobalNegatives) -> None:
        self.inner = inner
        self.seconds = 0.0

    def negatives(self, step: int, device: torch.device):
        start = time.perf_counter()
        try:
            return self.inner.negatives(step, device)
        finally:
            self.seconds += time.perf_counter() - start

    def observe(self, keys: torch.Tensor) -> None:
        self.inner.observe(keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--negatives", type=int, default=4096)
    add_data_arguments(parser, "digits")
    parser.add_argument("--steps", type=int, default=60, help="steps per arm (in blocks of 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    cfg = FedConfig(batch_size=args.batch_size, global_negatives=args.negatives,
                    queue_capacity=args.negatives, device="cpu")
    data = load_dataset(args.data)
    x = data.x_train
    queue = NegativeQueue(cfg.queue_capacity, cfg.embedding_dim, max_age=cfg.max_age)
    server = QueueServer(queue, {"bench-token": 0, "other": 1}, port=0)
    server.start()
    try:
        filler = QueueClient(server.address, "other")
        rows = torch.nn.functional.normalize(torch.randn(args.negatives, cfg.embedding_dim), dim=1)
        for i in range(0, args.negatives, 1024):
            filler.push(rows[i:i + 1024], 0)
        filler.close()
        client = QueueClient(server.address, "bench-token")
        torch.manual_seed(0)
        model = build_encoder(cfg.encoder, in_channels=data.in_channels,
                              embedding_dim=cfg.embedding_dim, norm=cfg.norm, width=cfg.width,
                              weight_standardization=cfg.weight_standardization)
        source = TimedSource(GlobalNegatives(client, args.negatives, cfg.max_age, cfg.refresh_every))
        with_q = ContrastiveTrainer(model, cfg, device=torch.device("cpu"), sources=[source])
        without = ContrastiveTrainer(model, cfg, device=torch.device("cpu"),
                                     optimizer=with_q.optimizer)
        gen = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {"queue": [], "in-batch": []}
        for block in range(2 * max(1, args.steps // 10)):
            trainer, arm = (with_q, "queue") if block % 2 == 0 else (without, "in-batch")
            for _ in range(10):
                idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)
                start = time.perf_counter()
                trainer.train_step(x[idx])
                times[arm].append(time.perf_counter() - start)
        pull_share = source.seconds / sum(times["queue"])
        queue.advance(1)  # the next round: pushes carry its version
        start = time.perf_counter()
        push_keys(client, model, x, cfg, 1, gen, torch.device("cpu"))
        push_s = time.perf_counter() - start
        counters = client.counters()
        client.close()
    finally:
        server.stop()
    q, b = statistics.median(times["queue"]), statistics.median(times["in-batch"])
    steps_per_round = -(-x.shape[0] // cfg.batch_size) * cfg.local_epochs
    round_s = steps_per_round * q + push_s
    rows_out = [
        ["in-batch only", f"{b * 1e3:.1f}", f"{statistics.quantiles(times['in-batch'], n=10)[-1] * 1e3:.1f}", "", ""],
        [f"+ {args.negatives} global negatives", f"{q * 1e3:.1f}",
         f"{statistics.quantiles(times['queue'], n=10)[-1] * 1e3:.1f}", f"{q / b:.2f}",
         f"{pull_share:.1%}"],
    ]
    write_result(
        "queue_overhead_bench",
        ["step", "median ms", "p90 ms", "ratio to in-batch", "time in Pull"],
        rows_out,
        summary={
            "step_time_ratio": round(q / b, 3),
            "pull_share_of_queue_step": round(pull_share, 3),
            "push_seconds_per_round": round(push_s, 3),
            "pushed_rows": counters["rows_pushed"],
            "queue_share_of_round": round((pull_share * steps_per_round * q + push_s) / round_s, 3),
            "hits": counters["hits"], "misses": counters["misses"],
        },
        notes=(f"{args.data}, batch {cfg.batch_size}, {cfg.encoder} width {cfg.width}, "
               f"embedding {cfg.embedding_dim}, one torch thread, CPU. Arms alternate in blocks of "
               "10 steps on the same model and optimiser; the queue arm pulls fresh rows every "
               f"step (refresh_every {cfg.refresh_every}) from a real QueueServer on 127.0.0.1. "
               "Queue share of a round = (Pull time + push time) / (a round's steps at the "
               f"queue step time + push), with {steps_per_round} steps per round on the whole "
               "training split."),
    )


if __name__ == "__main__":
    main()
