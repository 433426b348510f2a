"""Progress lines for long work: done / total, rate, ETA, at most one line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Prints e.g. `certify: 120/500 images (24.0%) | 3,410 samples/s | ETA 2m13s`."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "images",
        rate_unit: str = "samples",
        every_s: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.unit, self.rate_unit = label, total, unit, rate_unit
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.work = 0
        self.started = time.monotonic()
        self._last_print = float("-inf")

    def update(self, done: int = 1, work: int = 0) -> None:
        """Record `done` finished items and `work` rate units (samples, queries...)."""
        self.done += done
        self.work += work
        now = time.monotonic()
        if now - self._last_print >= self.every_s or self.done >= self.total:
            self._last_print = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        percent = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.1f}%)"]
        if self.work:
            parts.append(f"{self.work / elapsed:,.0f} {self.rate_unit}/s")
        if 0 < self.done < self.total:
            parts.append(f"ETA {format_duration(elapsed * (self.total - self.done) / self.done)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return " | ".join(parts)
