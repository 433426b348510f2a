"""How a `certify-api` run is scheduled, Ray-free: which `pipeline.certify.run.CertifyRun`s
it makes of the API sampler (`actors.api_sampler`), and what its summary says (`Summary`,
printed by `format_summary`).

- fixed n (`FixedPlan`): every query each unvoted image still needs, one image per work item;
- sequential (`SequentialPlan`): the clean query of every image first (its label), then
  estimation chunks of undecided images only (`pipeline.apis.run.state`).

An image that cannot be read is skipped by the run before any of its queries is sent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.apis.books.querylog import Spend
from pipeline.runs.fs import Location

log = logging.getLogger("dsmooth")

# What one work item of the API sampler is (its `mode`).
FIXED, CLEAN_QUERIES, SEQUENTIAL = "fixed", "clean", "sequential"


class FixedPlan:
    """Fixed n: every query each unvoted image still needs, one image per work item; an
    image is finished once its vote rows are written."""

    def __init__(self, config: Any, context: Any, state: Any) -> None:
        self.config, self.context, self.state = config, context, state
        self.rows = [row for row, r in enumerate(context.records) if not state.images[r.image_id].voted]
        self.progress = _NoProgress()

    def finished(self) -> bool:
        return self.state.pending_queries() == 0

    def announce(self, dataset: Any, arch: Any, run_dir: Any) -> None:
        log.info("certify-api [%s]: %d images (%d already done), sigma=%s, n0=%d, n=%d, denoiser=%s, "
                 "%d queries to go -> %s", self.config.api.provider, len(dataset), len(self.state.complete()),
                 self.config.sigma, self.config.n0, self.config.n, arch or "none", self.state.pending_queries(),
                 run_dir)

    def run(self, sampler: Any) -> None:
        from pipeline.certify.run import CertifyRun, FixedSchedule

        sampler.mode = FIXED
        schedule = FixedSchedule.of(self.context, [self.context.records[r] for r in self.rows], 1)
        self.progress = _progress(sampler, len(self.rows))
        CertifyRun(self.context, sampler, schedule, progress=self.progress).run()

    def summarise(self, summary: Any) -> None:
        state = self.state
        summary.images_complete = len(state.complete())
        summary.images_incomplete = state.incomplete_after_retries()
        summary.skipped = len(self.context.skipped)
        skipped = {s["image_id"] for s in self.context.skipped}
        summary.pending_queries = sum(len(state.needed - s.rows.keys()) for i, s in state.images.items()
                                      if not s.voted and i not in skipped)


class SequentialPlan:
    """Sequential (`pipeline.apis.run.state`): the clean query of every image first (its
    label), then estimation chunks of undecided images only, one chunk per work item and one
    in flight per image (growth 0: every query is paid, none is spent after a decision). A
    chunk counts once every query in it is answered (the answers are in the journal
    already); its vote row is written, then the certifier decides in chunk order. An image
    with a query that got no answer after every retry waits for the next invocation."""

    def __init__(self, config: Any, context: Any, state: Any) -> None:
        from pipeline.stats.sequential import SequentialTest

        self.config, self.context, self.state = config, context, state
        self.test = SequentialTest.from_settings(config)
        self.total = len(context.records)
        self.failed: set[int] = set()
        self.progress = _NoProgress()
        self._restart()
        self._write_missing_rows()

    def _restart(self) -> None:
        """The certifier from every answer so far (`replay`), and its scheduler: one chunk in
        flight per undecided image (growth 0, nothing ahead), so no query is paid after a
        decision. Skipped (unreadable) images are withdrawn."""
        import numpy as np

        from pipeline.apis.run.state import api_certifier
        from pipeline.certify.schedule import ChunkScheduler

        self.certifier = api_certifier(self.test, [self._answers(row) for row in range(self.total)])
        skipped = [row for row, r in enumerate(self.context.records)
                   if r.image_id in {s["image_id"] for s in self.context.skipped}]
        if skipped:
            self.certifier.withdraw(np.asarray(skipped, dtype=np.int64))
        self.scheduler = ChunkScheduler(self.certifier, growth=0.0, ahead=1)

    def _answers(self, row: int) -> dict:
        return self.state.images[self.context.image_ids[row]].rows

    def needs_clean(self, row: int) -> bool:
        from pipeline.apis.query import CLEAN

        skipped = {s["image_id"] for s in self.context.skipped}
        return (CLEAN, 0) not in self._answers(row) and self.context.image_ids[row] not in skipped

    def undecided(self) -> int:
        """Images still to decide: those sampling, and those still waiting for their label."""
        import numpy as np

        return int(np.count_nonzero(self.certifier.decisions().needs_samples)) + sum(
            self.needs_clean(row) for row in range(self.total))

    def finished(self) -> bool:
        return self.undecided() == 0

    def announce(self, dataset: Any, arch: Any, run_dir: Any) -> None:
        log.info("certify-api [%s] sequential: %d images (%d decided), sigma=%s, R=%s, n_max=%d, chunks of %d, "
                 "denoiser=%s -> %s", self.config.api.provider, len(dataset), len(dataset) - self.undecided(),
                 self.config.sigma, self.config.radius, self.test.n_max, self.test.chunk_size, arch or "none",
                 run_dir)

    def _write_missing_rows(self) -> None:
        """Chunks answered in full whose vote rows are missing (a kill in between): write them."""
        from pipeline.apis.run.state import chunk_answers, chunk_vote_row, clean_label
        from pipeline.runs.storage import read_votes, write_votes

        stored = read_votes(self.state.run_dir)
        have = set(zip(stored["image_id"], stored["chunk"])) if not stored.empty else set()
        rows = []
        for row, image_id in enumerate(self.context.image_ids):
            answers = self._answers(row)
            if clean_label(answers) is None:
                continue
            for k in range(int(self.certifier.next_chunk["estimation"][row])):
                if (image_id, k) not in have:
                    chunk = chunk_answers(self.test, answers, k)
                    rows.append(chunk_vote_row(answers, chunk, k, self.state.identity, self.state.run_id))
        write_votes(self.state.run_dir, rows, worker="certify-api")

    def run(self, sampler: Any) -> None:
        """The labels first (one CertifyRun of clean queries), then the chunks (another)."""
        from pipeline.certify.run import CertifyRun, FixedSchedule, SequentialSchedule

        progress = self.progress = _progress(sampler, self.undecided(), sequential=True)
        clean = [row for row in range(self.total) if self.needs_clean(row)]
        if clean:
            sampler.mode = CLEAN_QUERIES
            schedule = FixedSchedule.of(self.context, [self.context.records[r] for r in clean], 1)
            CertifyRun(self.context, sampler, schedule, progress=progress).run()
            self.failed |= sampler.failed
            if sampler.stopped:
                return
            self._restart()  # the new labels: the certifier starts again from every answer
        sampler.mode = SEQUENTIAL
        schedule = SequentialSchedule(self.scheduler, self.context.image_ids, self.config.seed, self.test.chunk_size,
                                      1)
        CertifyRun(self.context, sampler, schedule, progress=progress).run()
        self.failed |= sampler.failed

    def summarise(self, summary: Any) -> None:
        """The run's sequential figures for the summary (every invocation: from the answers)."""
        import numpy as np

        decisions = self.certifier.decisions()
        skipped = {s["image_id"] for s in self.context.skipped}
        kept = np.array([i not in skipped for i in self.context.image_ids], bool)
        decided = ~decisions.needs_samples & np.array([not self.needs_clean(r) for r in range(self.total)], bool)
        decided &= kept
        summary.images_complete = int(decided.sum())
        summary.images_incomplete = sorted(self.context.image_ids[r] for r in self.failed if not decided[r])
        summary.pending_queries = 0
        summary.skipped = len(skipped)
        summary.undecided = int(kept.sum()) - summary.images_complete
        summary.certified = int(decisions.certified[decided].sum())
        summary.radius = self.test.radius
        drawn = decisions.samples + decisions.unused_samples
        summary.queries_per_image = float((drawn[decided] + 1).mean()) if decided.any() else 0.0
        summary.fixed_queries = self.config.n0 + self.config.n + 1
        if summary.undecided and summary.status == "complete":
            summary.status = "failed"


class _NoProgress:
    def close(self) -> None:
        """Nothing was started."""


def _progress(sampler: Any, total: int, sequential: bool = False) -> Any:
    from pipeline.progress import Progress

    return Progress("certify-api", total, unit="images decided" if sequential else "images", rate_unit="samples",
                    extra=sampler.spent, eta=not sequential)


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
