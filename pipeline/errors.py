"""Errors a user gets as one plain line (exit status 2), never as a traceback."""

from __future__ import annotations


class Refused(Exception):
    """A request refused before or instead of doing work: bad input, a run held by another
    job (or taken over by one, pipeline.runs.lock.LeaseLost), settings that contradict a run.
    The message says what and what to do."""
