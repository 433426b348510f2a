"""Errors a user gets as one plain line (exit status 2), never as a traceback.

A refusal that names a setting the user can give (`give --classifier-mean M M M`) names it
with `setting`, once, where the check is; how it is worded is the front end's: a
command-line flag by default, a keyword argument of the Python API (`classifier_mean=(M, M, M)`)
while `python_wording()` holds (`dsmooth.certify`, `dsmooth.load_model`). One check, one
message, two wordings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

FLAG, KEYWORD = "flag", "keyword"
_WORDING: ContextVar[str] = ContextVar("dsmooth_setting_wording", default=FLAG)


class Refused(Exception):
    """A request refused before or instead of doing work: bad input, a run held by another
    job (or taken over by one, pipeline.runs.lock.LeaseLost), settings that contradict a run.
    The message says what and what to do."""


def setting(name: str, example: str | bool = "") -> str:
    """The setting `name` (its field name: `classifier_mean`) as the front end words it, with
    an `example` value: placeholders in capitals ("M M M", "FILE"), a literal choice ("none"),
    or True for a switch. Command line: `--classifier-mean M M M`, `--classifier-preprocessing
    none`, `--sequential`; Python: `classifier_mean=(M, M, M)`, `classifier_preprocessing="none"`,
    `sequential=True`."""
    if _WORDING.get() == KEYWORD:
        return f"{name}={_python_value(example)}"
    flag = cli_flag(name)
    return flag if example is True or example == "" else f"{flag} {example}"


def cli_flag(name: str) -> str:
    """A setting's command-line flag unless its field declares another (jobs.options.flag_of)."""
    return "--" + name.rsplit(".", 1)[-1].replace("_", "-")


def _python_value(example: str | bool) -> str:
    if isinstance(example, bool):
        return str(example)
    words = example.split()
    if not words:
        return ""
    if all(word.isupper() for word in words):  # placeholders stay bare: M M M -> (M, M, M)
        return words[0] if len(words) == 1 else f"({', '.join(words)})"
    return repr(example).replace("'", '"')


@contextmanager
def python_wording() -> Iterator[None]:
    """Settings named in the errors raised inside are worded as Python keyword arguments."""
    token = _WORDING.set(KEYWORD)
    try:
        yield
    finally:
        _WORDING.reset(token)
