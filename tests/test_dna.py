"""The DNA modality: generator, views, encoder, and a federation that learns strand-invariant families.

Figures measured on two shared cores (seed 0, width 16, embedding 32) are in docs/plugins.md
(the DNA example); the tests assert margins well inside them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

from client import app as client_app
from client.state import StateDir
from client.train_local import evaluate_run
from common.checkpoint import encoder_spec, load_encoder, read_checkpoint, save_encoder
from common.config import FedConfig, load_config, to_run_config
from common.datasets import DatasetError, load_dataset
from common.encoders import build_encoder
from common.evaluation import evaluate_encoder
from common.examples.dna import (
    GenomeSpec,
    SequenceViews,
    motifs,
    one_hot,
    reverse_complement,
    strand_gap,
)
from common.plugins import make_views
from common.runtime.flower_env import ProcessTree
from common.runtime.rundir import RunDir
from server.contract import check_reply
from server.queue import NegativeQueue
from server.service import QueueServer
from simulations.compare import compare
from simulations.simulate import Simulation

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")
FEDCONTRAST = str(Path(sys.executable).parent / "fedcontrast")
#: The DNA plug-ins by import path, as a user's own would be named.
PLUGINS = ["--dataset", "common.examples.dna:genomes", "--encoder", "common.examples.dna:encoder",
           "--views", "common.examples.dna:views"]


pytestmark = pytest.mark.usefixtures("one_thread")


def decode(x: torch.Tensor) -> str:
    """(4, L) one-hot -> 'ACGT...' (an all-zero column, a masked base, is 'N')."""
    letters = np.array(list("ACGT"))[x.argmax(0).numpy()]
    letters[x.sum(0).numpy() == 0] = "N"
    return "".join(letters)


def revcomp(text: str) -> str:
    return text.translate(str.maketrans("ACGTN", "TGCAN"))[::-1]


def test_genomes_are_one_hot_balanced_and_fixed_by_the_seed():
    a, b = load_dataset("dna", seed=3), load_dataset("dna", seed=3)
    assert a.x_train.shape == (1200, 4, 128) and a.x_test.shape == (400, 4, 128)
    assert a.x_train.dtype == torch.float32 and a.in_channels == 4 and a.num_classes == 8
    assert torch.equal(a.x_train.sum(1), torch.ones(1200, 128))  # one base per position
    assert torch.bincount(a.y_train).tolist() == [150] * 8
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(load_dataset("dna", seed=4).x_train, a.x_train)


def test_every_read_holds_its_familys_motifs_on_either_strand():
    spec = GenomeSpec(train=64, test=8, mutation=0.0)
    ds = load_dataset("dna:train=64,test=8,mutation=0", seed=0)
    table = ["".join("ACGT"[b] for b in m) for m in motifs(spec).reshape(-1, spec.motif_length)]
    for x, y in zip(ds.x_train, ds.y_train.tolist(), strict=True):
        read = decode(x)
        own = table[y * spec.motifs:(y + 1) * spec.motifs]
        found = sum(read.count(m) + read.count(revcomp(m)) for m in own)
        assert found >= spec.copies - 1  # a later copy can overwrite an earlier one's edge


@pytest.mark.parametrize("spec, message", [
    ("dna:length=long", "length must be a int, got 'long'"),
    ("dna:size=3", "'size=3' is not KEY=VALUE with KEY one of train, test, length"),
    ("dna:length=20", "length 20 cannot hold 4 copies of a 12-base motif"),
    ("dna:mutation=2", r"mutation must be in \[0, 1\]"),
])
def test_generator_settings_are_checked(spec, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


def test_reverse_complement_reads_the_other_strand():
    x = one_hot(np.array([[0, 0, 1, 2, 3, 3, 3]]))  # AACGTTT
    assert decode(reverse_complement(x)[0]) == "AAACGTT" == revcomp("AACGTTT")
    assert torch.equal(reverse_complement(reverse_complement(x)), x)


def test_views_keep_a_window_and_take_the_other_strand_with_their_probabilities():
    x = load_dataset("dna:train=16,test=8", seed=0).x_train
    g = torch.Generator().manual_seed(0)
    assert torch.equal(SequenceViews(min_crop=1.0, rc_p=0.0)(x, g), x)
    assert torch.equal(SequenceViews(min_crop=1.0, rc_p=1.0)(x, g), reverse_complement(x))
    view = SequenceViews(min_crop=0.5, rc_p=0.0)(x, g)
    assert view.shape == x.shape and view.dtype == x.dtype
    for v, item in zip(view, x, strict=True):
        read, full = decode(v), decode(item)
        kept = read.strip("N")
        assert "N" not in kept and len(kept) >= 64 and kept in full
    again = SequenceViews()(x, torch.Generator().manual_seed(1))
    assert torch.equal(again, SequenceViews()(x, torch.Generator().manual_seed(1)))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_the_cnn1d_encoder_meets_the_contract_and_dp_sgd():
    import opacus
    from opacus import validators
    model = build_encoder("cnn1d", in_channels=4, embedding_dim=16, width=4)
    x = torch.rand(5, 4, 50)
    assert model.features(x).shape == (5, model.feature_dim) and model.feature_dim == 32
    torch.testing.assert_close(model(x).norm(dim=1), torch.ones(5))
    assert validators.ModuleValidator.validate(model, strict=False) == []
    private = opacus.GradSampleModule(model)
    private(x).sum().backward()
    for name, p in private.named_parameters():
        assert p.grad_sample.shape == (5, *p.shape), name
    batch = build_encoder("cnn1d", in_channels=4, embedding_dim=16, width=4, norm="batch")
    assert any(isinstance(m, nn.BatchNorm1d) for m in batch.modules())


@pytest.mark.timeout(120)
def test_a_random_init_encoder_is_far_from_solving_the_families():
    # Chance is 1/8. Measured (seed 0, width 16): kNN 0.30, linear probe 0.53 on backbone
    # features, strand gap of the embedding 0.002.
    data = load_dataset("dna", seed=0)
    cfg = FedConfig(dataset="dna", encoder="cnn1d", views="dna", width=16, embedding_dim=32)
    torch.manual_seed(0)
    model = build_encoder("cnn1d", in_channels=4, embedding_dim=32, width=16)
    figures = evaluate_encoder(model, data, device=CPU, views=make_views(cfg), linear_probe=True,
                               layers=("backbone",))
    gap = strand_gap(model, data.x_test)
    logger.info("random init on dna: %s, strand gap %.4f", figures, gap)
    assert 0.125 < figures["knn_backbone"] < 0.45
    assert 0.125 < figures["linear_probe_backbone"] < 0.65
    assert abs(gap) < 0.05


TINY = FedConfig(dataset="common.examples.dna:genomes:train=96,test=32", encoder="common.examples.dna:encoder",
                 views="common.examples.dna:views", width=8, embedding_dim=16, batch_size=32,
                 global_negatives=64, push_fraction=0.5, device="cpu", seed=3, in_batch=False,
                 key_mode="frozen", dp=True, noise_multiplier=1.0, push_noise=2.0)


@pytest.mark.usefixtures("flower_task_identity")
def test_a_private_clientapp_round_on_dna_trains_pushes_and_accounts(tmp_path):
    token = "node-token-0123456789"
    queue = NegativeQueue(1024, TINY.embedding_dim, max_age=TINY.max_age)
    queue.advance(1)
    torch.manual_seed(0)
    model = build_encoder(TINY.encoder, in_channels=4, embedding_dim=16, width=8)
    with QueueServer(queue, {token: 0}) as server:
        config = ConfigRecord({"server-round": 1, "lr": 1e-3, "queue-address": server.address,
                               "queue-token": token, "queue-version": 1})
        msg = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                          "config": config}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
        node = {"partition-id": 0, "num-partitions": 2, "client-id": "dna-0",
                "state-dir": str(tmp_path / "state")}
        reply = client_app.train(msg, Context(run_id=1, node_id=7, node_config=node,
                                              state=RecordDict(), run_config=to_run_config(TINY)))
    assert check_reply(reply, msg.content["arrays"]) is None
    m = reply.content["metrics"]
    assert m["num-examples"] == 48 and m["pushed-rows"] > 0 and len(queue) == m["pushed-rows"]
    assert m["epsilon"] > 0 and m["alignment"] == 0.0  # accounted; local statistics withheld
    assert StateDir(tmp_path / "state", "dna-0").load().accountant.epsilon(TINY.delta) == m["epsilon"]
    trained = reply.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())


def test_a_private_federated_run_directory_evaluates_with_its_own_views(tmp_path):
    # `simulate --dp true` ends with evaluate_run: the run's settings (no in-batch
    # negatives) are valid federated settings, not local ones.
    RunDir(tmp_path).write_config(TINY)
    torch.manual_seed(TINY.seed)  # as evaluate_run seeds its random-init encoder
    model = build_encoder(TINY.encoder, in_channels=4, embedding_dim=16, width=8)
    save_encoder(model, encoder_spec(TINY.encoder, 4, 16, TINY.norm, TINY.width),
                 tmp_path / "encoder.pt")
    figures = evaluate_run(tmp_path, device="cpu")
    assert figures["dataset"] == "dna"
    assert figures["trained"] == figures["random_init"]  # the untrained encoder, twice


@pytest.mark.timeout(120)
def test_compare_trains_local_and_centralized_on_dna(tmp_path):
    cfg = FedConfig(dataset="dna:train=120,test=40", encoder="cnn1d", views="dna", width=8,
                    embedding_dim=16, batch_size=32, rounds=1, device="cpu")
    report = compare(cfg, Simulation(num_clients=2), tmp_path, methods=("local", "centralized"))
    assert report["results"]["local"][0]["clients_averaged"] == 2
    untrained = report["random_init"][0]
    for method in ("local", "centralized"):  # both trained: their encoders left the random init
        figures = report["results"][method][0]
        assert 0 <= figures["linear_probe_backbone"] <= 1
        assert figures["uniformity_head"] != untrained["uniformity_head"], method
    assert read_checkpoint(tmp_path / "centralized-seed0" / "encoder.pt")["spec"]["encoder"] == "cnn1d"


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_a_simulated_federation_learns_strand_invariant_families(tmp_path):
    out = tmp_path / "run"
    cmd = [FEDCONTRAST, "simulate", "--out", str(out), *PLUGINS, "--width", "16",
           "--embedding-dim", "32", "--batch-size", "64", "--lr", "0.003", "--rounds", "5",
           "--local-epochs", "4", "--num-clients", "3", "--global-negatives", "64",
           "--queue-capacity", "512", "--device", "cpu", "--round-timeout", "120"]
    log = tmp_path / "simulate.log"
    with ProcessTree() as tree:
        proc = tree.start(cmd, log=log, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            rc = proc.wait(timeout=380)
        except subprocess.TimeoutExpired:
            rc = -1
    assert rc == 0, log.read_text(errors="replace")[-4000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["replied"] for r in rows] == [3] * 5
    assert all(r["pushed_rows"] > 0 for r in rows) and rows[-1]["global_hits"] > 0  # the queue
    assert read_checkpoint(out / "encoder.pt")["spec"]["encoder"] == "common.examples.dna:encoder"

    figures = evaluate_run(out, device="cpu")  # the run's encoder vs the same one at random init
    trained, random_init = figures["trained"], figures["random_init"]
    cfg = load_config(out)
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    init = build_encoder(cfg.encoder, in_channels=4, embedding_dim=32, width=16)
    gaps = (strand_gap(load_encoder(out), data.x_test), strand_gap(init, data.x_test))
    logger.info("dna federation: trained %s, random init %s, strand gap %.3f vs %.3f",
                trained, random_init, *gaps)
    assert trained["knn_backbone"] > random_init["knn_backbone"] + 0.10
    assert trained["linear_probe_backbone"] > random_init["linear_probe_backbone"] + 0.03
    assert trained["knn_head"] > random_init["knn_head"] + 0.10
    assert gaps[0] > gaps[1] + 0.3
