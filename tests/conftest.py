"""What every test shares: offline model hubs, the one local Ray of a test session, and the
rule that a test needing `../shared/data` skips on a user's clone (where it is absent).

Two tiers: `python -m pytest -q` runs the fast tier (everything not marked `slow`);
`python -m pytest -m slow` runs the slow tier (own clusters, kills, job submission, training
sweeps, benchmark smoke runs, large coverage simulations). `.ci/run` runs both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from data_support import shared_data  # noqa: F401 - re-exported for tests that need real data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub from a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _start_shared_ray() -> None:
    import ray

    from api_support import install_fake_credentials

    install_fake_credentials()  # before ray.init: API actors inherit them, as on a real machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    """The test session's one local Ray, started on first use and kept to the end.

    Jobs called in-process find it initialised and use it (`actors.ray_env.connect`), so a test
    pays Ray's start-up once per session, not once per module. A test that needs a cluster of
    its own takes `own_ray` (or a module fixture `own_ray_module`) instead."""
    import ray

    if not ray.is_initialized():
        _start_shared_ray()
    yield


@pytest.fixture(autouse=True)
def _ray_local_is_up(request):
    """A test that takes `ray_local` after one that shut it down (`own_ray`) starts it again."""
    if "ray_local" in request.fixturenames:
        import ray

        if not ray.is_initialized():
            _start_shared_ray()


@contextmanager
def _no_shared_ray() -> Iterator[None]:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a job given --address would otherwise find it and use it
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def own_ray():
    """For a test that starts its own Ray or cluster (node loss, `ray start`, a job that must
    start Ray itself): the shared Ray is shut down first (the next `ray_local` user starts it
    again), and whatever this test connected to is shut down after it."""
    with _no_shared_ray():
        yield


@pytest.fixture(scope="module")
def own_ray_module():
    """`own_ray` for a module's fixtures (a cluster shared by the module's tests)."""
    with _no_shared_ray():
        yield


def pytest_collection_modifyitems(config, items):
    """A slow test says in its docstring what it proves (what the fast tier cannot)."""
    missing = sorted({item.nodeid.split("[")[0] for item in items
                      if item.get_closest_marker("slow") and not (getattr(item, "function", None) and
                                                                  (item.function.__doc__ or "").strip())})
    if missing:
        raise pytest.UsageError("slow tests without a docstring saying what they prove: " + ", ".join(missing))


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return
    if ray.is_initialized():
        ray.shutdown()
