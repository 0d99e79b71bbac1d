"""A client's state directory: what must outlive one ClientApp process and one run.

Flower starts a fresh ClientApp process for every message, and ``context.state``
lasts one run only. What a client must remember longer (how many rounds it has
trained, hence where its random stream continues; its privacy accountant, which must
compose every release of its data over rounds, restarts and runs) lives in a directory
named after its stable ``client-id``:

- node config ``state-dir`` when given (an absolute path is best; a relative one is
  taken from the SuperNode's working directory);
- otherwise ``$FLWR_HOME/fedcontrast/clients/<client-id>`` when ``FLWR_HOME`` is set
  (``fedcontrast client`` gives each SuperNode its own);
- otherwise ``~/.fedcontrast/clients/<client-id>``.

The directory holds ``state.json``, written atomically (temp file + rename): a crash
leaves the previous state, never half of one. Tensors a client keeps between rounds (a
BYOL client's own online network and target, :mod:`client.byol_round`) go into files of
their own beside it (:meth:`StateDir.save_tensors`), written the same way. One SuperNode runs one ClientApp at a
time, so there is one writer. Format 2 added the privacy fields (accountant, noise
calibration, un-noised pushes); a format-1 file reads as a client that has released
nothing under DP.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.accounting import NoiseCalibration, PrivacyAccountant

STATE_FILE = "state.json"
STATE_FORMAT = "fedcontrast-client-state/2"
_READABLE_FORMATS = ("fedcontrast-client-state/1", STATE_FORMAT)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_client_id(client_id: str) -> str:
    """``client_id`` if it is a safe directory name; ValueError otherwise."""
    if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
        raise ValueError(
            f"client-id {client_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return client_id


def clients_under(flwr_home: Path) -> Path:
    """The folder that holds one state directory per client id under a ``FLWR_HOME``."""
    return flwr_home / "fedcontrast" / "clients"


def default_state_dir(client_id: str, env: Mapping[str, str] | None = None) -> Path:
    """Where ``client_id`` keeps its state when the node config names no ``state-dir``."""
    env = os.environ if env is None else env
    check_client_id(client_id)
    if env.get("FLWR_HOME"):
        return clients_under(Path(env["FLWR_HOME"]).expanduser()) / client_id
    return Path.home() / ".fedcontrast" / "clients" / client_id


@dataclass
class ClientState:
    """Counters of one client, across processes and runs.

    Attributes:
        client_id: the stable identity the directory is named for.
        rounds_trained: rounds this client has trained, over all runs.
        runs: run id (as a string) -> the last round trained in that run.
        accountant: every DP-SGD step and push release of this client's data, over
            all runs (see :mod:`common.accounting`).
        calibration: the DP-SGD noise derived from ``--target-epsilon`` and the plan it
            was derived for; ``None`` until one is derived.
        unnoised_pushes: queue-token digest -> the latest version at which this client
            pushed rows without noise under DP (see :func:`client.privacy.plan_round`).
    """

    client_id: str
    rounds_trained: int = 0
    runs: dict[str, int] = field(default_factory=dict)
    accountant: PrivacyAccountant = field(default_factory=PrivacyAccountant)
    calibration: NoiseCalibration | None = None
    unnoised_pushes: dict[str, int] = field(default_factory=dict)

    def seed(self, base_seed: int, server_round: int) -> int:
        """Seed of this client's random stream in ``server_round`` of a run seeded with
        ``base_seed``: distinct per client and round, and the same when a run is repeated,
        whatever the client trained in between (so a node's second run of one
        configuration repeats its first)."""
        return round_seed(base_seed, self.client_id, server_round)

    def record_round(self, run_id: int, server_round: int) -> None:
        self.rounds_trained += 1
        self.runs[str(run_id)] = server_round


def round_seed(base_seed: int, client_id: str, server_round: int) -> int:
    """Seed of client ``client_id``'s random stream in ``server_round`` (:meth:`StateDir.seed`)."""
    return (base_seed * 1_000_003 + zlib.crc32(client_id.encode()) * 7919 + server_round) % 2**63


class StateDir:
    """The state directory of one client (created on first save)."""

    def __init__(self, path: str | Path, client_id: str) -> None:
        self.path = Path(path).expanduser()
        self.client_id = check_client_id(client_id)

    @property
    def file(self) -> Path:
        return self.path / STATE_FILE

    def load(self) -> ClientState:
        """The saved state, or a fresh one when there is none yet."""
        if not self.file.exists():
            return ClientState(self.client_id)
        try:
            payload: dict[str, Any] = json.loads(self.file.read_text())
            if payload.get("format") not in _READABLE_FORMATS:
                raise ValueError(f"format {payload.get('format')!r}, expected {STATE_FORMAT!r}")
            accountant = payload.get("accountant")
            calibration = payload.get("calibration")
            state = ClientState(
                client_id=str(payload["client_id"]),
                rounds_trained=int(payload["rounds_trained"]),
                runs={str(k): int(v) for k, v in dict(payload.get("runs", {})).items()},
                accountant=(PrivacyAccountant() if accountant is None
                            else PrivacyAccountant.from_state_dict(accountant)),
                calibration=None if calibration is None else NoiseCalibration.from_dict(calibration),
                unnoised_pushes={str(k): int(v) for k, v
                                 in dict(payload.get("unnoised_pushes", {})).items()},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.file} is not a FedContrast client state ({exc})") from exc
        if state.client_id != self.client_id:
            raise ValueError(
                f"{self.file} belongs to client {state.client_id!r}, not {self.client_id!r}: "
                "give each client its own state-dir"
            )
        return state

    def save(self, state: ClientState) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".json.tmp")
        payload = {
            "format": STATE_FORMAT, "client_id": state.client_id,
            "rounds_trained": state.rounds_trained, "runs": state.runs,
            "accountant": state.accountant.state_dict(),
            "calibration": None if state.calibration is None else state.calibration.as_dict(),
            "unnoised_pushes": state.unnoised_pushes,
        }
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.file)
        return self.file

    def load_tensors(self, name: str) -> dict[str, Any] | None:
        """The tensor file ``name`` of this directory (plain data and tensors, loaded with
        ``weights_only``); None when there is none yet. ValueError when it is unreadable."""
        path = self.path / name
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several kinds on a damaged file
            raise ValueError(f"{path} is not a readable tensor file ({exc}); delete it to start afresh") from exc
        if not isinstance(payload, dict):
            raise ValueError(f"{path} holds a {type(payload).__name__}, not a dict of tensors")
        return payload

    def save_tensors(self, name: str, payload: Mapping[str, Any]) -> Path:
        """Write ``payload`` (plain data and tensors) as ``name``, atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(dict(payload), tmp)
        os.replace(tmp, path)
        return path
