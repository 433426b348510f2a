"""Progress of long work: done / total, rate and ETA, item by item.

On a terminal it is an in-place bar (tqdm); anywhere else (`ray job logs`, a file, a CI log)
a plain line every `every_s` seconds, and one at the end, through the "dsmooth" logger.
An optional `extra()` adds a job's own figure, e.g. the money an API run has spent.
The Python API (`dsmooth.certify(progress=...)`) decides for its call with `shown`: a bar
(`tqdm.auto`: a widget in a notebook) whatever the logging set-up, or nothing at all.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

log = logging.getLogger("dsmooth")
_shown: bool | None = None  # `shown`'s choice; None: the command line's rule (a bar on a terminal)


@contextmanager
def shown(on: bool) -> Iterator[None]:
    """Within this block every Progress is a bar (True, even when the "dsmooth" logger is not
    set up, as in a notebook) or silent (False). Why: a library call has no --quiet flag and
    no configured logger, and an 80 s call that shows nothing looks hung."""
    global _shown
    before, _shown = _shown, bool(on)
    try:
        yield
    finally:
        _shown = before


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """e.g. `certify: 120/500 images (24.0%) | 3,410 samples/s | ETA 2m13s`."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "images",
        rate_unit: str = "samples",
        every_s: float = 10.0,
        stream: TextIO | None = None,
        extra: Callable[[], str] | None = None,
        bar: bool | None = None,
        eta: bool = True,
    ) -> None:
        """`eta=False` for work whose remainder is not proportional to what is done (a
        sequential run: easy images decide first, the hard ones take most samples): elapsed
        time only, and `done` counts decided images."""
        self.label, self.total, self.unit, self.rate_unit = label, total, unit, rate_unit
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.extra = extra
        self.done = 0
        self.work = 0
        self.eta = eta
        self.started = time.monotonic()
        self._last_line = float("-inf")
        interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._silent = _shown is False
        if _shown:
            from tqdm.auto import tqdm
        elif (interactive if bar is None else bar) and log.isEnabledFor(logging.INFO) and not self._silent:
            from tqdm import tqdm
        else:
            tqdm = None
        if tqdm is not None:

            self._bar = tqdm(total=total, desc=label, unit=unit.split(" ")[0].rstrip("s") or "it", file=self.stream,
                             dynamic_ncols=True, leave=True,
                             bar_format=None if eta else "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, done: int = 0, work: int = 0) -> None:
        """Add `done` finished items and `work` rate units (samples, queries...)."""
        self.set(self.done + done, self.work + work)

    def set(self, done: int, work: int | None = None) -> None:
        """Absolute figures (e.g. items written plus those finished in flight)."""
        self.done = max(0, min(done, self.total))
        if work is not None:
            self.work = work
        if self._bar is not None:
            self._bar.n = self.done
            postfix = self._rate()
            if self.extra is not None:
                postfix = f"{postfix}, {self.extra()}" if postfix else self.extra()
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()
            return
        if self._silent:
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            log.info("%s", self.line())

    def close(self) -> None:
        """The final figures: the bar's last state, or one last line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self._silent:
            log.info("%s", self.line())

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return f"{self.work / elapsed:,.0f} {self.rate_unit}/s" if self.work else ""

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        percent = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.1f}%)"]
        if self.work:
            parts.append(self._rate())
        if self.extra is not None:
            parts.append(self.extra())
        if self.eta and 0 < self.done < self.total:
            parts.append(f"ETA {format_duration(elapsed * (self.total - self.done) / self.done)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return " | ".join(parts)
