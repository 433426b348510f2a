"""dsmooth's log records, whatever the logging set-up: the CLI's `jobs.logs.setup` stops
propagation to the root logger (where pytest's caplog listens), so tests listen on the
"dsmooth" logger itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def dsmooth_records(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("dsmooth")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, previous) if previous else level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
