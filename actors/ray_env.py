"""Connecting to Ray: a cluster when given, otherwise a local Ray started for the user.

Here, under actors/, because the samplers connect when they start their pool; the jobs only
add the --address option (`jobs.ray_env`)."""

from __future__ import annotations

import logging
import os
import sys

from pipeline.errors import Refused


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """ray.init once: the given address, $RAY_ADDRESS, or a fresh local instance. Returns
    True when this call started a local Ray (the caller shuts it down when done)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, **ray_init_options())
            return False
        # "local" always starts a new instance, never a stray cluster left on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **ray_init_options())
        return True
    except (ConnectionError, RuntimeError, TimeoutError, OSError, ValueError) as error:
        raise RayStartError(ray_start_problem(error, address)) from None
    finally:
        no_colour_reset_at_exit()


class RayStartError(Refused):
    """Ray could not start or be reached: one line with what to try (exit 2), not Ray's traceback."""


def ray_start_problem(error: BaseException, address: str | None) -> str:
    """What went wrong starting (or reaching) Ray, in one line, and what to try."""
    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    if address:
        return (f"cannot connect to the Ray cluster at {address} ({first[:200]}); check the address (ray status "
                "on the head), the network and RAY_AUTH_TOKEN, or leave --address out to run on this machine")
    return (f"cannot start a local Ray ({first[:200]}); try: ray stop (a stale local instance), free disk space "
            "in /tmp (or set RAY_TMPDIR), or give a running cluster with --address")


def ray_init_options() -> dict:
    """ray.init options for the "dsmooth" logger's level: worker logs and Ray's INFO only when
    it shows debug lines (`--verbose`, `jobs.logs.setup`)."""
    verbose = logging.getLogger("dsmooth").isEnabledFor(logging.DEBUG)
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}


def no_colour_reset_at_exit() -> None:
    """Ray's `ray.init` imports its CLI logger, which calls `colorama.init()` (Ray's own copy of
    colorama); that registers an exit hook writing a colour reset (ESC[0m) to stdout when it
    is a terminal, a stray escape code after the result. dsmooth colours nothing (Ray's
    coloured lines, with --verbose, reset themselves), so the hook goes."""
    import atexit

    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None and hasattr(initialise, "reset_all"):
        atexit.unregister(initialise.reset_all)
