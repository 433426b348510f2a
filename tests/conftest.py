"""What every test shares: offline model hubs, the one local Ray of a test session, and the
rule that a test needing `../shared/data` skips on a user's clone (where it is absent).

Two tiers: `python -m pytest -q` runs the fast tier (everything not marked `slow`);
`python -m pytest -m slow` runs the slow tier (own clusters, kills, job submission, training
sweeps, benchmark smoke runs, large coverage simulations). `.ci/run` runs both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub from a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under `../shared/data`; the calling test skips with a one-line reason when it is
    absent (a user's clone has no `../shared`; CI has it)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {Path('..', 'shared', 'data', *parts)} (real data beside the checkout; absent here)")
    return path


def _start_shared_ray() -> None:
    import ray

    from api_support import install_fake_credentials

    install_fake_credentials()  # before ray.init: API actors inherit them, as on a real machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture
def ray_local():
    """The test session's one local Ray (started on first use, kept for the next test).

    Jobs called in-process find it initialised and use it (`jobs.ray_env.connect`), so a test
    pays Ray's start-up once per session, not once per module. A test that needs a cluster of
    its own takes `own_ray` instead."""
    import ray

    if not ray.is_initialized():
        _start_shared_ray()
    yield
    if not ray.is_initialized():  # the test shut it down: the next one starts it again
        return


@pytest.fixture
def own_ray():
    """For a test that starts its own Ray or cluster (node loss, `ray start`, a job that must
    start Ray itself): the shared one is shut down first and started again by the next
    `ray_local` user; whatever the test started is shut down after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return
    if ray.is_initialized():
        ray.shutdown()
