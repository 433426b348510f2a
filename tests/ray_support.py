"""Ray in the tests: a guard for "refused before Ray" checks that holds whether or not the
session's shared Ray is running."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def forbid_ray_start() -> Iterator[None]:
    """Inside, a job that reaches Ray fails the test: every job connects through
    `actors.ray_env.connect` (looked up at call time), which raises here."""
    import actors.ray_env

    def refuse(*_, **__):
        raise AssertionError("the command connected to Ray; it should have stopped before")

    real, actors.ray_env.connect = actors.ray_env.connect, refuse
    try:
        yield
    finally:
        actors.ray_env.connect = real
