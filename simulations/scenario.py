"""Named experiment scenarios: TOML files of settings that ``simulate``, ``compare`` and ``privacy`` take.

A scenario file has two tables, both optional::

    description = "ten clients, Dirichlet alpha 0.1: strong label skew"

    [simulation]          # the simulated federation
    num-clients = 10
    client-cpus = 1
    client-gpus = 0.0

    [settings]            # any FedConfig key, spelled as in the run config
    partitioner = "dirichlet"
    dirichlet-alpha = 0.1

``--scenario NAME`` finds ``simulations/scenarios/NAME.toml``; a path names any
file. Flags given on the command line override the scenario.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import FedConfig
from common.errors import UsageError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
SIMULATION_KEYS = ("num-clients", "client-cpus", "client-gpus")


@dataclass(frozen=True)
class Scenario:
    """One scenario file: FedConfig field values and simulation values (field names)."""

    name: str
    description: str
    settings: dict[str, Any]
    simulation: dict[str, Any]


def scenario_names() -> list[str]:
    """The scenarios shipped in ``simulations/scenarios/``."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Read a shipped scenario by name or any scenario file by path; UsageError when malformed."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not text.endswith(".toml"):
        path = SCENARIO_DIR / f"{text}.toml"
        if not path.is_file():
            raise UsageError(f"unknown scenario {text!r}: use one of {', '.join(scenario_names())} "
                             "or the path of a .toml file")
    if not path.is_file():
        raise UsageError(f"no such scenario file: {text}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"scenario {path} is not valid TOML: {exc}") from exc
    unknown = set(data) - {"description", "simulation", "settings"}
    if unknown:
        raise UsageError(f"scenario {path}: unknown top-level keys {sorted(unknown)} "
                         "(expected description, [simulation], [settings])")
    fields = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(FedConfig)}
    settings_in = dict(data.get("settings", {}))
    bad = sorted(set(settings_in) - set(fields))
    if bad:
        raise UsageError(f"scenario {path}: unknown settings {bad} (see the settings in docs/reference.md)")
    sim_in = dict(data.get("simulation", {}))
    bad = sorted(set(sim_in) - set(SIMULATION_KEYS))
    if bad:
        raise UsageError(f"scenario {path}: unknown [simulation] keys {bad} "
                         f"(expected {', '.join(SIMULATION_KEYS)})")
    return Scenario(
        name=path.stem,
        description=str(data.get("description", "")),
        settings={fields[k]: v for k, v in settings_in.items()},
        simulation={k.replace("-", "_"): v for k, v in sim_in.items()},
    )
