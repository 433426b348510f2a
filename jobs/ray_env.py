"""Connecting a job to Ray: a cluster when given, otherwise a local Ray started for the user."""

from __future__ import annotations

import argparse
import os


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (e.g. ray://head:10001 or auto). Default: $RAY_ADDRESS when set "
        "(as inside `ray job submit`), otherwise a local Ray is started for this command.",
    )


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """ray.init once: the given address, $RAY_ADDRESS, or a fresh local instance. Returns
    True when this call started a local Ray (the caller shuts it down when done)."""
    import ray

    from jobs.logs import no_colour_reset_at_exit, ray_init_options

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
    finally:
        no_colour_reset_at_exit()
