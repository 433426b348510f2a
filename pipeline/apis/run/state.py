"""Driver-side bookkeeping of an API certification (no Ray): which queries each image still
needs, when an image is complete (its vote rows are then written at once), what the run has
spent (from the call journal, every invocation and kill included), and the report."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.apis.query.units import Key, WorkUnit, needed_keys, plan_image
from pipeline.apis.books.querylog import OK, Spend, answer_vote_rows, read_query_log
from pipeline.runs.fs import Location
from pipeline.runs.storage import completed_images, write_votes
from pipeline.runs.storage import VoteRow

log = logging.getLogger("dsmooth")


@dataclass
class ImageState:
    image_id: int
    name: str
    rows: dict[Key, dict[str, Any]] = field(default_factory=dict)  # answered (ok) queries
    voted: bool = False
    failed: set[Key] = field(default_factory=set)  # queries that failed every retry this run


class QueryState:
    """Answered queries per image (from the query log); an image's vote rows once complete."""

    def __init__(
        self, run_dir: str | Location, record: Mapping[str, Any], images: Iterable[tuple[int, str]],
        worker: str = "certify-api",
    ) -> None:
        self.run_dir = Location.of(run_dir)
        self.identity = record["identity"]
        self.run_id = record["run_id"]
        self.n0, self.n = int(self.identity["n0"]), int(self.identity["n"])
        self.chunk_size = int(self.identity["chunk_size"])
        self.seed = int(self.identity["seed"])
        self.worker = worker
        self.needed = set(needed_keys(self.n0, self.n))
        self.images = {image_id: ImageState(image_id, name) for image_id, name in images}
        voted = completed_images(self.run_dir, ["selection", "estimation"])
        log_frame = read_query_log(self.run_dir)
        for row in log_frame[log_frame["status"] == OK].to_dict("records"):
            state = self.images.get(int(row["image_id"]))
            if state is not None:
                state.rows[(str(row["phase"]), int(row["sample"]))] = row
        for state in self.images.values():
            state.voted = state.image_id in voted
        lost = [s.image_id for s in self.images.values() if s.voted and not self.needed <= s.rows.keys()]
        if lost:
            # Votes stand (reduce uses them); only recomputing them from answers is impossible.
            log.warning("%d image(s) have votes but their answers are missing from the query log (a lost or "
                        "damaged log part); their certificates stand and nothing is asked again, but "
                        "`votes_from_queries` cannot rebuild them", len(lost))

    def units(self, image_id: int) -> list[WorkUnit]:
        state = self.images[image_id]
        if state.voted:
            return []
        return plan_image(image_id, self.n0, self.n, self.chunk_size, self.seed, done=state.rows.keys())

    def pending_queries(self) -> int:
        return sum(len(self.needed - s.rows.keys()) for s in self.images.values() if not s.voted)

    def complete(self) -> list[int]:
        return sorted(i for i, s in self.images.items() if s.voted)

    def incomplete_after_retries(self) -> list[int]:
        return sorted(i for i, s in self.images.items() if s.failed and not s.voted)

    def answered_map(self) -> dict[tuple[int, str, int], dict[str, Any]]:
        """(image, phase, sample) -> answer, for the ledger (never ask these again)."""
        return {(i, phase, sample): {k: row.get(k) for k in ("top_label", "labels", "scores", "status")}
                for i, s in self.images.items() for (phase, sample), row in s.rows.items()}

    def write_missing_votes(self) -> list[int]:
        """Images answered in full but without vote rows (a crash in between): write them."""
        written = []
        for image_id in self.images:
            rows = self.complete_rows(image_id)
            if rows:
                write_votes(self.run_dir, rows, worker=self.worker)
                written.append(image_id)
        return written

    def record(self, rows: list[dict[str, Any]]) -> list[tuple[int, list[VoteRow]]]:
        """Take a returned unit's rows (its answers are in the journal already); returns
        (image, vote rows) of every image this completed, for the run to write."""
        touched = set()
        for row in rows:
            state = self.images.get(int(row["image_id"]))
            if state is None:
                continue
            key = (row["phase"], int(row["sample"]))
            if row["status"] == OK:
                state.rows.setdefault(key, row)
                state.failed.discard(key)
                touched.add(state.image_id)
            else:
                state.failed.add(key)
        done = [(i, self.complete_rows(i)) for i in sorted(touched)]
        return [(i, rows) for i, rows in done if rows]

    def complete_rows(self, image_id: int) -> list[VoteRow] | None:
        """The vote rows of an image answered in full and not voted yet (it counts as voted
        from here on); None otherwise."""
        state = self.images[image_id]
        if state.voted or not self.needed <= state.rows.keys():
            return None
        rows = answer_vote_rows(list(state.rows.values()), self.identity, self.run_id, self.n0, self.n)
        if rows is None:
            return None
        state.voted = True
        return rows


@dataclass
class Summary:
    """What one invocation did, and the run's totals; printed at the end, returned to callers."""

    status: str  # planned | complete | budget | failed | auth | rejected | error
    provider: str
    attempts: int = 0  # calls sent by this invocation, retries included (what the budget counts)
    billable: int = 0  # of those, what the provider bills
    cost: float = 0.0  # attempts x price (+ tokens x price): what the budget holds against its limits
    tokens: int = 0  # token-priced providers: tokens this invocation spent
    answered: int = 0  # queries answered now
    retried: dict[str, int] = field(default_factory=dict)  # failed calls by status (all retried)
    failed: int = 0  # queries with no valid answer after every retry
    images_total: int = 0
    images_complete: int = 0
    images_incomplete: list[int] = field(default_factory=list)
    pending_queries: int = 0
    price_per_1000: float = 0.0
    run: Spend = field(default_factory=lambda: Spend(0, 0, 0))  # every invocation of the run
    limits: str = ""
    message: str | None = None
    # Sequential runs (certified None otherwise): images decided / certified at `radius`, and
    # the queries per decided image (clean query included) against a fixed-n run's n0 + n + 1.
    certified: int | None = None
    undecided: int = 0
    radius: float | None = None
    queries_per_image: float = 0.0
    fixed_queries: int = 0
    skipped: int = 0  # unreadable images skipped (--on-bad-image skip): no query was sent for them

    @property
    def certificates_per_dollar(self) -> float | None:
        """Certificates of the run per dollar the run spent (None before anything was paid)."""
        if self.certified is None or self.run_cost <= 0:
            return None
        return self.certified / self.run_cost

    @property
    def run_cost(self) -> float:
        return self.run.cost(self.price_per_1000)

    @property
    def estimated_cost_left(self) -> float:
        """Queries left x the price of a call: the list price, plus for token-priced calls the
        run's average token cost per call so far (0 before any)."""
        per_call = self.price_per_1000 / 1000.0 + (self.run.token_cost / self.run.calls if self.run.calls else 0.0)
        return self.pending_queries * per_call

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "run_cost": self.run_cost, "estimated_cost_left": self.estimated_cost_left,
                "certificates_per_dollar": self.certificates_per_dollar}


HEADLINES = {
    "planned": "dry run: nothing was sent",
    "complete": "complete: every image is finished (all its queries answered)",
    "budget": "stopped: the budget is spent",
    "failed": "stopped: some queries got no valid answer after every retry (a rerun asks them again)",
    "auth": "STOPPED: the provider refused the credentials",
    "rejected": "STOPPED: the provider rejected the requests",
    "error": "STOPPED: unexpected error",
}


def format_summary(s: Summary, run_dir: str | Location) -> str:
    headline = HEADLINES[s.status]
    if s.status == "complete" and s.certified is not None:
        headline = "complete: every image is decided"
    lines = [f"certify-api [{s.provider}]: {headline}"]
    if s.message and s.status != "complete":
        lines.append(f"  reason: {s.message}")
    retried = ", ".join(f"{n} {status}" for status, n in sorted(s.retried.items())) or "none"
    lines.append(
        f"  this invocation: {s.attempts} calls sent ({s.billable} billable), {s.answered} queries answered, "
        f"calls retried: {retried}; " + (f"{s.tokens} tokens, " if s.tokens else "")
        + f"cost ${s.cost:.4f} at list price" + (f" (limits: {s.limits})" if s.limits else "")
    )
    unconfirmed = f", {s.run.unconfirmed} unconfirmed (in flight when a run was killed)" if s.run.unconfirmed else ""
    tokens = f"{s.run.tokens} tokens, " if s.run.tokens else ""
    lines.append(f"  run total: {s.run.calls} calls, {tokens}${s.run_cost:.4f} ({s.run.billable} billable{unconfirmed})")
    done = "decided" if s.certified is not None else "finished"
    lines.append(f"  images: {s.images_complete}/{s.images_total} {done}" + (f", {s.skipped} skipped (unreadable)"
                                                                             if s.skipped else ""))
    if s.certified is not None:
        where = f"at R = {s.radius:g}" if s.radius is not None else "(largest-radius mode)"
        ratio = s.fixed_queries / s.queries_per_image if s.queries_per_image else float("inf")
        per_dollar = s.certificates_per_dollar
        lines.append(
            f"  sequential: {s.certified} of {s.images_complete} decided images certified {where}, "
            f"{s.images_complete - s.certified} not certified; "
            f"{s.queries_per_image:.1f} queries per image (clean query included) vs {s.fixed_queries} with fixed "
            f"n0 + n: {ratio:.1f}x fewer; "
            + (f"{per_dollar:.1f} certificates per dollar" if per_dollar is not None else "nothing paid yet"))
        if s.undecided:
            lines.append(f"  undecided: {s.undecided} image(s); rerun the same command to resume")
    if s.images_incomplete:
        lines.append(f"  incomplete: {len(s.images_incomplete)} image(s) with queries that got no valid answer "
                     f"(not counted as wrong; a rerun asks them again): ids {s.images_incomplete[:10]}")
    if s.pending_queries:
        rate = (f"the run's ${s.run.token_cost / s.run.calls:.6f} per call so far" if s.run.tokens and s.run.calls
                else f"${s.price_per_1000:.2f}/1000")
        lines.append(
            f"  left to do: {s.pending_queries} queries (about ${s.estimated_cost_left:.4f} at "
            f"{rate}, retries extra); rerun the same command to resume"
        )
    if s.images_complete:
        lines.append(f"  certificates: dsmooth reduce {run_dir}")
    return "\n".join(lines)
