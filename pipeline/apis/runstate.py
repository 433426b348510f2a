"""Driver-side bookkeeping of an API certification (no Ray): which queries each image still
needs, when an image is complete (its vote rows are then written at once), what was spent,
and the end-of-run report."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pipeline.apis.plan import Key, WorkUnit, needed_keys, plan_image
from pipeline.apis.querylog import DONE_STATUSES, read_query_log, vote_rows, write_queries
from pipeline.storage import completed_images, write_json_atomic, write_votes

SPEND_FILE = "spend.json"
LOCK_FILE = ".certify-api.lock"


class RunLockedError(RuntimeError):
    """Another certify-api job is writing this run directory."""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Exclusive lock on the run directory: two jobs would send duplicate (paid) queries."""
    path = Path(run_dir) / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"another certify-api job is running on {run_dir}") from None
        yield
    finally:
        handle.close()


@dataclass
class ImageState:
    image_id: int
    name: str
    rows: dict[Key, dict[str, Any]] = field(default_factory=dict)  # done query rows
    voted: bool = False


class RunState:
    """Tracks done queries per image and writes each image's vote rows when it completes."""

    def __init__(
        self, run_dir: Path, record: Mapping[str, Any], images: Iterable[tuple[int, str]], worker: str = "certify-api"
    ) -> None:
        self.run_dir = Path(run_dir)
        self.identity = record["identity"]
        self.run_id = record["run_id"]
        self.n0, self.n = int(self.identity["n0"]), int(self.identity["n"])
        self.chunk_size = int(self.identity["chunk_size"])
        self.seed = int(self.identity["seed"])
        self.worker = worker
        self.needed = set(needed_keys(self.n0, self.n))
        self.images = {image_id: ImageState(image_id, name) for image_id, name in images}
        voted = completed_images(self.run_dir, ["selection", "estimation"])
        log = read_query_log(self.run_dir)
        for row in log[log["status"].isin(DONE_STATUSES)].to_dict("records"):
            state = self.images.get(int(row["image_id"]))
            if state is not None:
                state.rows[(str(row["phase"]), int(row["sample"]))] = row
        for state in self.images.values():
            state.voted = state.image_id in voted

    def units(self, image_id: int) -> list[WorkUnit]:
        state = self.images[image_id]
        return plan_image(image_id, self.n0, self.n, self.chunk_size, self.seed, done=state.rows.keys())

    def pending_queries(self) -> int:
        return sum(len(self.needed - state.rows.keys()) for state in self.images.values())

    def complete(self) -> list[int]:
        return sorted(i for i, s in self.images.items() if s.voted)

    def write_missing_votes(self) -> list[int]:
        """Images answered in full but without vote rows (a crash in between): write them."""
        return [i for i in self.images if self._maybe_vote(i)]

    def record(self, rows: list[dict[str, Any]]) -> list[int]:
        """Log a returned unit's rows, then vote every image this completed; returns those ids."""
        if not rows:
            return []
        rows = [{**row, "run_id": self.run_id} for row in rows]
        write_queries(self.run_dir, rows, worker=self.worker)
        touched = set()
        for row in rows:
            state = self.images.get(int(row["image_id"]))
            if state is not None and row["status"] in DONE_STATUSES:
                state.rows.setdefault((row["phase"], int(row["sample"])), row)
                touched.add(state.image_id)
        return [i for i in sorted(touched) if self._maybe_vote(i)]

    def _maybe_vote(self, image_id: int) -> bool:
        state = self.images[image_id]
        if state.voted or not self.needed <= state.rows.keys():
            return False
        rows = vote_rows(list(state.rows.values()), self.identity, self.run_id, self.n0, self.n)
        if rows is None:
            return False
        write_votes(self.run_dir, rows, worker=self.worker)
        state.voted = True
        return True


@dataclass
class Summary:
    """What one invocation did; printed at the end and returned to callers (tests)."""

    status: str  # complete | budget | failed | auth | rejected | error
    provider: str
    attempts: int = 0  # calls sent this run, retries included (= budget spent)
    cost: float = 0.0
    answered: int = 0
    malformed: int = 0
    failed: int = 0  # queries left unanswered (given up after retries, or cut short)
    images_total: int = 0
    images_complete: int = 0
    pending_queries: int = 0
    price_per_1000: float = 0.0
    total_attempts: int = 0  # over every invocation on this run directory
    total_cost: float = 0.0
    max_queries: int | None = None
    max_cost: float | None = None
    message: str | None = None

    @property
    def estimated_cost_left(self) -> float:
        return self.pending_queries * self.price_per_1000 / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "estimated_cost_left": self.estimated_cost_left}


def spending_totals(run_dir: Path) -> tuple[int, float]:
    """Calls and cost over every invocation, from the full (not deduplicated) query log."""
    log = read_query_log(run_dir, dedup=False)
    if log.empty:
        return 0, 0.0
    return int(log["attempts"].sum()), float(log["cost"].sum())


def record_spending(run_dir: Path, summary: Summary, started_at: datetime) -> None:
    """Append this invocation to RUN_DIR/spend.json (the ledger of what each run spent)."""
    path = Path(run_dir) / SPEND_FILE
    try:
        ledger = json.loads(path.read_text()) if path.exists() else []
    except ValueError:
        ledger = []
    ledger.append(
        {
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "status": summary.status,
            "attempts": summary.attempts,
            "cost": round(summary.cost, 9),
            "max_queries": summary.max_queries,
            "max_cost": summary.max_cost,
            "pending_queries": summary.pending_queries,
        }
    )
    write_json_atomic(ledger, path)


def format_summary(summary: Summary, run_dir: Path) -> str:
    s = summary
    limits = ", ".join(
        part
        for part in (
            f"{s.max_queries} queries" if s.max_queries is not None else "",
            f"${s.max_cost:.4f}" if s.max_cost is not None else "",
        )
        if part
    )
    headline = {
        "planned": "dry run: nothing was sent",
        "complete": "complete: every image is certified",
        "budget": "stopped: the budget is spent",
        "failed": "stopped: some queries failed after every retry (a rerun asks them again)",
        "auth": "STOPPED: the provider refused the credentials",
        "rejected": "STOPPED: the provider rejected the requests",
        "error": "STOPPED: unexpected error",
    }[s.status]
    lines = [f"certify-api [{s.provider}]: {headline}"]
    if s.message and s.status != "complete":
        lines.append(f"  reason: {s.message}")
    lines.append(
        f"  this run: {s.attempts} calls sent ({s.attempts - s.answered - s.malformed} retried or failed), "
        f"{s.answered} answered, {s.malformed} malformed, {s.failed} unanswered; "
        f"cost ${s.cost:.4f} (budget: {limits})"
    )
    lines.append(f"  run total (all invocations): {s.total_attempts} calls, ${s.total_cost:.4f}")
    lines.append(f"  images: {s.images_complete}/{s.images_total} complete")
    if s.pending_queries:
        lines.append(
            f"  left to do: {s.pending_queries} queries (about ${s.estimated_cost_left:.4f} at "
            f"${s.price_per_1000:.2f}/1000, retries extra); rerun the same command to resume"
        )
    if s.images_complete:
        lines.append(f"  certificates: dsmooth reduce {run_dir}")
    return "\n".join(lines)
