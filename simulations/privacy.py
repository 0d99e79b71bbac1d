"""``fedcontrast privacy``: what a privacy budget costs, as a sweep of simulated federations.

The same federation (data, partition, encoder, rounds, everything but the privacy
settings) runs once per target epsilon in ``--epsilons``: DP-SGD with the noise each
client derives from the target for its whole planned run and, when the queue is on
(``--push-fraction``, ``--global-negatives``; off by default, see ``SWEEP_DEFAULTS``),
pushes noised with ``--push-noise`` and composed in the same accountant. ``inf`` is the
same federation without DP (no clipping, no noise): the reference. Then, with pushes, a
second axis at one budget (``--push-axis-epsilon``): pushes with noise against pushes
without, i.e. what protecting the shared embeddings costs in accuracy (without noise the
pushes are not covered by the epsilon, and the table says so).

DP-SGD needs a per-example loss, so every run of the sweep (the ``inf`` reference too)
trains without in-batch negatives, with a detached key encoder (``--key-mode``, default
``ema``): by default ``--objective moment`` (negatives drawn from the keys' running second
moment, released with noise under DP, plus any global rows; its negative term weighed
twice, ``--negative-weight 2``; ``docs/privacy.md``). One more
non-private run (``--default-loss-reference``, on by default) trains with the default loss
of ``fedcontrast simulate``, in-batch negatives included, and the sweep's queue settings
(no rows by default): the difference between the two references is what giving up
in-batch negatives costs before any noise is added.

Writes ``OUT/privacy.md`` (the table), ``OUT/privacy.json``, ``OUT/privacy.png``
(accuracy against epsilon) and one run directory per run; a rerun into the same
``OUT`` reuses the runs that finished, as ``compare`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from client.privacy import sgd_noise_multiplier
from client.state import StateDir
from common.config import FedConfig
from common.datasets import load_dataset
from common.errors import UsageError
from common.runtime.rundir import RunDir
from simulations.commands import PRIVATE_LOSS, SWEEP_DEFAULTS
from simulations.compare import (
    parse_list,
    pretrained_init_figures,
    random_init_figures,
    run_federated,
)
from simulations.reuse import (
    data_digest,
    refuse_other_settings,
    reuse_key,
    reused_note,
    run_or_reuse,
)
from simulations.simulate import CLIENT_STATE, Simulation, resolve

#: The loss settings ``PRIVATE_LOSS`` and the sweep replace, at their FedConfig defaults:
#: the federation as ``fedcontrast simulate`` trains it (in-batch and global negatives).
DEFAULT_LOSS = {"in_batch": FedConfig.in_batch, "queue_size": FedConfig.queue_size,
                "key_mode": FedConfig.key_mode, "objective": FedConfig.objective,
                "temperature": FedConfig.temperature,
                "queue_temperature": FedConfig.queue_temperature,
                "negative_weight": FedConfig.negative_weight}
COLUMNS = (("target_epsilon", "target ε"), ("epsilon", "reported ε"), ("delta", "δ"),
           ("noise_multiplier", "DP-SGD σ"), ("push_noise", "push noise"),
           ("pushes_private", "pushes covered"), ("negatives", "negatives"),
           ("linear_probe_backbone", "linear probe"), ("knn_backbone", "kNN"),
           ("retrieval_head", "retrieval"), ("alignment_head", "alignment"),
           ("uniformity_head", "uniformity"), ("wall_time_s", "wall time (s)"))


def run_settings(base: FedConfig, epsilon: float, push_noise: float, *,
                 default_loss: bool = False) -> FedConfig:
    """The sweep's settings for one (target epsilon, push noise); ``inf`` turns DP off.

    ``default_loss`` (with ``inf`` only): the loss ``fedcontrast simulate`` trains with,
    in-batch negatives included, instead of the per-example loss every other run uses.
    """
    if default_loss and not math.isinf(epsilon):
        raise ValueError("the default loss is not per-example: only the non-private run uses it")
    if math.isinf(epsilon):
        return replace(base, **(DEFAULT_LOSS if default_loss else PRIVATE_LOSS), dp=False,
                       target_epsilon=0.0, noise_multiplier=0.0, push_noise=0.0, epsilon_budget=0.0)
    cfg = replace(base, **PRIVATE_LOSS)
    return replace(cfg, dp=True, target_epsilon=epsilon, noise_multiplier=0.0,
                   push_noise=push_noise)


def client_noise(run: Path) -> list[float]:
    """The DP-SGD noise multipliers the clients of ``run`` derived (from their state)."""
    root = run / CLIENT_STATE
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        calibration = StateDir(path, path.name).load().calibration
        if calibration is not None:
            out.append(calibration.noise_multiplier)
    return out


def negatives_label(cfg: FedConfig) -> str:
    """Where a run's negatives come from, for the table."""
    sources = (["in-batch"] if cfg.in_batch else []) + (["local queue"] if cfg.queue_size else [])
    sources += ["global"] if cfg.global_negatives else []
    sources += ["second moment"] if cfg.objective == "moment" else []
    return " + ".join(sources) or "random"


def one_run(cfg: FedConfig, sim: Simulation, out: Path, timeout: float | None,
            pretrained_dir: Path | None = None) -> dict[str, Any]:
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    result = run_federated("privacy", cfg, sim, data, out, timeout, pretrained_dir)
    rows = RunDir(out).read_metrics()
    last = rows[-1] if rows else {}
    noise = client_noise(out)
    if cfg.objective == "moment":  # the clients keep the joint multiplier the steps are accounted at
        noise = [sgd_noise_multiplier(n) for n in noise]
    result.update({
        "target_epsilon": cfg.target_epsilon if cfg.dp else math.inf,
        "epsilon": float(last.get("epsilon_max", -1.0)) if cfg.dp else math.inf,
        "delta": cfg.delta if cfg.dp else 0.0,
        "noise_multiplier": (min(noise), max(noise)) if noise else (0.0, 0.0),
        "push_noise": cfg.push_noise,
        "pushes_private": bool(last.get("pushes_private", 0)) if cfg.dp else False,
        "negatives": negatives_label(cfg),
        "rounds_done": int(last.get("round", 0)),
        "run_dir": str(out),
    })
    return result


def sweep(
    base: FedConfig,
    sim: Simulation,
    out: Path,
    *,
    epsilons: list[float],
    push_noise: float,
    push_axis_epsilon: float | None,
    default_loss_reference: bool = False,
    timeout: float | None = None,
    console: Console | None = None,
    kept_in: Path | None | Literal["out"] = "out",
    pretrained_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the budget sweep, the push-noise axis and (``default_loss_reference``) the
    non-private run with the default loss into ``out``; write and return the report.

    Runs finished before into ``out`` with the same settings are reused; ``kept_in`` as
    for :func:`simulations.compare.compare`. ``pretrained_dir`` (default ``OUT/pretrained``):
    where the encoder of ``--pretrain-epochs`` is kept, so that sweeps sharing a seed can
    share it."""
    console = console or Console(stderr=True)
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = [(eps, push_noise, "budget") for eps in epsilons]
    if push_axis_epsilon is not None:
        if push_noise <= 0 or base.push_fraction <= 0:
            raise UsageError("--push-axis-epsilon compares pushes with and without noise, but "
                             "this sweep pushes no noised row: give --push-fraction and "
                             "--push-noise above 0 (and --global-negatives to pull rows), or "
                             "leave the axis out")
        if not (math.isfinite(push_axis_epsilon) and push_axis_epsilon > 0):
            raise UsageError(f"--push-axis-epsilon must be a positive finite budget, got "
                             f"{push_axis_epsilon:g}: without DP no push is noised, so the axis "
                             "would run one setting twice")
        if push_axis_epsilon not in epsilons:
            plan.append((push_axis_epsilon, push_noise, "push axis"))
        plan.append((push_axis_epsilon, 0.0, "push axis"))
    configs = [(run_settings(base, eps, noise), axis) for eps, noise, axis in plan]  # validate first
    if default_loss_reference:
        configs.append((run_settings(base, math.inf, 0.0, default_loss=True), "default loss"))
    data = load_dataset(base.dataset, seed=base.seed)
    digest = data_digest(data)

    def planned(cfg: FedConfig, axis: str) -> tuple[str, Path, dict[str, Any]]:
        name = "eps-inf" if not cfg.dp else f"eps-{cfg.target_epsilon:g}-push-{cfg.push_noise:g}"
        name += "-default-loss" if axis == "default loss" else ""
        return name, out / name, reuse_key("privacy", cfg, sim.num_clients, sim.client_gpus, digest)

    refuse_other_settings(planned(cfg, axis)[1:] for cfg, axis in configs)
    # --pretrain-epochs: where every run starts (no privacy cost), pretrained once here and
    # read by each run's ServerApp from OUT/pretrained
    pretrained_dir = pretrained_dir or out / "pretrained"
    pretrained = (pretrained_init_figures(base, data, pretrained_dir) if base.pretrain_epochs
                  else None)
    results = []
    for cfg, axis in configs:
        name, run_out, settings = planned(cfg, axis)
        result = run_or_reuse(name, run_out, settings,
                              partial(one_run, cfg, sim, run_out, timeout, pretrained_dir),
                              console, kept_in=out if kept_in == "out" else kept_in)
        result["axis"] = axis
        results.append(result)
        console.print(f"  reported epsilon {result['epsilon']:.4g}  linear probe "
                      f"{result['linear_probe_backbone']:.4f}  kNN {result['knn_backbone']:.4f}")
    # What "no training at all" scores on the same data: accuracy near it is not learned.
    random_init = random_init_figures(base, data)
    report = {"settings": asdict(base), "simulation": sim.as_dict(), "results": results,
              "random_init": random_init}
    if pretrained is not None:
        report["pretrained_init"] = pretrained
    (out / "privacy.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "privacy.md").write_text(markdown_table(report) + "\n")
    plot(results, out / "privacy.png", title=f"{Path(base.dataset).stem}: accuracy against epsilon",
         random_init=random_init)
    return report


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, (tuple, list)):
        lo, hi = value
        return f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.4g}"
    return str(value)


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for _k, h in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for r in report["results"]:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _h in COLUMNS) + " |")
    for key, name in (("random_init", "random init"),
                      ("pretrained_init", "pretrained init (synthetic images)")):
        if report.get(key):
            init = {**report[key], "target_epsilon": name}
            lines.append("| " + " | ".join(_fmt(k, init[k]) if k in init and k != "wall_time_s"
                                           else "–" for k, _h in COLUMNS) + " |")
    s = report["settings"]
    lines += ["", f"{report['simulation']['num_clients']} clients, {s['rounds']} rounds x "
              f"{s['local_epochs']} local epochs, {s['dataset']}, partitioner {s['partitioner']}, "
              f"clip norm {s['max_grad_norm']:g}, key mode {s['key_mode']}, "
              f"{s['global_negatives']} global negatives, no in-batch negatives (every row, "
              "the non-private one too). Reported ε: the largest epsilon any client reached "
              "(PLD accountant, DP-SGD steps and noised pushes composed; example-level, "
              "one example replaced). Negatives: where each run's negatives came from; "
              "in-batch ones couple examples, so only a non-private run may use them (the "
              "default loss of `fedcontrast simulate`). Retrieval: held-out instance retrieval "
              "of the head (a view found among 256 candidates by its other view). "
              "DP-SGD σ: range over clients (each derives it from the "
              "target for every round it could be sampled in). Pushes covered NO: pushed rows "
              "were not noised and are not covered by the reported ε. Random init: the same "
              "encoder untrained, evaluated the same way (accuracy near it was not learned)."]
    if report.get("pretrained_init"):
        lines += ["", f"Every run started from the encoder pretrained for {s['pretrain_epochs']} "
                  f"epochs on {s['pretrain_images']} synthetic dead-leaves images (pretrained "
                  "init): no one's data, so no privacy cost; what a run adds is its figure "
                  "minus that row's."]
    if note := reused_note(report["results"]):
        lines += ["", note]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str,
         random_init: dict[str, float] | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = sorted((r for r in results if r["axis"] == "budget" and not math.isinf(r["target_epsilon"])),
                    key=lambda r: r["target_epsilon"])
    reference = [r for r in results if math.isinf(r["target_epsilon"])]
    if not budget and not reference:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, color in (("linear_probe_backbone", "linear probe", "C0"), ("knn_backbone", "kNN", "C1")):
        if budget:
            ax.plot([r["epsilon"] for r in budget], [r[key] for r in budget], marker="o",
                    color=color, label=f"{label} (DP, noised pushes)")
        for r in reference:
            default = r.get("axis") == "default loss"
            ax.axhline(r[key], color=color, linestyle="-." if default else "--", alpha=0.7,
                       label=f"{label}, no DP" + (", in-batch negatives" if default else ""))
        if random_init and key in random_init:
            ax.axhline(random_init[key], color=color, linestyle=":", alpha=0.7,
                       label=f"{label}, random init")
        for r in results:
            if r["axis"] == "push axis" and r["push_noise"] == 0:
                ax.scatter([r["epsilon"]], [r[key]], marker="x", color=color, s=60,
                           label=f"{label}, pushes not noised (not covered)")
    ax.set_xscale("log")
    ax.set_xlabel("reported epsilon (log scale)")
    ax.set_ylabel("accuracy (backbone features)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_epsilon(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:
        raise ValueError(f"epsilon must be positive or inf, got {text}")
    return value


def run_privacy(args: argparse.Namespace) -> int:
    epsilons = parse_list(args.epsilons, parse_epsilon, "--epsilons")
    cfg, sim = resolve(args, defaults=SWEEP_DEFAULTS)
    if cfg.key_mode == "shared":
        raise UsageError("--key-mode shared is not per-example (gradients through the key): "
                         "use --key-mode ema or frozen for a privacy sweep")
    out = args.out or Path("runs") / f"privacy-{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    axis = args.push_axis_epsilon if args.push_axis_epsilon > 0 else None
    report = sweep(cfg, sim, out, epsilons=epsilons, push_noise=cfg.push_noise,
                   push_axis_epsilon=axis, default_loss_reference=args.default_loss_reference,
                   timeout=args.timeout)
    Console().print(markdown_table(report))
    print(f"privacy sweep: {Path(out).resolve() / 'privacy.md'}")
    return 0
