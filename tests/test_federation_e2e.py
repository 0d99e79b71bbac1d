"""End to end: a real SuperLink and two real SuperNodes on loopback, runs submitted by `fedcontrast server`.
One node trains on its partition of the run's dataset, the other on a file of its own.

One deployment serves every scenario (each Flower message starts a ClientApp process
that imports torch: rounds cost 15-30 s on two shared cores). The scenarios run in
file order; the last ones kill a SuperNode and start it again, restart the SuperLink
(the clients join the new one by themselves), and look for secrets in every file written.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import secrets_on_disk

from common.checkpoint import read_checkpoint
from common.config import FedConfig, load_config
from common.runtime.flower_env import ProcessTree, flower_env, free_port, wait_for_port
from server.sampling import seeded_sample

pytestmark = pytest.mark.e2e

FEDCONTRAST = str(Path(sys.executable).parent / "fedcontrast")
SMALL = ["--rounds", "2", "--batch-size", "64", "--global-negatives", "256", "--width", "8",
         "--embedding-dim", "16", "--eval-every", "0", "--device", "cpu", "--min-nodes", "2",
         "--round-timeout", "90", "--wait-nodes-timeout", "60"]


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tree = ProcessTree()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # One thread per torch process: the cores are shared by every process here.
        self.env = {**flower_env(root / "link-home"), "OMP_NUM_THREADS": "1"}
        self.clients: list[subprocess.Popen] = []
        self.own_data: list[list[str]] = []
        self.link: subprocess.Popen | None = None

    def start(self) -> None:
        self.start_superlink()
        # Node 0 trains on its partition of the run's dataset; node 1 on a file of its own
        # (`--data-path`, the second half of the digits), as a site with private data would.
        self.own_data = [["--partition-id", "0", "--num-partitions", "2"],
                         ["--data-path", str(self._site_file(self.root / "site1.npz"))]]
        self.clients = [self.start_client(i) for i in range(2)]

    def start_superlink(self) -> None:
        """The SuperLink (again, after a stop: a new one on the same port, a new log)."""
        log = self.root / "superlink.log"
        if log.exists():
            log = self.root / "superlink-restarted.log"
        self.link = self.tree.start(
            ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(self.port)], env=self.env, log=log, cwd=self.root)
        assert wait_for_port("127.0.0.1", self.port, timeout=60), self.log(log.name)

    def start_client(self, i: int) -> subprocess.Popen:
        """SuperNode ``c<i>`` (again, after a kill: same data, state and home; a new log)."""
        log = self.root / f"client{i}.log"
        if log.exists():
            log = self.root / f"client{i}-restarted.log"
        return self.tree.start(
            [FEDCONTRAST, "client", "--superlink", self.address, "--insecure", *self.own_data[i],
             "--client-id", f"c{i}", "--state-dir", str(self.root / f"state{i}"),
             "--flwr-home", str(self.root / f"home{i}")],
            env=self.env, log=log, cwd=self.root)

    @staticmethod
    def _site_file(path: Path) -> Path:
        from common.datasets import load_dataset

        data = load_dataset("digits")
        half = len(data.x_train) // 2

        def images(x: torch.Tensor) -> np.ndarray:
            return (x[:, 0] * 255).round().to(torch.uint8).numpy()

        np.savez(path, x_train=images(data.x_train[half:]), y_train=data.y_train[half:].numpy(),
                 x_test=images(data.x_test), y_test=data.y_test.numpy())
        return path

    def server(self, out: Path, *args: str) -> subprocess.Popen:
        """`fedcontrast server` against this SuperLink, started in the background."""
        return self.tree.start(
            [FEDCONTRAST, "server", "--superlink", self.address, "--insecure", "--out", str(out),
             "--flwr-home", str(self.root / "server-home"), *args],
            env=self.env, log=self.root / f"server-{out.name}.log", cwd=self.root)

    def run_server(self, out: Path, *args: str, timeout: float) -> int:
        proc = self.server(out, *args)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.tree.stop(roots=[proc])
            pytest.fail(f"fedcontrast server did not finish in {timeout} s:\n{self.log(f'server-{out.name}.log')}")

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else f"(no {name})"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("federation"))
    try:
        d.start()
        yield d
    finally:
        d.tree.stop()


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def initial_weights(cfg: FedConfig) -> dict[str, torch.Tensor]:
    from common.encoders import build_encoder

    torch.manual_seed(cfg.seed)
    return build_encoder(cfg.encoder, in_channels=1, embedding_dim=cfg.embedding_dim, norm=cfg.norm,
                         width=cfg.width).state_dict()


@pytest.fixture(scope="module")
def two_round_run(deployment) -> Path:
    """The 2-round run of both nodes; test_resume_continues_numbering goes on from it."""
    run = deployment.root / "run-a"
    rc = deployment.run_server(run, *SMALL, timeout=220)
    assert rc == 0, deployment.log("server-run-a.log") + (run / "server.log").read_text()[-3000:]
    return run


@pytest.mark.timeout(240)
def test_two_clients_two_rounds(deployment, two_round_run):
    run = two_round_run

    for name in ("config.json", "versions.json", "metrics.csv", "metrics.jsonl", "encoder.pt",
                 "queue.pt", "summary.json", "curves.png"):
        assert (run / name).exists(), name
    cfg = load_config(run)
    assert isinstance(cfg, FedConfig) and cfg.rounds == 2 and cfg.width == 8  # re-runnable

    table = rows(run)
    assert [r["round"] for r in table] == [1, 2]
    assert all(r["counted"] == 1 and r["replied"] == 2 for r in table)
    # Round 1's pulls find no row (only finished rounds' rows are pulled): no hit; round 2's do.
    assert table[0]["global_hits"] == 0 and table[0]["global_misses"] == 0
    assert table[1]["global_hits"] > 0
    assert table[-1]["negatives_per_step"] > 0  # round 2 trained on round 1's rows
    assert "knn_backbone" in table[-1] and "knn_backbone" not in table[0]  # eval at the end only

    checkpoint = read_checkpoint(run / "encoder.pt")
    assert checkpoint["round"] == 2
    start = initial_weights(cfg)
    assert any(not torch.equal(start[k], v) for k, v in checkpoint["state_dict"].items())
    # --optimizer-state federated (the default): the nodes' Adam state was aggregated too
    assert float(checkpoint["optimizer_state"]["optimizer.step"]) > 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["counted_rounds"] == 2
    pushed = {slot: c["pushed_rows"] for slot, c in summary["contributors"].items()}
    assert len(pushed) == 2 and all(n > 0 for n in pushed.values())
    # Each node said who it is (client ids c0, c1), and its client got a slot to keep.
    assert sorted(c["client_id"] for c in summary["contributors"].values()) == ["c0", "c1"]
    assert sorted(checkpoint["client_slots"].items()) == sorted(
        (c["client_id"], int(slot)) for slot, c in summary["contributors"].items())
    snapshot = torch.load(run / "queue.pt", weights_only=True)
    assert set(snapshot["contributors"].tolist()) == {0, 1}  # rows from both nodes

    for i in range(2):
        state = json.loads((deployment.root / f"state{i}" / "state.json").read_text())
        assert state["client_id"] == f"c{i}" and state["rounds_trained"] >= 2


@pytest.mark.timeout(420)  # the 2-round run too, when this test runs alone
def test_a_repeated_run_pulls_the_same_negatives_and_ends_with_the_same_encoder(
        deployment, two_round_run):
    # Before the resume below extends the first run. Round 2 of each run pulls the rows the
    # other node pushed in round 1 (--pull-mode reproducible: finished rounds only, seeded
    # pulls over an order that ignores arrival and slots), and each node's round seed
    # depends on the round, not on how much it trained before: the nodes' state
    # directories are the first run's, so they have trained two more rounds since.
    run = deployment.root / "run-a-again"
    rc = deployment.run_server(run, *SMALL, timeout=220)
    assert rc == 0, deployment.log("server-run-a-again.log") + (run / "server.log").read_text()[-3000:]
    first, again = (rows(r) for r in (two_round_run, run))
    assert [r["negatives_per_step"] for r in again] == [r["negatives_per_step"] for r in first]
    assert again[-1]["negatives_per_step"] > 0 and again[0]["negatives_per_step"] == 0
    weights = [read_checkpoint(r / "encoder.pt")["state_dict"] for r in (two_round_run, run)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.timeout(420)  # the 2-round run too, when this test runs alone
def test_resume_continues_numbering(deployment, two_round_run):
    run = two_round_run
    steps_after_2 = float(read_checkpoint(run / "encoder.pt")["optimizer_state"]["optimizer.step"])
    slots = read_checkpoint(run / "encoder.pt")["client_slots"]
    pushed = {c["client_id"]: c["pushed_rows"]
              for c in json.loads((run / "summary.json").read_text())["contributors"].values()}
    rc = deployment.run_server(run, "--resume", str(run), "--rounds", "3", timeout=160)
    assert rc == 0, (run / "server.log").read_text()[-3000:]
    # The optimiser state came back from the checkpoint: round 3 went on counting steps
    # (every round trains the same nodes on the same data, so the same steps).
    steps_after_3 = float(read_checkpoint(run / "encoder.pt")["optimizer_state"]["optimizer.step"])
    assert steps_after_3 == pytest.approx(1.5 * steps_after_2, rel=1e-5)
    table = rows(run)
    assert [r["round"] for r in table] == [1, 2, 3]
    assert table[-1]["counted"] == 1
    assert read_checkpoint(run / "encoder.pt")["round"] == 3
    assert load_config(run).rounds == 3
    assert json.loads((run / "versions.json").read_text())["resumed_from"] == str(run)
    # the queue came back from the snapshot: round 3 is served rows of rounds 1 and 2
    assert table[-1]["queue_version"] == 3 and table[-1]["negatives_per_step"] > 0
    # Each client pushed under the slot it had before the resume (new tokens, same slots),
    # so the restored rows it pushed are still its own to the queue.
    assert read_checkpoint(run / "encoder.pt")["client_slots"] == slots
    contributors = json.loads((run / "summary.json").read_text())["contributors"]
    assert {c["client_id"]: int(slot) for slot, c in contributors.items()} == slots
    # The rows each pushed count from round 1, not from the resume: each pushes as many per round.
    assert {c["client_id"]: c["pushed_rows"] for c in contributors.values()} == \
        {client: rows * 3 // 2 for client, rows in pushed.items()}
    assert set(torch.load(run / "queue.pt", weights_only=True)["contributors"].tolist()) == \
        set(slots.values())


@pytest.mark.timeout(200)
def test_a_robust_rule_aggregates_the_real_nodes_replies_with_the_queue_on_a_fixed_port(deployment):
    # The run aggregates with a robust rule, on the real nodes' replies, and serves the
    # queue on a fixed port, as across machines.
    run = deployment.root / "run-fixed-port"
    queue_port = free_port()
    rc = deployment.run_server(run, "--rounds", "1", *SMALL[2:],
                               "--aggregation", "fedmedian", "--queue-host", "127.0.0.1",
                               "--queue-port", str(queue_port), timeout=180)
    assert rc == 0, deployment.log("server-run-fixed-port.log") + (run / "server.log").read_text()[-3000:]
    assert f"queue at 127.0.0.1:{queue_port} " in (run / "server.log").read_text()
    cfg = load_config(run)
    assert cfg.aggregation == "fedmedian"
    checkpoint = read_checkpoint(run / "encoder.pt")
    assert checkpoint["round"] == 1 and float(checkpoint["optimizer_state"]["optimizer.step"]) > 0
    start = initial_weights(cfg)
    assert any(not torch.equal(start[k], v) for k, v in checkpoint["state_dict"].items())
    (row,) = rows(run)
    assert row["pushed_rows"] > 0 and row["push_failures"] == 0
    assert row["queue_version"] == 1 and row["queue_size"] == row["pushed_rows"]


@pytest.mark.timeout(120)
def test_a_failed_server_app_is_reported(deployment):
    # `flwr run` exits 0 whatever the ServerApp did; the command must check the status.
    run = deployment.root / "run-bad"
    rc = deployment.run_server(run, *SMALL, "--dataset", "/nonexistent/data.npz", timeout=100)
    assert rc == 1
    terminal = deployment.log("server-run-bad.log")  # one line with the ServerApp's error
    assert re.search(r"run \d+ failed: ValueError: .*/nonexistent/data\.npz", terminal), terminal
    assert "Traceback" not in terminal
    assert "nonexistent/data.npz" in (run / "server.log").read_text()


@pytest.mark.timeout(200)
def test_a_client_app_that_raises_is_reported_and_the_round_goes_on(deployment):
    # Node 0 splits the run's dataset, and no 2-way split can give each part 11 of the
    # digits' 10 classes: its ClientApp raises. Node 1 trains on a file of its own.
    run = deployment.root / "run-raise"
    rc = deployment.run_server(run, *SMALL, "--rounds", "1", "--min-nodes", "1",
                               "--partitioner", "shards", "--classes-per-client", "11", timeout=180)
    assert rc == 0, deployment.log("server-run-raise.log") + (run / "server.log").read_text()[-3000:]
    (row,) = rows(run)
    assert row["sampled"] == 2 and row["replied"] == 1 and row["failed"] == 1 and row["counted"] == 1
    log = (run / "server.log").read_text()
    assert "classes_per_partition must be in 1..10" in log, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["counted_rounds"] == 1
    pushed = sorted(c["pushed_rows"] for c in summary["contributors"].values())
    assert pushed[0] == 0 and pushed[1] > 0  # only the node that trained pushed rows


@pytest.mark.timeout(200)
def test_a_run_in_which_no_round_counted_fails_with_one_line_on_each_side(deployment):
    # As above, node 0's partition cannot be made, and --min-nodes 2 wants both nodes.
    run = deployment.root / "run-uncounted"
    client_log = deployment.root / "client0.log"
    seen = client_log.stat().st_size
    rc = deployment.run_server(run, *SMALL, "--rounds", "1", "--partitioner", "shards",
                               "--classes-per-client", "11", timeout=180)
    terminal = deployment.log("server-run-uncounted.log")
    assert rc == 1, terminal
    (row,) = rows(run)
    assert row["counted"] == 0 and row["failed"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("failed: NoRoundCounted: none of the 1 rounds counted")
    assert summary["counted_rounds"] == 0
    assert "failed: NoRoundCounted" in terminal and "lower --min-nodes" in terminal, terminal
    # The node says once what is wrong and what to do; no traceback on its terminal.
    with client_log.open("rb") as log:
        log.seek(seen)
        said = log.read().decode(errors="replace")
    assert "client c0 cannot answer the train message: partition 0 of 2" in said, said[-3000:]
    assert "start this client with a --num-partitions" in said and "Traceback" not in said


@pytest.mark.timeout(200)
def test_a_private_run_stops_at_the_round_that_reaches_its_epsilon_budget(deployment):
    # DP-SGD and noised pushes in the real ClientApps; each node's accountant reports its
    # epsilon, and the server stops the run at the round whose largest epsilon reaches
    # --epsilon-budget (here the first: any training spends more than 0.01).
    run = deployment.root / "run-budget"
    rc = deployment.run_server(run, *SMALL, "--rounds", "3", "--dp", "true", "--in-batch", "false",
                               "--key-mode", "ema", "--noise-multiplier", "1.0",
                               "--push-noise", "0.5", "--epsilon-budget", "0.01", timeout=180)
    assert rc == 0, deployment.log("server-run-budget.log") + (run / "server.log").read_text()[-3000:]
    (row,) = rows(run)
    assert row["round"] == 1 and row["counted"] == 1 and row["pushes_private"] == 1
    assert 0.01 <= row["epsilon"] == row["epsilon_max"] < math.inf
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("stopped early: privacy budget reached at round 1")
    assert summary["privacy"]["epsilon_max"] == row["epsilon_max"]
    assert summary["last_round"] == 1 and read_checkpoint(run / "encoder.pt")["round"] == 1


@pytest.mark.timeout(240)
def test_stop_on_collapse_ends_a_real_run_at_the_round_it_suspects_collapse(deployment):
    # Uniformity of unit vectors is at least -8, so with a bound of -100 every evaluated
    # round whose training loss fell is a suspected collapse: the first such round ends
    # the run. In-batch negatives only, so the loss of a later round is not raised by
    # queue rows the first round did not have.
    run = deployment.root / "run-collapse"
    rc = deployment.run_server(run, *SMALL, "--rounds", "4", "--eval-every", "1",
                               "--global-negatives", "0", "--push-fraction", "0",
                               "--collapse-uniformity", "-100", "--stop-on-collapse", "true",
                               timeout=220)
    assert rc == 0, deployment.log("server-run-collapse.log") + (run / "server.log").read_text()[-3000:]
    table = rows(run)
    last = table[-1]["round"]
    assert 2 <= last < 4 and table[-1]["collapse_warning"] == 1
    assert all(r["collapse_warning"] == 0 for r in table[:-1])
    assert table[-1]["train_loss"] < table[-2]["train_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == f"stopped early: collapse suspected at round {last}"


@pytest.mark.timeout(120)
def test_a_run_needing_more_nodes_than_are_online_fails_at_the_wait_deadline(deployment):
    run = deployment.root / "run-three"
    rc = deployment.run_server(run, *SMALL, "--min-nodes", "3", "--wait-nodes-timeout", "3",
                               timeout=100)
    assert rc == 1, deployment.log("server-run-three.log")
    log = (run / "server.log").read_text()
    assert "2 node(s) online after waiting 3 s, --min-nodes is 3" in log
    # The terminal gets one line saying what happened and what to do, not the traceback.
    terminal = deployment.log("server-run-three.log")
    assert "failed: NotEnoughNodes: 2 node(s) online after waiting 3 s, --min-nodes is 3: start " \
           "more clients or lower --min-nodes" in terminal and "Traceback" not in terminal, terminal
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("failed: NotEnoughNodes") and summary["last_round"] == 0
    assert not (run / "metrics.jsonl").exists() or not rows(run)


@pytest.mark.timeout(240)
def test_seeded_sampling_draws_the_clients_its_seed_names_in_a_real_run(deployment):
    # One of the two nodes per round. Each real ClientApp answers the identify QUERY with
    # the client id its SuperNode was started with; the draws then follow the seed, not
    # the node ids the SuperLink gave out. The seed is one whose three draws use both nodes.
    seed = next(s for s in range(20)
                if len({seeded_sample(["c0", "c1"], 1, s, rnd)[0] for rnd in (1, 2, 3)}) == 2)
    run = deployment.root / "run-sampled"
    rc = deployment.run_server(run, *SMALL, "--rounds", "3", "--min-nodes", "1",
                               "--fraction-train", "0.5", "--seed", str(seed), timeout=220)
    assert rc == 0, deployment.log("server-run-sampled.log") + (run / "server.log").read_text()[-3000:]
    table = rows(run)
    assert [r["sampled_clients"] for r in table] == \
        [seeded_sample(["c0", "c1"], 1, seed, rnd)[0] for rnd in (1, 2, 3)]
    assert all(r["sampled"] == 1 and r["replied"] == 1 for r in table)
    assert "2 of 2 nodes identified" in (run / "server.log").read_text()


@pytest.mark.timeout(360)
def test_a_killed_client_does_not_stop_the_run_and_rejoins_when_restarted(deployment):
    """Node c1's SuperNode is killed during round 2 and started again: round 2 goes on
    without it, and in round 3 the new SuperNode (a new node id) is identified as c1 and
    trains on from c1's state (its round count, hence its random stream and accountant)."""
    run = deployment.root / "run-kill"
    proc = deployment.server(run, *SMALL[:-6], "--rounds", "3", "--min-nodes", "1",
                             "--round-timeout", "45", "--wait-nodes-timeout", "60")
    deadline = time.monotonic() + 150
    while not ((run / "metrics.jsonl").exists() and rows(run)):
        assert proc.poll() is None, deployment.log("server-run-kill.log")
        assert time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.5)
    state_file = deployment.root / "state1" / "state.json"
    before = json.loads(state_file.read_text())
    deployment.tree.kill(deployment.clients[1])  # SuperNode and its ClientApp, no goodbye
    deployment.clients[1] = deployment.start_client(1)  # the same client, data and state, under a new node id
    assert proc.wait(timeout=300) == 0, (run / "server.log").read_text()[-3000:]
    table = rows(run)
    assert [r["round"] for r in table] == [1, 2, 3]
    assert table[1]["counted"] == 1 and table[1]["replied"] == 1
    assert table[1]["timed_out"] + table[1]["failed"] == 1
    # Round 3 samples c0 and the restarted c1 (and the dead node too, while the SuperLink
    # still lists it: it misses Flower's heartbeats for up to a minute).
    assert table[2]["counted"] == 1 and table[2]["replied"] == 2, table[2]
    log = (run / "server.log").read_text()
    assert "round 3: 1 of 1 nodes identified" in log
    # The dead node is named as the earlier node of c1, not as one running beside it.
    assert "reports client id 'c1', as node" in log and "both report" not in log
    after = json.loads(state_file.read_text())
    this_run = [run_id for run_id, last in after["runs"].items() if before["runs"].get(run_id) != last]
    assert len(this_run) == 1 and before["runs"].get(this_run[0]) == 1, (before["runs"], after["runs"])
    assert after["runs"][this_run[0]] == 3
    assert after["rounds_trained"] == before["rounds_trained"] + 1
    assert os.path.exists(run / "summary.json")


@pytest.mark.timeout(480)
def test_clients_join_a_restarted_superlink_by_themselves(deployment):
    """The server's SuperLink is stopped and a new one started on its port, as a server
    restarted for --resume is: the new one does not know the old nodes and ends them, and
    each `fedcontrast client` starts a new SuperNode that joins it; a run needing both counts.
    A round runs first, as before a real restart (a node that never ran a round is not
    ended by the new SuperLink within the test's wait)."""
    before = deployment.root / "run-before-restart"
    rc = deployment.run_server(before, *SMALL, "--rounds", "1", timeout=240)
    assert rc == 0, deployment.log("server-run-before-restart.log")
    deployment.tree.stop(roots=[deployment.link])
    deployment.start_superlink()
    deadline = time.monotonic() + 120
    logs = [max((deployment.root.glob(f"client{i}*.log")), key=lambda p: p.stat().st_mtime).name
            for i in range(2)]  # the restarted SuperNode's, after the test above
    while not all("joining it again as a new node" in deployment.log(log) for log in logs):
        assert all(c.poll() is None for c in deployment.clients), "".join(map(deployment.log, logs))
        assert time.monotonic() < deadline, "".join(map(deployment.log, logs))
        time.sleep(1)
    run = deployment.root / "run-after-restart"
    rc = deployment.run_server(run, *SMALL, "--rounds", "1", timeout=240)
    assert rc == 0, deployment.log("server-run-after-restart.log") + (run / "server.log").read_text()[-3000:]
    (row,) = rows(run)
    assert row["counted"] == 1 and row["replied"] == 2
    assert all(c.poll() is None for c in deployment.clients)


def test_no_token_or_key_is_written_to_any_file_or_log(deployment):
    """Every file of every run of this module, the logs, the clients' state and Flower's
    homes: no queue token (the tokens went to each node in every TRAIN message)."""
    assert secrets_on_disk(deployment.root) == []
