"""pyproject.toml's Flower app section and FedConfig cannot drift apart."""

from __future__ import annotations

import tomllib
from pathlib import Path

from common.config import FedConfig, from_run_config, to_run_config
from server.app import EXTRA_RUN_CONFIG

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def flwr_app() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]


def test_run_config_defaults_are_fedconfig_defaults():
    assert flwr_app()["config"] == {**to_run_config(FedConfig()), **EXTRA_RUN_CONFIG}


def test_run_config_types_survive_toml():
    assert from_run_config(FedConfig, flwr_app()["config"]) == FedConfig()


def test_components_and_publisher():
    app = flwr_app()
    assert app["publisher"] == "fedcontrast"
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_no_federations_section():
    # `flwr run` rewrites pyproject.toml when it finds [tool.flwr.federations].
    assert "federations" not in tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]
