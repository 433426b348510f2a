"""actors.pool.WorkPool, the one scheduler: lost actors, actors that never start, items that
raise, and the plain reason when a pool can never be placed. Real Ray, local."""

from __future__ import annotations

import os
import time

import pytest
import ray

from actors.pool import Demand, PlacementError, WorkFailed, WorkPool, drive, placement_problem


pytestmark = pytest.mark.usefixtures("ray_local")  # the session's one Ray (tests/conftest.py)


@ray.remote
class Worker:
    """Squares numbers; dies (the process exits) on a number in `die_on` the first time."""

    def __init__(self, marker_dir: str, slow_s: float = 0.0, fail_init: bool = False) -> None:
        if fail_init:
            raise ValueError("this actor cannot load its model")
        self.marker_dir = marker_dir
        self.slow_s = slow_s

    def describe(self) -> int:
        return os.getpid()

    def square(self, x: int, die_on: tuple[int, ...] = ()) -> tuple[int, int]:
        marker = os.path.join(self.marker_dir, f"died-{x}")
        if x in die_on and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # a crash mid-item, as an OOM kill or a lost node looks to the driver
        if x < 0:
            raise KeyError(f"no square for {x}")
        time.sleep(self.slow_s)
        return x * x, os.getpid()


def start(tmp_path, **options):
    def factory(index: int):
        return Worker.options(num_cpus=0.5, max_restarts=2, max_task_retries=0).remote(str(tmp_path), **options)
    return factory


def run_all(pool: WorkPool, numbers, die_on=()) -> dict[int, int]:
    results: dict[int, int] = {}

    def on_result(key, value):
        assert key not in results, f"item {key} delivered twice"
        results[key] = value[0]

    items = ((x, lambda actor, x=x: actor.square.remote(x, die_on)) for x in numbers)
    error = drive(pool, iter(items), on_result)
    if error is not None:
        raise error
    return results


def test_every_item_once_even_when_an_actor_dies_mid_item(tmp_path):
    pool = WorkPool(start(tmp_path, slow_s=0.05), Demand(2, 0.5, 0), per_actor=2)
    requeued: list[int] = []
    pool.on_requeue = requeued.append
    try:
        results = run_all(pool, range(20), die_on=(3, 11))
    finally:
        pool.shutdown()
    assert results == {x: x * x for x in range(20)}
    assert pool.lost >= 2 and {3, 11} <= set(requeued)


def test_an_item_that_raises_is_not_retried_and_the_pool_goes_on(tmp_path):
    pool = WorkPool(start(tmp_path), Demand(2, 0.5, 0))
    try:
        results: dict[int, int] = {}
        items = iter([(x, lambda actor, x=x: actor.square.remote(x)) for x in (1, -2, 3, 4)])
        error = drive(pool, items, lambda key, value: results.__setitem__(key, value[0]))
        assert isinstance(error, KeyError) and "no square for -2" in str(error)
        assert 1 in results and set(results) <= {1, 3, 4}  # feeding stops at the error
        with pytest.raises(WorkFailed) as caught:
            pool.submit("bad", lambda actor: actor.square.remote(-5))
            while pool.busy():
                pool.next_result(timeout_s=5)
        assert caught.value.key == "bad" and isinstance(caught.value.cause, KeyError)
    finally:
        pool.shutdown()


def test_an_actor_whose_constructor_fails_stops_the_pool_with_its_message(tmp_path):
    pool = WorkPool(start(tmp_path, fail_init=True), Demand(1, 0.5, 0))
    try:
        with pytest.raises(RuntimeError, match="could not start: .*cannot load its model"):
            run_all(pool, range(3))
    finally:
        pool.shutdown()


def test_actors_that_can_never_be_placed_fail_fast_with_the_reason(tmp_path):
    demand = Demand(2, 0.5, 1.0)  # GPUs on a CPU-only cluster
    problem, autoscaling = placement_problem(demand)
    assert not autoscaling and "asked 2 actor(s) x 0.5 CPU + 1 GPU" in problem and "0 GPU in total" in problem
    assert "does not autoscale" in problem

    def factory(index: int):
        return Worker.options(num_cpus=0.5, num_gpus=1).remote(str(tmp_path))

    pool = WorkPool(factory, demand, wait_timeout_s=2.0)
    started = time.monotonic()
    try:
        with pytest.raises(PlacementError, match="no node of the cluster has that"):
            run_all(pool, range(3))
    finally:
        pool.shutdown()
    assert time.monotonic() - started < 30
    assert placement_problem(Demand(1, 0.5, 0))[0] is None  # a CPU actor fits


def test_a_pool_whose_actors_start_late_still_gets_every_item(tmp_path):
    """Actors that need a moment to load do not lose items handed out before they answer."""
    pool = WorkPool(start(tmp_path), Demand(1, 0.5, 0), per_actor=1)
    try:
        assert not pool.has_capacity()  # nothing is ready before the first ping
        assert run_all(pool, range(5)) == {x: x * x for x in range(5)}
    finally:
        pool.shutdown()


@ray.remote
class Recorder:
    """One call at a time, as a GPU actor: each `work` call sleeps, and the calls that began are kept."""

    def __init__(self) -> None:
        self.began: list[str] = []

    def describe(self) -> int:
        return os.getpid()

    def work(self, key: str, seconds: float) -> str:
        self.began.append(key)
        time.sleep(seconds)
        return key

    def calls(self) -> list[str]:
        return self.began


def test_a_settled_run_returns_at_once_without_draining_what_is_in_flight():
    """`settled()` true after a result: drive returns at once, the calls still queued on the
    actor forgotten (not waited for, not handed to `on_result`)."""
    actor = Recorder.options(num_cpus=0).remote()
    pool = WorkPool(lambda index: actor, Demand(1, 0, 0), per_actor=3)
    taken: list[str] = []
    items = iter([(key, lambda a, key=key, s=s: a.work.remote(key, s)) for key, s in (("a", 0.1), ("b", 3), ("c", 3))])
    started = time.monotonic()
    try:
        error = drive(pool, items, lambda key, value: taken.append(key), settled=lambda: "a" in taken)
        elapsed = time.monotonic() - started
        assert error is None and taken == ["a"] and not pool.busy()
        assert elapsed < 3.0, elapsed  # draining would take b's and c's 6 s
        assert ray.get(actor.calls.remote(), timeout=60) == ["a", "b", "c"]  # the actor ran them, unheard
        assert taken == ["a"]
    finally:
        pool.shutdown()
