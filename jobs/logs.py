"""Logging for the command line: dsmooth's own messages on stderr, Ray's kept out of the way.

dsmooth's modules log to the "dsmooth" logger; a command's *result* (a table, a summary) is
printed to stdout. `--quiet` keeps warnings and errors only, `--verbose` adds debug lines
and lets Ray's own output through (its worker logs, its INFO lines). Nothing is coloured:
output often goes to `ray job logs` or a file, where escape codes are noise.
"""

from __future__ import annotations

import logging
import os
import sys

QUIET, NORMAL, VERBOSE = -1, 0, 1
_verbosity = NORMAL


class _Plain(logging.Formatter):
    """`dsmooth: message`, or `dsmooth: warning: message` above INFO."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and _verbosity >= VERBOSE:
            message += "\n" + self.formatException(record.exc_info)
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"dsmooth: {level}{message}"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test captures and redirects replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(verbosity: int = NORMAL, stream=None) -> None:
    """Configure the "dsmooth" logger once per process (commands may call it again)."""
    global _verbosity
    _verbosity = verbosity
    logger = logging.getLogger("dsmooth")
    logger.handlers.clear()
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(_Plain())
    logger.addHandler(handler)
    logger.setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[verbosity])
    logger.propagate = False
    if verbosity < VERBOSE:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        for noisy in ("ray", "ray.train", "ray.tune", "ray.data", "filelock"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def verbose() -> bool:
    return _verbosity >= VERBOSE
