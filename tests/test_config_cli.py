"""Config validation names the bad field; the `dsmooth` command line runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from pydantic import model_validator

from pipeline.config import (
    ConfigError,
    PositiveInt,
    Settings,
    Sigma,
    check_value,
    load_config,
    option,
    parse_config,
    to_dict,
)


class Inner(Settings):
    sigmas: list[Sigma] = option(..., help="noise levels")
    objective: Literal["mse", "stab"] = option("mse", help="objective")


class Outer(Settings):
    name: str = option(..., help="name")
    sweep: Inner = option(..., help="the sweep")
    epochs: PositiveInt = option(3, help="epochs")
    output: Path = option(Path("runs"), help="where")
    tags: dict[str, str] = option(default_factory=dict, help="tags")
    warmup: PositiveInt = option(1, help="warm-up epochs")

    @model_validator(mode="after")
    def _warmup_within_epochs(self) -> Outer:
        if self.warmup > self.epochs:
            raise ConfigError("warmup", f"{self.warmup} warm-up epochs exceed epochs={self.epochs}")
        return self


def test_valid_config_parses_and_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nsweep: {sigmas: [0.25, 1], objective: stab}\noutput: out\n")
    config = load_config(Outer, path, overrides={"epochs": 5, "name": None, "sweep.objective": "mse"})
    assert config == Outer(name="a", sweep=Inner(sigmas=[0.25, 1.0], objective="mse"), epochs=5, output=Path("out"))
    assert parse_config(Outer, to_dict(config)) == config


@pytest.mark.parametrize(
    "data,field_name,words",
    [
        ({"name": "a", "sweep": {"sigmas": [1]}, "epoch": 2}, "epoch", "did you mean 'epochs'"),
        ({"name": "a", "sweep": {"sigmas": [1], "objectiv": "mse"}}, "sweep.objectiv", "did you mean 'objective'"),
        ({"name": "a", "sweep": {"sigmas": [1]}, "zzz": 2}, "zzz", "known: epochs"),
        ({"sweep": {"sigmas": [1]}}, "name", "required"),
        ({"name": "a", "sweep": {"sigmas": [0.25, -1]}}, "sweep.sigmas[1]", "must be > 0, got -1"),
        ({"name": "a", "sweep": {"sigmas": [0.25, "x"]}}, "sweep.sigmas[1]", "number"),
        ({"name": "a", "sweep": {"sigmas": [1], "objective": "clf2"}}, "sweep.objective", "not one of"),
        ({"name": "a", "sweep": {"sigmas": [1]}, "epochs": 2.5}, "epochs", "integer"),
        ({"name": "a", "sweep": {"sigmas": [1]}, "epochs": True}, "epochs", "integer"),
        ({"name": "a", "sweep": {"sigmas": [1]}, "epochs": 2, "warmup": 3}, "warmup", "exceed epochs=2"),
    ],
)
def test_errors_name_the_bad_field(data, field_name, words):
    with pytest.raises(ConfigError) as error:
        parse_config(Outer, data)
    assert error.value.field == field_name
    assert f"'{field_name}'" in str(error.value) and words in str(error.value)


def test_shared_types_validate_library_arguments_the_same_way():
    assert check_value(Sigma, 0.25, "sigma") == 0.25
    for bad in (0, -1.0, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="sigma"):
            check_value(Sigma, bad, "sigma")


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_flags_come_from_the_settings_and_typos_get_suggestions():
    from jobs.options import Parser, add_settings_arguments, flags, load_settings

    parser = Parser(prog="t")
    add_settings_arguments(parser, Outer)
    assert flags(Outer) == {"name": "--name", "sweep.sigmas": "--sigmas", "sweep.objective": "--objective",
                            "epochs": "--epochs", "output": "--output", "warmup": "--warmup"}
    args = parser.parse_args(["--name", "x", "--sigmas", "0.5", "1", "--epochs", "4"])
    config = load_settings(Outer, args, config=None)
    assert config.sweep.sigmas == [0.5, 1.0] and config.epochs == 4 and config.output == Path("runs")
    with pytest.raises(ConfigError) as error:
        load_settings(Outer, parser.parse_args(["--name", "x", "--sigmas", "0", "--epochs", "4"]), config=None)
    assert str(error.value) == "config field 'sweep.sigmas[0]': must be > 0, got 0.0 (--sigmas)"


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


def test_version_and_mistyped_flags():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("dsmooth ")
    result = run_cli("certify", "--sigm", "0.25")
    assert result.returncode == 2 and "did you mean --sigma?" in result.stderr
    # No silent abbreviations: --out is not --output.
    result = run_cli("certify", "--out", "x")
    assert result.returncode == 2 and "unrecognized arguments: --out" in result.stderr
