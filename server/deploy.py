"""``fedcontrast server``: start a SuperLink, run FedContrast on it, report, clean up.

What it does, in order:

1. starts ``flower-superlink`` (TLS with ``--ssl-*`` files, ``--insecure`` only when
   asked; ``--enable-supernode-auth`` with ``--auth-list-public-keys``), unless
   ``--superlink`` names one that is already running;
2. writes a private ``FLWR_HOME/config.toml`` naming that SuperLink (without it
   ``flwr`` would write a default that starts a local SuperLink of its own), and
   registers the ``--auth-list-public-keys`` with ``flwr supernode register``;
3. submits the app (this repository: ``pyproject.toml`` with ``[tool.flwr.app]``,
   its ``fab-include`` files copied to ``FLWR_HOME/fab-source`` first, see ``stage_app``)
   with ``flwr run FLWR_HOME/fab-source fedcontrast --stream --run-config FILE``, the run config
   holding every setting plus the absolute run directory and, unless ``--insecure``,
   the certificate and key the ServerApp serves the negative queue with (TLS, as the
   SuperLink);
4. prints one line per finished round from ``RUN_DIR/metrics.jsonl`` (the ServerApp's
   own output reaches us only through Flower's log stream, kept in
   ``RUN_DIR/server.log``);
5. checks the run's final status with ``flwr ls`` (``flwr run`` exits 0 even when
   the ServerApp failed) and ``RUN_DIR/summary.json``, prints one line saying how the
   run ended and the run directory, and exits with the status of docs/operations.md
   (0 completed, 3 completed with uncounted rounds, 1 failed);
6. stops every process it started, on success, failure, Ctrl-C or SIGTERM.

What can be checked before anything starts is: the flags, the run directory, the TLS
files and the dataset the ServerApp shapes the encoder with (:func:`check_dataset`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import server
from common import plugins
from common.config import (
    FedConfig,
    from_args,
    read_config_values,
    to_run_config,
)
from common.datasets import load_dataset
from common.errors import UsageError
from common.runtime.flower_env import (
    ProcessTree,
    flower_env,
    stopped_on_exit,
    toml_value,
    wait_for_port,
    write_superlink_config,
)

logger = logging.getLogger(__name__)

CONNECTION = "fedcontrast"
#: Exit statuses of a run that started (docs/operations.md); 2 (a usage error) and 130
#: (interrupted) come from the command line.
EXIT_COMPLETED, EXIT_FAILED, EXIT_UNCOUNTED_ROUNDS = 0, 1, 3
_RUN_ID = re.compile(r"(?:Successfully started run|run_id `?)\s*(\d+)")


def app_dir() -> Path:
    """The Flower app directory: the repository root holding ``server/``."""
    root = Path(server.__file__).resolve().parents[1]
    if _flower_app(root) is None:
        raise UsageError(
            f"{root} has no pyproject.toml with [tool.flwr.app]: run from a source checkout "
            "of FedContrast (pip install -e .), not from an installed wheel"
        )
    return root


def _flower_app(root: Path) -> dict[str, Any] | None:
    """``[tool.flwr.app]`` of ``root/pyproject.toml``; None when there is none."""
    try:
        return dict(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"])
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError):
        return None


def stage_app(dest: Path) -> Path:
    """Copy the app's files (``pyproject.toml`` and its ``fab-include``) into ``dest``.

    ``flwr run`` builds the FAB by walking every file under the directory it is given
    before it filters them, and a checkout holds ``.venv`` (tens of thousands of files)
    and ``runs/``: about 6 s per run on 2 cores (``python -m bench.fab_bench``). The
    staged copy holds the files the FAB keeps, so the FAB (and its hash) is the same.
    """
    root = app_dir()
    patterns = (_flower_app(root) or {}).get("fab-include", [])
    if not patterns:
        raise UsageError(f"{root / 'pyproject.toml'}: [tool.flwr.app] lists no fab-include "
                         "patterns, so the app's files cannot be staged")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(root / "pyproject.toml", dest / "pyproject.toml")
    for pattern in patterns:
        for path in root.glob(pattern):
            if path.is_file() and "__pycache__" not in path.parts:
                target = dest / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return dest


def resolve_settings(args: argparse.Namespace) -> tuple[FedConfig, Path, Path | None]:
    """The run's config, its absolute run directory and the run to resume (or None)."""
    resume = args.resume.expanduser().resolve() if args.resume else None
    if resume is not None and not (resume / "encoder.pt").exists():
        raise UsageError(f"--resume {args.resume}: no encoder.pt there (not a FedContrast run directory)")
    source = args.config or resume
    base = read_config_values(source)[1] if source else None
    cfg = from_args(FedConfig, args, base=base)
    out = args.out or resume or Path("runs") / f"fed-{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, out.expanduser().resolve(), resume


def check_dataset(cfg: FedConfig, superlink: str | None) -> None:
    """Refuse a ``--dataset`` the ServerApp could not load, before anything starts.

    The ServerApp loads it where the SuperLink runs: here, unless ``--superlink`` names
    one, whose machine may hold a path this one lacks (then only a warning). A plug-in of
    another package is imported, not called (it may generate data for minutes).
    """
    spec = cfg.dataset
    parsed = plugins.parse("dataset", spec)
    own = parsed is None or parsed[0].startswith("common.")
    if superlink and parsed is None and not Path(spec).expanduser().exists():
        logger.warning("--dataset %s is not on this machine; the ServerApp reads it where the "
                       "SuperLink %s runs", spec, superlink)
        return
    try:
        if own:
            load_dataset(spec, seed=cfg.seed)
        else:
            plugins.check("dataset", spec)
    except ValueError as exc:
        raise UsageError(f"--dataset {spec}: {exc} (the server shapes the encoder with it and "
                         "evaluates on its test split: give one this machine can read)") from exc


def superlink_command(args: argparse.Namespace) -> list[str]:
    """``flower-superlink`` with the transport security the arguments ask for."""
    cmd = ["flower-superlink", "--disable-runtime-dependency-installation",
           "--host", args.host, "--port", str(args.port)]
    tls = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    node_keys = args.auth_list_public_keys or []
    if args.insecure:
        if any(tls) or node_keys:
            raise UsageError("--insecure cannot be combined with --ssl-* or --auth-list-public-keys")
        return cmd + ["--insecure"]
    if not all(tls):
        raise UsageError(
            "give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile for TLS, "
            "or --insecure for a loopback or test deployment"
        )
    for path in [*tls, *node_keys]:
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
    cmd += ["--ssl-ca-certfile", str(tls[0].resolve()), "--ssl-certfile", str(tls[1].resolve()),
            "--ssl-keyfile", str(tls[2].resolve())]
    if node_keys:
        # Flower 1.41 refuses its former --auth-list-public-keys: keys are registered
        # through the Control API once the SuperLink runs (register_supernodes).
        cmd.append("--enable-supernode-auth")
    return cmd


def queue_tls_run_config(args: argparse.Namespace) -> dict[str, str]:
    """Run-config keys that serve the ServerApp's negative queue as the SuperLink is served.

    TLS with ``--queue-ssl-*`` or else the SuperLink's ``--ssl-certfile``/``--ssl-keyfile``
    (absolute paths); both keys empty (an insecure queue) with ``--insecure``. Clients
    started with ``--root-certificates`` reach the queue over TLS only.
    """
    queue_files = [args.queue_ssl_certfile, args.queue_ssl_keyfile]
    if args.insecure:
        if any(queue_files):
            raise UsageError("--insecure cannot be combined with --queue-ssl-certfile or "
                             "--queue-ssl-keyfile")
        return {"queue-ssl-certfile": "", "queue-ssl-keyfile": ""}
    if any(queue_files) and not all(queue_files):
        raise UsageError("--queue-ssl-certfile and --queue-ssl-keyfile go together")
    cert, key = queue_files if all(queue_files) else (args.ssl_certfile, args.ssl_keyfile)
    if cert is None or key is None:
        raise UsageError(
            "the negative queue is served with TLS when the SuperLink is: give --ssl-certfile "
            "and --ssl-keyfile (with --superlink: --queue-ssl-certfile and --queue-ssl-keyfile), "
            "a certificate naming --queue-host, or --insecure for a loopback or test deployment"
        )
    for path in (cert, key):
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
    return {"queue-ssl-certfile": str(cert.resolve()), "queue-ssl-keyfile": str(key.resolve())}


def read_public_keys(paths: list[Path]) -> list[str]:
    """The OpenSSH public keys in ``paths``, separated by commas or newlines in each file.

    A ``.pub`` file from ``ssh-keygen`` holds one; the CSV that Flower's former
    ``--auth-list-public-keys`` read holds several.
    """
    keys: list[str] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"--auth-list-public-keys {path}: cannot read it ({exc.strerror})") from exc
        found = [entry.strip() for entry in re.split(r"[,\n]", text) if entry.strip()]
        if not found:
            raise UsageError(f"--auth-list-public-keys {path}: no public key in it")
        keys += found
    return keys


def register_supernodes(args: argparse.Namespace, env: dict[str, str], home: Path) -> None:
    """Register ``--auth-list-public-keys`` with the SuperLink named in ``home``'s config.

    Flower 1.41 admits a SuperNode to a SuperLink started with ``--enable-supernode-auth``
    only when its public key was registered through the Control API (``flwr supernode
    register``); a SuperNode whose key is not registered yet exits. A key registered
    before (a running ``--superlink``) is accepted as it is.
    """
    if not args.auth_list_public_keys:
        return
    if args.insecure:
        raise UsageError("--auth-list-public-keys needs TLS: give --ssl-ca-certfile instead of --insecure")
    folder = home / "supernode-keys"
    folder.mkdir(parents=True, exist_ok=True)
    keys = read_public_keys(args.auth_list_public_keys)
    for i, key in enumerate(keys):
        label = " ".join(key.split()[2:]) or f"#{i + 1} (...{key[-12:]})"  # its comment, if any
        path = folder / f"supernode-{i}.pub"
        path.write_text(key + "\n")
        try:
            out = subprocess.run(["flwr", "supernode", "register", str(path), CONNECTION, "--format", "json"],
                                 env=env, cwd=home, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise UsageError("the SuperLink did not answer `flwr supernode register` within 60 s") from exc
        try:
            reply = json.loads(out.stdout)
        except json.JSONDecodeError:
            reply = {}
        # `flwr supernode register --format json` exits 0 also when it failed.
        error = str(reply.get("error-message", "") or (out.stdout + out.stderr)).strip()
        if reply.get("success"):
            logger.info("registered SuperNode key %s: node id %s", label, reply.get("node-id"))
        elif "already in use" in error:
            logger.info("SuperNode key %s was registered already", label)
        else:
            raise UsageError(f"could not register SuperNode key {label} from --auth-list-public-keys "
                             f"(OpenSSH ECDSA public keys on a NIST curve are accepted): {error[-600:]}")
    logger.info("%d SuperNode keys registered: SuperNodes holding them may connect now", len(keys))


def write_run_config(path: Path, cfg: FedConfig, out: Path, resume: Path | None,
                     extra: dict[str, Any] | None = None) -> Path:
    """The run config as a TOML file (paths with spaces or quotes survive, unlike ``k=v`` text)."""
    values: dict[str, Any] = {**to_run_config(cfg), "run-dir": str(out), "resume": str(resume or ""),
                              **(extra or {})}
    path.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def _pump(stream, log_path: Path, found: dict[str, str], echo: bool) -> None:
    """Copy ``flwr run``'s output to the log; note the run id."""
    with log_path.open("a") as log:
        for raw in stream:
            line = raw.decode(errors="replace")
            log.write(line)
            log.flush()
            if "run_id" not in found and (m := _RUN_ID.search(line)):
                found["run_id"] = m.group(1)
            if echo:
                sys.stderr.write(line)


def progress_line(row: dict[str, Any], rounds: int) -> str:
    """The terminal's line for one round row of ``metrics.jsonl``."""
    parts = [f"round {row['round']}/{rounds}"]
    if not row.get("counted", 1):
        parts.append("NOT COUNTED")
    for key, label in (("replied", "nodes"), ("train_loss", "loss"), ("global_hits", "queue hits"),
                       ("global_misses", "misses"), ("pushed_rows", "pushed"),
                       ("knn_backbone", "kNN"), ("uniformity_head", "uniformity")):
        if key in row:
            value = row[key]
            parts.append(f"{label} {value:.4g}" if isinstance(value, float) else f"{label} {value}")
    if row.get("queue_overwritten_rows", 0) > 0:  # the driver warns in server.log too
        parts.append(f"QUEUE FULL: {row['queue_overwritten_rows']} rows overwritten "
                     "(raise --queue-capacity)")
    if "round_seconds" in row:
        parts.append(f"{row['round_seconds']:.1f} s")
    return "  ".join(parts)


def run_status(env: dict[str, str], run_id: str) -> str:
    """The run's status from the SuperLink (``finished:completed``, ``finished:failed``, ...)."""
    out = subprocess.run(["flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=60)
    try:
        return str(json.loads(out.stdout)["runs"][0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        return f"unknown (flwr ls said: {(out.stdout + out.stderr).strip()[-300:]})"


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def first_error(text: str) -> str | None:
    """The first ``SomeError: message`` line of a traceback in ``text`` (any exception class:
    ``server.sampling.NotEnoughNodes: ...`` too)."""
    for line in text.splitlines():
        match = _ERROR_LINE.match(line)
        if match:
            return line.strip()[:300]
    return None


# A dotted module path, then a CamelCase class name (not an all-caps log level), then ": ".
_ERROR_LINE = re.compile(r"^\s*(?:[a-z_][\w]*\.)*[A-Z]\w*[a-z]\w*: \S")


def refuse_finished_rounds(out: Path, resume: Path | None, rounds: int) -> None:
    """Refuse, before anything starts, a run that would mix or lose rounds.

    A run directory that already holds rounds takes only ``--resume`` of itself (the
    ServerApp would refuse it too, but only once the run is up); a resume must leave
    rounds to train, or the summary of the finished run would be rewritten without them.
    """
    rows = _read_rows(out)
    if resume is None:
        if rows:
            raise UsageError(f"--out {out} already holds a run ({len(rows)} rounds in metrics.jsonl): "
                             f"continue it with --resume {out}, or choose another --out")
        return
    if rows and out.resolve() != resume.resolve():
        raise UsageError(f"--out {out} already holds a run ({len(rows)} rounds in metrics.jsonl): "
                         f"resume {resume} into an empty --out, or into itself")
    done = max((int(row.get("round", 0)) for row in _read_rows(resume)), default=0)
    if rounds <= done:
        raise UsageError(f"--resume {resume}: it has trained {done} rounds already; "
                         f"ask for more with --rounds (> {done})")


def deploy(args: argparse.Namespace) -> int:
    """Run one FedContrast federation; 0 when the run completed."""
    cfg, out, resume = resolve_settings(args)
    queue_tls = queue_tls_run_config(args)
    app_dir()  # fail before starting anything when this is no source checkout
    check_dataset(cfg, args.superlink)
    refuse_finished_rounds(out, resume, cfg.rounds)
    out.mkdir(parents=True, exist_ok=True)
    home = (args.flwr_home.expanduser().resolve() if args.flwr_home
            else Path(tempfile.mkdtemp(prefix="fedcontrast-flwr-")))
    home.mkdir(parents=True, exist_ok=True)  # the SuperLink starts in it
    env = flower_env(home)
    try:
        with stopped_on_exit(ProcessTree()) as tree:
            return _serve(args, tree, env, home, cfg, out, resume, queue_tls)
    finally:
        if not args.flwr_home:
            shutil.rmtree(home, ignore_errors=True)


def _serve(args: argparse.Namespace, tree: ProcessTree, env: dict[str, str], home: Path,
           cfg: FedConfig, out: Path, resume: Path | None, queue_tls: dict[str, str]) -> int:
    """Start the SuperLink (unless ``--superlink``), register SuperNodes, submit the run
    and follow it; ``tree`` holds what is started."""
    if args.superlink:
        if not (args.insecure or args.ssl_ca_certfile):
            raise UsageError("with --superlink give --ssl-ca-certfile (TLS) or --insecure")
        address = args.superlink
    else:
        link = tree.start(superlink_command(args), env=env, log=out / "superlink.log", cwd=home)
        connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        address = f"{connect_host}:{args.port}"
        if not wait_for_port(connect_host, args.port, timeout=60) or link.poll() is not None:
            raise UsageError(f"the SuperLink did not start on {address}:\n{log_tail(out / 'superlink.log')}")
        logger.info("SuperLink listening on %s (log: %s)", address, out / "superlink.log")
    certificates = None if args.insecure else args.ssl_ca_certfile
    write_superlink_config(home, CONNECTION, address, root_certificates=certificates)
    register_supernodes(args, env, home)
    return follow_run(tree, env, home, cfg, out, resume, timeout=args.timeout,
                      extra_run_config=queue_tls)


def follow_run(
    tree: ProcessTree,
    env: dict[str, str],
    home: Path,
    cfg: FedConfig,
    out: Path,
    resume: Path | None,
    *,
    timeout: float | None = None,
    flwr_args: list[str] | None = None,
    extra_run_config: dict[str, Any] | None = None,
) -> int:
    """Submit FedContrast to the SuperLink of ``home``'s config, show progress, return 0 on success.

    ``flwr_args`` go to ``flwr run`` (simulation passes ``--federation-config``);
    ``extra_run_config`` adds run-config keys of the apps beside the config's own.
    """
    config_file = write_run_config(home / "run-config.toml", cfg, out, resume, extra_run_config)
    flwr = tree.start(["flwr", "run", str(stage_app(home / "fab-source")), CONNECTION, "--stream",
                       "--run-config", str(config_file), *(flwr_args or [])],
                      env=env, cwd=home, stdout=subprocess.PIPE)
    found: dict[str, str] = {}
    pump = threading.Thread(target=_pump, args=(flwr.stdout, out / "server.log", found,
                                                logger.isEnabledFor(logging.DEBUG)), daemon=True)
    pump.start()
    logger.info("run directory %s; rounds %d (progress below, full log in server.log)", out, cfg.rounds)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = len(_read_rows(out)) if resume else 0
    while flwr.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            raise UsageError(f"the run did not finish within --timeout {timeout:.0f} s")
        shown = _show_new_rows(out, shown, cfg.rounds)
        time.sleep(1.0)
    pump.join(timeout=10)
    _show_new_rows(out, shown, cfg.rounds)
    if "run_id" not in found:
        raise UsageError(f"flwr run did not start a run:\n{log_tail(out / 'server.log')}")
    return report_outcome(out, found["run_id"], run_status(env, found["run_id"]))


def run_outcome(out: Path, run_id: str, flower_status: str) -> tuple[int, str]:
    """The exit status and the one line that says how run ``run_id`` ended and what to do.

    ``summary.json`` (when this run wrote it) says why; else the log's first error.
    """
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}
    status = str(summary.get("status", "")) if str(summary.get("run_id")) == run_id else ""
    log = out / "server.log"
    if flower_status != "finished:completed" or status.startswith("failed"):
        cause = (status.removeprefix("failed: ") if status.startswith("failed")
                 else first_error(log_tail(log, lines=400)))
        if cause is None:
            return EXIT_FAILED, (f"run {run_id} ended {flower_status}; last lines of {log}:\n"
                                 f"{log_tail(log)}")
        return EXIT_FAILED, f"run {run_id} failed: {cause} (full log: {log})"
    if status.startswith("completed with uncounted rounds"):
        return EXIT_UNCOUNTED_ROUNDS, f"run {run_id} {status}"
    return EXIT_COMPLETED, f"run {run_id} {status or 'completed'}"


def report_outcome(out: Path, run_id: str, flower_status: str) -> int:
    """Print how the run ended (stderr unless it completed) and the run directory."""
    code, line = run_outcome(out, run_id, flower_status)
    print(line, file=sys.stdout if code == EXIT_COMPLETED else sys.stderr, flush=True)
    print(f"run directory: {out}")
    return code


def _read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written right now
            break
    return rows


def _show_new_rows(out: Path, shown: int, rounds: int) -> int:
    rows = _read_rows(out)
    for row in rows[shown:]:
        print(progress_line(row, rounds), flush=True)
    return max(shown, len(rows))
