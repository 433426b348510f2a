"""`dsmooth COMMAND --help` and a mistyped flag answer from the settings declarations alone:
no torch, no Ray, no data loaders (a fresh interpreter per command, so nothing is loaded
before by another test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "scipy", "pandas", "PIL", "pipeline.data.core", "pipeline.data.sources")
TORCH_SIDE = ("torch", "ray", "PIL", "pipeline.data.core", "pipeline.sampling.engine")

PROBE = """
import sys
from jobs.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print("LOADED", sorted(m for m in {heavy!r} if m in sys.modules), code, file=sys.stderr)
"""


def probe(*argv: str) -> tuple[list[str], int, str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    line = next(line for line in done.stderr.splitlines() if line.startswith("LOADED"))
    loaded, code = line.split(" ", 1)[1].rsplit(" ", 1)
    return eval(loaded), int(code), done.stderr  # noqa: S307 - our own printout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_loads_nothing_heavy(command):
    loaded, code, _ = probe(command, "--help")
    assert code == 0 and loaded == [], (command, loaded)


def test_mistyped_flag_is_named_before_anything_heavy_loads():
    loaded, code, errors = probe("certify", "--sigam", "1")
    assert code == 2 and "did you mean --sigma?" in errors and loaded == [], (loaded, errors)


def test_sequential_settings_are_checked_without_torch():
    """A sequential run's settings (its growing first chunks, cut by `pipeline.sampling.noise`)
    are checked before the run lock is taken, so cutting chunks loads no torch (the reach check
    that follows needs SciPy, not torch)."""
    code = ("import sys\n"
            "from pipeline.certify.config import CertifyConfig\n"
            "from pipeline.config import parse_config\n"
            "config = parse_config(CertifyConfig, {'dataset': 'cifar10', 'data_root': 'd', 'classifier': 'c',\n"
            "                                      'sigma': 0.25, 'output': 'o', 'sequential': True})\n"
            f"print('LOADED', sorted(m for m in {TORCH_SIDE!r} if m in sys.modules), config.first_chunks)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("LOADED [] [32, 32, 64, 128]"), done.stdout
