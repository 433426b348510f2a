"""The call journal: every paid call of an API run, recorded before it is sent and when answered.

Money is spent per call, so the journal is the run's books. A call is written as `sent`
(with its query: image, phase, sample, attempt) *before* it leaves, and as `answer` (status,
labels, whether the provider bills it) when it returns; both are durable when the writer is
told so. After a crash at any moment, replaying the journal gives every call that may have
been billed (a `sent` without an answer was in flight: it may have reached the provider) and
every answer received (never asked again).

Records are JSON lines in segments under RUN/journal/. Commits are grouped: writers append
to a buffer and wait, and one committer thread writes whatever has gathered in one go -- on
a local disk appended to the invocation's open segment and fsync'd, on object storage (no
appends there) as one new segment object per commit. A torn last line (a crash mid-append)
is ignored on replay. `compact` later turns finished segments into bounded Parquet parts of
the query log (pipeline.apis.books.querylog) and deletes them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.runs.fs import Location, StorageError

log = logging.getLogger("dsmooth")

JOURNAL_DIR = "journal"
SEGMENT_RECORDS = 20_000  # a local segment is closed (a new one started) after this many


class Journal:
    """Append-only, group-committed; `append(record, durable=True)` returns once on disk."""

    def __init__(self, run: str | Location, invocation: str | None = None, commit_every_s: float = 0.005) -> None:
        self.folder = Location.of(run) / JOURNAL_DIR
        self.invocation = invocation or uuid.uuid4().hex[:12]
        self.commit_every_s = commit_every_s
        self._cond = threading.Condition()
        self._buffer: list[dict[str, Any]] = []
        self._appended = 0
        self._committed = 0
        self._error: BaseException | None = None
        self._closed = False
        self._segment = 0
        self._in_segment = 0
        self._handle: Any = None
        self.folder.mkdir()
        self._thread = threading.Thread(target=self._committer, name="dsmooth-journal", daemon=True)
        self._thread.start()

    # -- writing ------------------------------------------------------------------------------

    def append(self, record: dict[str, Any], durable: bool = True) -> None:
        with self._cond:
            if self._error is not None:
                raise StorageError(f"the call journal cannot be written: {self._error}")
            if self._closed:
                raise StorageError("the call journal is closed")
            self._buffer.append(record)
            self._appended += 1
            mine = self._appended
            self._cond.notify_all()
            while durable and self._committed < mine and self._error is None:
                self._cond.wait()
            if durable and self._error is not None:
                raise StorageError(f"the call journal cannot be written: {self._error}")

    def close(self) -> None:
        """Commit what is buffered and stop the committer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _committer(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._cond.wait()
                if not self._buffer and self._closed:
                    return
            # let concurrent writers join this commit (group commit)
            with self._cond:
                self._cond.wait(timeout=self.commit_every_s)
                batch, self._buffer = self._buffer, []
                upto = self._appended
            try:
                self._write(batch)
            except BaseException as error:  # noqa: BLE001 - every waiter must learn of it
                with self._cond:
                    self._error = error
                    self._cond.notify_all()
                log.error("the call journal cannot be written: %s", error)
                return
            with self._cond:
                self._committed = upto
                self._cond.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(record, separators=(",", ":"), default=str) + "\n" for record in batch).encode()
        if self.folder.is_local:
            if self._handle is None or self._in_segment >= SEGMENT_RECORDS:
                if self._handle is not None:
                    self._handle.close()
                self._segment += 1
                self._in_segment = 0
                path = self.folder.local_path / f"seg-{self.invocation}-{self._segment:06d}.jsonl"
                self._handle = open(path, "ab")  # noqa: SIM115 - kept open across commits
            self._handle.write(data)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._in_segment += len(batch)
        else:
            self._segment += 1
            (self.folder / f"seg-{self.invocation}-{self._segment:06d}.jsonl").write_bytes(data)


# -- reading --------------------------------------------------------------------------------------


def segments(run: str | Location) -> list[Location]:
    folder = Location.of(run) / JOURNAL_DIR
    return [s for s in folder.files() if s.name.startswith("seg-") and s.name.endswith(".jsonl")]


def read_segment(segment: Location) -> list[dict[str, Any]]:
    """The records of one segment; a torn last line (crash mid-append) is dropped."""
    records = []
    lines = segment.read_bytes().split(b"\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number >= len(lines) - 2:  # the last, unterminated line
                log.debug("%s: ignoring a torn last record", segment)
                continue
            raise StorageError(
                f"{segment} is damaged at line {number + 1}; the calls it recorded cannot be read. Move it "
                "aside and rerun: answers in it are asked (and paid) again"
            ) from None
    return records


def replay_calls(run: str | Location, exclude: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Every record of every segment (but those named in `exclude`), in segment order."""
    skip = set(exclude)
    for segment in segments(run):
        if segment.name not in skip:
            yield from read_segment(segment)
