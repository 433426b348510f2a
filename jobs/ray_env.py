"""The --address option of the jobs that use Ray (the connection itself: `actors.ray_env.connect`)."""

from __future__ import annotations

import argparse


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (e.g. ray://head:10001 or auto). Default: $RAY_ADDRESS when set "
        "(as inside `ray job submit`), otherwise a local Ray is started for this command.",
    )
