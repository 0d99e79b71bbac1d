"""``fedcontrast compare``: the methods side by side on the same data, partition, encoder and budget.

Methods (``--methods``; all but ``fedcontrast-key`` by default):

- ``local``: each client trains alone on its partition; the figures are the mean over
  clients of each client's encoder.
- ``fedavg``: FedAvg with in-batch negatives only (FedSimCLR): shared key encoder,
  no queue.
- ``fedmoco``: the FedContrast settings (key encoder, number of negatives, pushes,
  ages), but every client pulls only the rows it pushed itself: a per-client queue.
  The difference to ``fedcontrast`` is the sharing alone.
- ``fedcontrast``: negatives pulled from the global queue (the settings as given).
- ``fedcontrast-key``: fedcontrast with a momentum key encoder (``--key-mode ema``) that
  persists across rounds and is averaged at the server with the weights
  (``--key-sync server``, MonAcoSFL, ECML PKDD 2024): queue rows and positive keys of every
  client come from one slowly moving encoder (:mod:`common.key_state`).
- ``fedbyol``, ``fedu``, ``fedema``: the BYOL-based methods the field compares against
  (``--objective byol``, no queue; see :mod:`client.divergence`): FedBYOL, FedU
  (Zhuang et al., ICCV 2021: divergence-aware predictor update, ``--fedu-threshold``) and
  FedEMA (Zhuang et al., ICLR 2022: divergence-aware EMA of the global model into each
  local one, lambda autoscaled, ``--fedema-autoscale``); all three send the online
  encoder and predictor, which the server averages, and keep their EMA target
  (``--byol-tau``) at home.
- ``centralized``: all training data in one place (the upper bound), SimCLR as fedavg.
- ``centralized-skewed``: all training data in one place and one model trained step
  after step, as ``centralized``, but every batch drawn from a single client's
  partition, so its in-batch negatives are as skewed as a client's. ``centralized``
  minus ``centralized-skewed`` is what negatives from other clients' data are worth
  under this partition and budget: an estimate of what sharing negatives can win back at best
  (federated averaging itself costs the rest of the gap to ``centralized``).

Fairness: every method uses the same batch size, views, optimiser, learning rate and
per-round cosine schedule, and the same number of sample-epochs: a federated run
trains ``local_epochs`` epochs on each of the clients sampled in a round
(``int(num_clients x fraction_train)``, at least one, drawn by the seed: the same clients
for every federated method), so a share ``s`` of the clients,
for ``rounds`` rounds; ``local`` and the centralized methods draw batches until they
have trained on as many examples per round-equivalent, ``s x local_epochs`` times
their data (a round's overshoot is taken from the next). The federated methods run
through ``simulate`` (Flower's simulation engine and the real queue service); the others
run in this process. Every encoder is
evaluated the same way on the held-out split (kNN and a linear probe on backbone
features, alignment and uniformity of the head).

Beside the figures, each federated method's megabytes sent per client and round
(:func:`sent_megabytes`): what its messages carry, so that accuracy can be weighed
against traffic.

Writes ``OUT/compare.md`` (the table), ``OUT/compare.json``, ``OUT/compare.png``
(kNN accuracy per round for each method) and one run directory per method and seed.
A finished run leaves ``arm.json`` (settings and figures) in its directory; the same
command into the same ``OUT`` reuses it, so a comparison that stopped part-way goes on
from the method it was on (see :mod:`simulations.reuse`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table

from client.data import local_images, partition_indices
from client.settings import NodeSettings
from client.trainer import ContrastiveTrainer
from common.checkpoint import load_encoder, read_checkpoint, save_encoder
from common.config import FedConfig, resolve_device
from common.datasets import Dataset, load_dataset
from common.encoders import ContrastiveModel
from common.errors import UsageError
from common.evaluation import evaluate_encoder
from common.model import build_model, initial_model, model_spec
from common.plugins import make_views
from common.runtime.rundir import RunDir
from common.schedule import cosine_lr
from server.deploy import EXIT_UNCOUNTED_ROUNDS
from simulations.commands import DEFAULT_METHODS, METHODS
from simulations.methods import FEDERATED, method_config
from simulations.reuse import (
    data_digest,
    refuse_other_settings,
    reuse_key,
    reused_note,
    run_or_reuse,
)
from simulations.simulate import Simulation, resolve, simulate

logger = logging.getLogger(__name__)

#: The table's columns: (result key, header).
COLUMNS = (("linear_probe_backbone", "linear probe"), ("knn_backbone", "kNN"),
           ("retrieval_head", "retrieval"), ("alignment_head", "alignment"),
           ("uniformity_head", "uniformity"), ("mb_sent_per_client_round", "MB sent/client/round"),
           ("wall_time_s", "wall time (s)"))
#: The accuracies compared seed by seed against the reference method.
PAIRED = (("linear_probe_backbone", "linear probe"), ("knn_backbone", "kNN"))


def paired_differences(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Each method's accuracies minus the reference's, seed by seed.

    The reference is ``fedavg`` when it ran, else the first method. At one seed every
    method has the same data, partition and initial encoder (the federated ones the same
    client draws), and with reproducible pulls (the default) every run repeats exactly,
    so a difference at one seed is the methods' own; what varies is how it changes from
    seed to seed. ``None`` with fewer than two methods.
    """
    if len(results) < 2:
        return None
    reference = "fedavg" if "fedavg" in results else next(iter(results))
    methods = {}
    for method, runs in results.items():
        if method == reference:
            continue
        methods[method] = {}
        for key, _header in PAIRED:
            diffs = [r[key] - ref[key] for r, ref in zip(runs, results[reference], strict=True)]
            methods[method][key] = {"per_seed": diffs, "mean": statistics.fmean(diffs),
                                    "seeds_above": sum(d > 0 for d in diffs)}
    return {"reference": reference, "methods": methods}


def examples_per_round(cfg: FedConfig, n_examples: int, share: float) -> float:
    """Examples one round-equivalent trains on out of ``n_examples``: ``share`` (of the
    clients a federated round samples) x local epochs."""
    return share * cfg.local_epochs * n_examples


def round_batches(batches: Iterator[torch.Tensor], per_round: float) -> Iterator[Iterator[torch.Tensor]]:
    """Endless rounds, each the batches that bring the examples trained to ``per_round``
    (at least one batch); what a round's last batch takes beyond it counts against the next.

    Batches are counted by their real size: a part's short last batch buys less, so
    a method whose batches are cut per client is not given fewer sample-epochs. Each
    round is drawn lazily, a batch when the one before it has been trained on (the
    batches and the trainer's views may share one random generator); consume a round
    before asking for the next.
    """
    debt = 0.0

    def one_round() -> Iterator[torch.Tensor]:
        nonlocal debt
        seen, drawn = debt, 0
        while seen < per_round or not drawn:
            batch = next(batches)
            seen, drawn = seen + len(batch), drawn + 1
            yield batch
        debt = seen - per_round

    while True:
        yield one_round()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled passes over range(n), in batches (a last batch of 1 is dropped)."""
    yield from client_batches([torch.arange(n)], batch_size, generator)


def client_batches(parts: Sequence[torch.Tensor], batch_size: int,
                   generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless passes over the indices of every part, each batch from one part only.

    A pass shuffles each part and cuts it into batches of ``batch_size`` (a part's last
    batch may be shorter; one of a single index is dropped, InfoNCE needs two), then
    shuffles the order of all the pass's batches: a model trained on them meets the
    parts interleaved, as centralized training does, but each batch holds one part's data.
    """
    while True:
        batches = []
        for part in parts:
            order = part[torch.randperm(len(part), generator=generator)]
            batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)
                        if len(order[i:i + batch_size]) >= 2]
        if not batches:
            raise ValueError("no part holds 2 or more examples: nothing to contrast")
        if len(parts) > 1:  # one part's batches are in random order already
            batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
        yield from batches


def train_in_process(
    cfg: FedConfig,
    x: torch.Tensor,
    data: Dataset,
    *,
    parts: Sequence[torch.Tensor] | None = None,
    share: float = 1.0,
    on_eval: Callable[[int, ContrastiveModel], None] | None = None,
) -> ContrastiveModel:
    """Train on ``x`` for ``cfg.rounds`` round-equivalents (the per-round cosine schedule)
    of ``share x local_epochs`` epochs each (:func:`round_batches`).

    With ``parts`` (index tensors into ``x``), every batch is drawn from one part
    (:func:`client_batches`); otherwise from all of ``x``. ``on_eval`` is called at every
    ``eval_every``-th round and after the last.
    """
    device = resolve_device(cfg.device)
    model = initial_model(cfg, data, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    lr_at = cosine_lr(cfg.lr, cfg.rounds)
    state = {"round": 1}
    trainer = ContrastiveTrainer(model, cfg, device=device, generator=generator,
                                 lr_schedule=lambda _step: lr_at(state["round"] - 1))
    batches = (client_batches(parts, cfg.batch_size, generator) if parts is not None
               else _batches(x.shape[0], cfg.batch_size, generator))
    schedule = round_batches(batches, examples_per_round(cfg, x.shape[0], share))
    for rnd, round_ in zip(range(1, cfg.rounds + 1), schedule, strict=False):  # endless schedule
        state["round"] = rnd
        for idx in round_:
            loss, _k, _had = trainer.train_step(x[idx])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} in round {rnd}: lower --lr")
        if on_eval is not None and (rnd == cfg.rounds or (cfg.eval_every and rnd % cfg.eval_every == 0)):
            on_eval(rnd, trainer.model)
    return trainer.model


def _final_eval(model: ContrastiveModel, cfg: FedConfig, data: Dataset) -> dict[str, float]:
    device = resolve_device(cfg.device)
    return evaluate_encoder(model.to(device), data, device=device, views=make_views(cfg),
                            seed=cfg.seed, linear_probe=True)


def _knn(model: ContrastiveModel, cfg: FedConfig, data: Dataset) -> float:
    device = resolve_device(cfg.device)
    out = evaluate_encoder(model.to(device), data, device=device, views=make_views(cfg),
                           seed=cfg.seed, layers=("backbone",))
    return out["knn_backbone"]


def run_in_process(method: str, cfg: FedConfig, sim: Simulation, data: Dataset,
                   out: Path) -> dict[str, Any]:
    """``local`` or a centralized method: train here, write a run directory, return the figures."""
    run = RunDir(out)
    run.write_config(cfg)
    run.write_versions(method=method)
    start = time.perf_counter()
    parts = None
    if method == "centralized-skewed":
        parts = [torch.as_tensor(p, dtype=torch.long)
                 for p in partition_indices(cfg, data.y_train, sim.num_clients)]
    if method != "local":
        shares = [data.x_train]
    else:
        shares = [local_images(cfg, NodeSettings(client_id=f"partition-{i}", state_dir=out,
                                                 partition_id=i, num_partitions=sim.num_clients))
                  for i in range(sim.num_clients)]
    curves: dict[int, list[float]] = {}
    finals: list[dict[str, float]] = []
    for i, x in enumerate(shares):
        if x.shape[0] < 2:
            logger.warning("%s: client %d has %d example(s); left out", method, i, x.shape[0])
            continue
        model = train_in_process(
            replace(cfg, seed=cfg.seed + i), x, data, parts=parts,
            share=sim.sampled(cfg) / sim.num_clients,
            on_eval=lambda rnd, m: curves.setdefault(rnd, []).append(_knn(m, cfg, data)),
        )
        finals.append(_final_eval(model, cfg, data))
        if method != "local":
            save_encoder(model, model_spec(cfg, data.in_channels), run.file("encoder.pt"),
                         round=cfg.rounds)
    for rnd in sorted(curves):
        run.append_metrics({"round": rnd, "knn_backbone": statistics.fmean(curves[rnd])})
    result = {key: statistics.fmean(f[key] for f in finals) for key in finals[0]}
    if method == "local":
        result["mb_sent_per_client_round"] = 0.0
    result["wall_time_s"] = time.perf_counter() - start
    result["clients_averaged"] = len(finals)
    run.write_json("summary.json", {"method": method, "final_eval": result})
    return result


def run_federated(method: str, cfg: FedConfig, sim: Simulation, data: Dataset, out: Path,
                  timeout: float | None, pretrained_dir: Path | None = None) -> dict[str, Any]:
    """A federated method through ``simulate``; its final encoder evaluated like the others.
    ``pretrained_dir``: where its ServerApp finds (or keeps) the pretrained encoder."""
    start = time.perf_counter()
    status = simulate(cfg, sim, out, timeout=timeout, pretrained_dir=pretrained_dir)
    wall = time.perf_counter() - start
    if status == EXIT_UNCOUNTED_ROUNDS:
        raise UsageError(f"{method}: some rounds did not count, so it did not train on the "
                         f"budget of the others; see {out / 'summary.json'}")
    if status != 0:
        raise UsageError(f"{method}: the simulation failed; see {out / 'server.log'}")
    result = _final_eval(load_encoder(out / "encoder.pt"), cfg, data)
    result["mb_sent_per_client_round"] = sent_megabytes(out, cfg)
    result["wall_time_s"] = wall
    return result


def sent_megabytes(run: Path, cfg: FedConfig) -> float:
    """Megabytes (1e6 bytes) one client sends per round it trains in the run at ``run``.

    The arrays of its reply, counted from the run's final global arrays, which have the
    same keys and shapes (the weights; with a BYOL method also the predictor; with
    ``--optimizer-state federated`` also the optimiser's state; with ``--key-sync server``
    also the key encoder; the server sends the same arrays to it), plus the rows it pushed to the queue (float32, ``embedding_dim`` each;
    the mean over the run's replies). Payload only, no protocol overhead.
    """
    payload = read_checkpoint(run / "encoder.pt")
    arrays = [*payload["state_dict"].values(), *dict(payload.get("optimizer_state") or {}).values(),
              *dict(payload.get("key_state") or {}).values()]
    reply = sum(t.numel() * t.element_size() for t in arrays)
    rows = RunDir(run).read_metrics()
    replies = sum(int(r.get("replied", 0)) for r in rows)
    pushed = sum(int(r.get("pushed_rows", 0)) for r in rows)
    return (reply + 4 * cfg.embedding_dim * pushed / max(1, replies)) / 1e6


def random_init_figures(cfg: FedConfig, data: Dataset) -> dict[str, float]:
    model = build_model(cfg, data.in_channels)
    return _final_eval(model, cfg, data)


def pretrained_init_figures(cfg: FedConfig, data: Dataset, cache_dir: Path) -> dict[str, float]:
    """The figures of the encoder every method starts from with ``--pretrain-epochs``: the
    random init pretrained on synthetic images (:func:`common.model.initial_model`), kept
    in ``cache_dir`` for the runs (:func:`run_federated`)."""
    return _final_eval(initial_model(cfg, data, resolve_device(cfg.device), cache_dir), cfg, data)


def _curve(out: Path) -> list[tuple[int, float]]:
    rows = RunDir(out).read_metrics()
    return [(int(r["round"]), float(r["knn_backbone"])) for r in rows
            if isinstance(r.get("knn_backbone"), (int, float)) and math.isfinite(r["knn_backbone"])]


def compare(
    base: FedConfig,
    sim: Simulation,
    out: Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0,),
    timeout: float | None = None,
    console: Console | None = None,
    kept_in: Path | None | Literal["out"] = "out",
) -> dict[str, Any]:
    """Run every method for every seed into ``out``; write and return the comparison.

    Runs finished before into ``out`` with the same settings are reused (see
    :mod:`simulations.reuse`); ``kept_in`` is the ``--out`` a failure message tells the
    user to give again (``"out"``: ``out`` itself; None: ``out`` is temporary).
    """
    console = console or Console(stderr=True)
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods names a method twice: {', '.join(methods)}")
    configs = {m: method_config(m, base) for m in methods}  # refuse bad names before any work
    if any(m in FEDERATED for m in methods):
        sim.check_resources(base)  # before an in-process method trains for nothing
    digests = {seed: data_digest(load_dataset(base.dataset, seed=seed)) for seed in seeds}

    def planned(method: str, seed: int) -> tuple[Path, dict[str, Any]]:
        cfg = replace(configs[method], seed=seed)
        return (out / f"{method}-seed{seed}",
                reuse_key(method, cfg, sim.num_clients, sim.client_gpus, digests[seed]))

    refuse_other_settings(planned(m, seed) for seed in seeds for m in methods)
    share = sim.sampled(base) / sim.num_clients
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    curves: dict[str, list[list[tuple[int, float]]]] = {m: [] for m in methods}
    baseline: list[dict[str, float]] = []
    pretrained: list[dict[str, float]] = []
    pretrained_dir = out / "pretrained"  # --pretrain-epochs: pretrained once per seed
    for seed in seeds:
        data = load_dataset(base.dataset, seed=seed)
        baseline.append(random_init_figures(replace(base, seed=seed), data))
        if base.pretrain_epochs:
            pretrained.append(pretrained_init_figures(replace(base, seed=seed), data,
                                                      pretrained_dir))
        for method in methods:
            cfg = replace(configs[method], seed=seed)
            run_out, settings = planned(method, seed)
            train = (partial(run_federated, method, cfg, sim, data, run_out, timeout,
                             pretrained_dir)
                     if method in FEDERATED else partial(run_in_process, method, cfg, sim, data, run_out))
            result = run_or_reuse(f"{method} seed {seed}", run_out, settings, train, console,
                                  kept_in=out if kept_in == "out" else kept_in)
            results[method].append(result)
            curves[method].append(_curve(run_out))
            console.print(f"  linear probe {result['linear_probe_backbone']:.4f}  "
                          f"kNN {result['knn_backbone']:.4f}  {result['wall_time_s']:.0f} s")
    report = {
        "settings": asdict(base),
        "simulation": sim.as_dict(),
        "seeds": list(seeds),
        "budget": {"rounds": base.rounds, "local_epochs": base.local_epochs,
                   "fraction_train": base.fraction_train,
                   "clients_per_round": sim.sampled(base), "num_clients": sim.num_clients,
                   "sample_epochs": base.rounds * base.local_epochs * share},
        "random_init": baseline,
        **({"pretrained_init": pretrained} if pretrained else {}),
        "results": results,
        "paired": paired_differences(results),
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "compare.md").write_text(markdown_table(report) + "\n")
    plot_curves(curves, out / "compare.png", title=f"{Path(base.dataset).stem}: kNN per round",
                random_init_knn=statistics.fmean(b["knn_backbone"] for b in baseline))
    return report


def _cell(values: Sequence[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.fmean(values):.{digits}g} ± {(max(values) - min(values)) / 2:.2g}"


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(name, runs) of every row: the random init, the pretrained init where the methods
    started from it (``--pretrain-epochs``), then the methods."""
    rows = [("random init", report["random_init"])]
    if report.get("pretrained_init"):
        rows.append(("pretrained init (synthetic images)", report["pretrained_init"]))
    return rows + list(report["results"].items())


def markdown_table(report: dict[str, Any]) -> str:
    """Mean over seeds ± half the seed-to-seed range, one row per method."""
    seeds = report["seeds"]
    head = "| method | " + " | ".join(h for _k, h in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, runs in table_rows(report):
        cells = [_cell([r[k] for r in runs]) if all(k in r for r in runs) else "" for k, _h in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    b = report["budget"]
    lines += ["", f"Seeds {', '.join(map(str, seeds))} (± is half the range over seeds). Budget per "
              f"method: {b['sample_epochs']:.4g} sample-epochs ({b['rounds']} rounds x "
              f"{b['local_epochs']} local epochs x {b['clients_per_round']} of "
              f"{b['num_clients']} clients). "
              "Linear probe and kNN on backbone features of the held-out split; held-out "
              "instance retrieval (a view found among 256 candidates by its other view), "
              "alignment and uniformity of the head. MB sent/client/round: the arrays of a "
              "client's reply (weights, a BYOL method's predictor, the optimiser state when it "
              "is federated, fedcontrast-key's key encoder) and the queue rows it pushes, per "
              "round it trains; local sends "
              "nothing, the centralized methods are not federated."]
    if note := reused_note(r for runs in report["results"].values() for r in runs):
        lines += ["", note]
    paired = report.get("paired")
    if paired:
        ref = paired["reference"]
        exact = ("; every run repeats exactly" if report["settings"].get("pull_mode") != "live"
                 else "; with --pull-mode live a run with a queue does not repeat exactly")
        lines += ["", f"Against {ref}, seed by seed (at one seed every method starts from the same "
                  f"data, partition and initial encoder{exact}; 'above' counts the seeds where "
                  "the method is higher):", "",
                  "| method | " + " | ".join(f"{h} - {ref}, per seed | mean | above"
                                           for _k, h in PAIRED) + " |",
                  "|---" * (3 * len(PAIRED) + 1) + "|"]
        for method, by_key in paired["methods"].items():
            cells = []
            for key, _h in PAIRED:
                d = by_key[key]
                cells += [", ".join(f"{x:+.4f}" for x in d["per_seed"]), f"{d['mean']:+.4f}",
                          f"{d['seeds_above']} of {len(d['per_seed'])}"]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path, title: str,
                random_init_knn: float | None = None) -> Path | None:
    """kNN accuracy per round, one line per method (mean over seeds at the rounds all seeds
    have), and the random-init encoder's as a dotted line: below it, nothing was learned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for method, per_seed in curves.items():
        common = sorted(set.intersection(*[{r for r, _v in c} for c in per_seed])) if per_seed else []
        if not common:
            continue
        means = [statistics.fmean(dict(c)[r] for c in per_seed) for r in common]
        ax.plot(common, means, marker="o", ms=3, label=method)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if random_init_knn is not None:
        ax.axhline(random_init_knn, color="grey", linestyle=":", label="random init")
    ax.set_xlabel("round (or round-equivalent of the same sample-epochs)")
    ax.set_ylabel("kNN accuracy (backbone)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_list(text: str, item: Callable[[str], Any], flag: str) -> list[Any]:
    try:
        values = [item(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"{flag} {text!r}: {exc}") from exc
    if not values:
        raise UsageError(f"{flag} is empty")
    return values


def run_compare(args: argparse.Namespace) -> int:
    methods = parse_list(args.methods, str, "--methods")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    seeds = parse_list(args.seeds, int, "--seeds")
    cfg, sim = resolve(args)
    out = args.out or Path("runs") / f"compare-{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = compare(cfg, sim, out, methods=methods, seeds=seeds, timeout=args.timeout)
    table = Table(title=f"{Path(cfg.dataset).stem}: methods side by side (seeds {args.seeds})")
    table.add_column("method")
    for _key, header in COLUMNS:
        table.add_column(header, justify="right")
    for name, runs in table_rows(report):
        table.add_row(name, *[_cell([r[k] for r in runs]) if all(k in r for r in runs) else ""
                              for k, _h in COLUMNS])
    Console().print(table)
    paired = report["paired"]
    for method, by_key in (paired["methods"] if paired else {}).items():
        print(f"{method} - {paired['reference']}: " + ", ".join(
            f"{header} {by_key[key]['mean']:+.4f} (above at {by_key[key]['seeds_above']} of "
            f"{len(by_key[key]['per_seed'])} seeds)" for key, header in PAIRED))
    print(f"comparison: {Path(out).resolve() / 'compare.md'}")
    return 0
