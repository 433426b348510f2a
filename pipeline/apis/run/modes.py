"""How a `certify-api` run is scheduled, Ray-free: which `pipeline.certify.run.CertifyRun`s
it makes of the API sampler (`actors.api_sampler`), and what its summary says.

- fixed n (`FixedPlan`): every query each unvoted image still needs, one image per work item;
- sequential (`SequentialPlan`): the clean query of every image first (its label), then
  estimation chunks of undecided images only (`pipeline.apis.run.chunk_votes`).

An image that cannot be read is skipped by the run before any of its queries is sent.
"""

from __future__ import annotations

import logging
from typing import Any

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
    """Sequential (`pipeline.apis.run.chunk_votes`): the clean query of every image first (its
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

        from pipeline.apis.run.chunk_votes import api_certifier
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
        from pipeline.apis.query.units import CLEAN

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
        from pipeline.apis.run.chunk_votes import chunk_answers, chunk_vote_row, clean_label
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
