"""Claiming a run directory before anything heavy loads.

A second writer must be refused in seconds, so the lock is taken before torch, scipy, the
models or the data are imported: this module imports only the lock (`pipeline.runs.lock`)
and the file layer, and the jobs take it first thing (`jobs.certify.run`, before even the
settings are validated -- their checks import scipy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.runs.fs import Location


@contextmanager
def claimed_run(output: str | Location, job: str) -> Iterator[Any]:
    """The run's lock, taken before anything is loaded: a second writer is refused in
    seconds, not after the data and models load. A run directory this call created is
    removed again when the job fails before writing to it, so bad settings leave no trace."""
    from pipeline.runs.lock import LOCK_FILE, exclusive_run

    output = Location.of(output)
    existed = output.exists()
    try:
        with exclusive_run(output, job) as lease:
            yield lease
    except BaseException:
        if not existed and output.is_local and output.is_dir() and {p.name for p in output.files()} <= {LOCK_FILE}:
            (output / LOCK_FILE).delete()
            output.local_path.rmdir()
        raise


def claimed_output(args: Any) -> str | None:
    """The run directory a command line names, read without validating the settings (that
    imports scipy): --output, else the `output` key of --config's YAML; None when neither."""
    output = getattr(args, "output", None)
    if output is None and getattr(args, "config", None):
        import yaml

        try:
            with open(args.config) as file:
                data = yaml.safe_load(file)
        except (OSError, yaml.YAMLError):
            return None  # the settings' own reading says what is wrong, in one line
        output = data.get("output") if isinstance(data, dict) else None
    return None if output is None else str(output)
