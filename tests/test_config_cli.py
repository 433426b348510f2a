"""Config validation names the bad field; the `dsmooth` command line runs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import ConfigError, load_config, parse_config, to_dict


@dataclass
class Inner:
    sigmas: list[float]
    objective: Literal["mse", "stab"] = "mse"

    def validate(self) -> None:
        for i, sigma in enumerate(self.sigmas):
            if sigma <= 0:
                raise ConfigError(f"sigmas[{i}]", f"must be positive, got {sigma}")


@dataclass
class Outer:
    name: str
    sweep: Inner
    epochs: int = 3
    output: Path = Path("runs")
    tags: dict[str, str] = field(default_factory=dict)


def test_valid_config_parses_and_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nsweep: {sigmas: [0.25, 1], objective: stab}\noutput: out\n")
    config = load_config(Outer, path, overrides={"epochs": 5, "name": None})
    assert config == Outer("a", Inner([0.25, 1.0], "stab"), 5, Path("out"))
    assert parse_config(Outer, to_dict(config)) == config


@pytest.mark.parametrize(
    "data,field_name,words",
    [
        ({"name": "a", "sweep": {"sigmas": [1]}, "epoch": 2}, "epoch", "unknown"),
        ({"name": "a", "sweep": {"sigmas": [1], "objectiv": "mse"}}, "sweep.objectiv", "unknown"),
        ({"sweep": {"sigmas": [1]}}, "name", "required"),
        ({"name": "a", "sweep": {"sigmas": [0.25, -1]}}, "sweep.sigmas[1]", "positive"),
        ({"name": "a", "sweep": {"sigmas": [0.25, "x"]}}, "sweep.sigmas[1]", "number"),
        ({"name": "a", "sweep": {"sigmas": [1], "objective": "clf2"}}, "sweep.objective", "not one of"),
        ({"name": "a", "sweep": {"sigmas": [1]}, "epochs": 2.5}, "epochs", "integer"),
        ({"name": "a", "sweep": {"sigmas": [1]}, "epochs": True}, "epochs", "integer"),
    ],
)
def test_errors_name_the_bad_field(data, field_name, words):
    with pytest.raises(ConfigError) as error:
        parse_config(Outer, data)
    assert error.value.field == field_name
    assert f"'{field_name}'" in str(error.value) and words in str(error.value)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_explains_the_tool_and_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "denoised smoothing" in result.stdout and "models" in result.stdout


def test_models_command_lists_the_registry():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    for name in ("dncnn", "dncnn_wide", "memnet", "cifar_resnet110"):
        assert name in result.stdout


def test_unknown_command_fails():
    result = run_cli("no-such-command")
    assert result.returncode != 0 and "invalid choice" in result.stderr
