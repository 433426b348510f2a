"""The driver at scale (`benchmarks/scale.py`) and what it changed in `CertifyRun` and the
chunk scheduler: votes written in batched parts (a few per run, not one per actor call), and
sequential items spread over the pool's calls in flight -- without changing a single vote or
decision, and without losing a vote to Ctrl-C.

Real Ray (the session's local instance, simulated samplers that sleep instead of computing),
real run directories and Parquet; the S3 case talks to moto on 127.0.0.1.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import scale
from pipeline.certify.schedule import ChunkScheduler
from pipeline.runs.storage import VOTES, read_votes
from pipeline.sampling.noise import growing_schedule
from pipeline.stats.sequential import (
    ESTIMATION,
    SequentialCertifier,
    SequentialTest,
    replay,
)

LINE = re.compile(r"^utilisation ([\d.]+)% \| driver CPU ([\d.]+)% \| parts per image ([\d.]+) \| "
                  r"objects written (\d+) \| wall ([\d.]+) s$")


def figures(text: str) -> tuple[float, float, float, int, float]:
    match = LINE.match(text.strip().splitlines()[-1])
    assert match, text
    u, d, p, o, w = match.groups()
    return float(u), float(d), float(p), int(o), float(w)


def decisions_of(args) -> object:
    """The run's decisions, rebuilt from its stored chunk rows alone."""
    from pipeline.certify.schedule import chunk_votes_from_rows

    test = SequentialTest.from_settings(scale.config_of(args))
    labels = np.arange(args.images) % scale.NUM_CLASSES
    rows = chunk_votes_from_rows(read_votes(args.output), {i: i for i in range(args.images)})
    return replay(test, rows, labels=labels, num_images=args.images).decisions()


def reference_decisions(args) -> object:
    """The decisions the simulated votes give, chunk by chunk in order, without Ray: every
    schedule of the same chunk votes decides alike."""
    from pipeline.sampling.noise import SampleRequest

    config = scale.config_of(args)
    test = SequentialTest.from_settings(config)
    p = scale.p_mix(args.images, args.seed)
    scheduler = ChunkScheduler(SequentialCertifier(test, labels=np.arange(args.images) % scale.NUM_CLASSES))
    while not scheduler.finished:
        for t in scheduler.next_chunks(10**9):
            request = SampleRequest(config.seed, t.row, t.phase, t.total, config.chunk_size, first_chunk=t.chunk,
                                    stop_chunk=t.chunk + 1, first_chunks=test.first_chunks)
            counts = scale.simulated_counts(request, p[t.row], t.row % scale.NUM_CLASSES)
            scheduler.accept(t.phase, [t.row], [t.chunk], [request.num_samples], counts[None, :])
    return scheduler.cert.decisions()


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True)
               for f in ("status", "target", "radius", "p_lower", "estimation_votes", "estimation_samples"))


# ------------------------------------------------------------------------------ no Ray


def test_spread_items_share_the_work_out_and_hand_out_the_same_chunks():
    """With `spread`, an item takes about 1/spread of what may go out (never under `least`),
    and the chunks handed out are exactly those handed out without it."""
    test = SequentialTest(sigma=0.25, alpha=0.001, n_max=10_000, chunk_size=256, radius=0.25,
                          first_chunks=growing_schedule(256))
    labels = np.zeros(40, dtype=np.int64)
    whole = ChunkScheduler(SequentialCertifier(test, labels=labels)).next_chunks(10**9)
    spread = ChunkScheduler(SequentialCertifier(test, labels=labels))
    items = []
    while True:
        tasks = spread.next_chunks(10**9, spread=8, least=64)
        if not tasks:
            break
        items.append(tasks)
    assert sorted((t.row, t.chunk) for item in items for t in item) == sorted((t.row, t.chunk) for t in whole)
    sizes = [sum(test.chunk_samples(ESTIMATION, t.chunk) for t in item) for item in items]
    assert sizes[0] == 40 * 32 // 8, sizes  # 40 first chunks of 32 over 8 items
    assert all(size >= 64 for size in sizes[:-1]), sizes  # the last takes what is left


def test_sequential_items_are_sized_to_the_actors_measured_rate():
    """Before a result: `item_samples`. After results of N samples in E seconds of compute:
    about item_seconds x N / E samples (at least least_seconds' worth), and the next item keeps to it."""
    from dataclasses import fields, replace

    from pipeline.certify.run import Finished, SequentialSchedule
    from pipeline.runs.storage import VoteRow

    test = SequentialTest(sigma=0.25, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25,
                          first_chunks=growing_schedule(256))
    labels = np.zeros(400, dtype=np.int64)
    schedule = SequentialSchedule(ChunkScheduler(SequentialCertifier(test, labels=labels)), list(range(400)), 0, 256,
                                  1600, slots=4, item_seconds=0.5, least_seconds=0.125)
    assert schedule.item_size() == (1600, 0)
    items = schedule.items()
    work = next(items)
    assert sum(q.num_samples for q in work.requests) == 1600  # 400 x 32 offered, 1/4 of it
    blank = VoteRow(**{f.name: None for f in fields(VoteRow)})
    rows = [replace(blank, n=q.num_samples, elapsed_s=q.num_samples / 4000) for q in work.requests]  # 4,000/s
    counts = np.zeros((len(work.tasks), 10), dtype=np.int64)
    counts[:, 0] = [q.num_samples for q in work.requests]  # every vote for the label
    schedule.accept(Finished(work, rows, counts))
    most, least = schedule.item_size()
    assert abs(most - 2000) <= 1 and abs(least - 500) <= 1  # 4,000 samples/s x 0.5 s (x 0.125 s)
    nxt = next(items)
    assert 500 <= sum(q.num_samples for q in nxt.requests) < 2000 + 256  # the last chunk may overshoot


def test_the_in_process_sampler_counts_nothing_after_the_run_is_settled():
    """As the pool: once `settled()` (every image decided), the items still queued are dropped,
    not counted."""
    from pipeline.certify.inprocess import InProcessSampler
    from pipeline.certify.run import Work

    counted: list[int] = []
    sampler = InProcessSampler(None, read=lambda row: None,
                               count=lambda requests, images: counted.append(len(counted)) or np.zeros((0, 10)),
                               rows=lambda *_: [], in_flight=3)
    items = [item for row in range(3) for item in sampler.submit(Work((row,)), {})[0]]
    taken: list[int] = []
    sampler.drive(iter(items), lambda key, result: taken.append(key), lambda key: None, lambda: None,
                  settled=lambda: bool(taken))
    assert counted == [0] and taken == [items[0][0]]


# ------------------------------------------------------------------------------ real Ray


def test_scale_benchmark_prints_consistent_figures(ray_local, tmp_path, capsys):
    output = tmp_path / "run"
    text = scale.main(["--actors", "4", "--samples-per-s", "20000", "--images", "12", "--sequential",
                       "--n", "2000", "--output", str(output)])
    assert text in capsys.readouterr().out
    utilisation, driver, per_image, objects, wall = figures(text)
    parts = VOTES.parts(output)
    assert 0 < utilisation <= 100 and 0 < driver and wall > 0
    assert per_image == pytest.approx(len(parts) / 12, abs=0.005) and per_image <= 2
    # Every part has its manifest; plus run.json and the lock file.
    assert objects == len(list(output.rglob("*"))) - len([p for p in output.rglob("*") if p.is_dir()])
    assert objects >= 2 * len(parts) + 1
    votes = read_votes(output)
    assert set(votes["image_id"]) == set(range(12))  # every image has its votes stored
    assert (decisions_of(scale.parse(["--images", "12", "--sequential", "--n", "2000", "--output", str(output)]))
            .status != 0).all()  # and every image is decided by them


def test_fixed_run_on_s3_writes_few_objects(ray_local, tmp_path):
    args = ["--actors", "2", "--samples-per-s", "20000", "--images", "30", "--n", "200",
            "--output", "s3://scale-test/run"]
    text = scale.main(args)
    _, _, per_image, objects, _ = figures(text)
    assert 0 < per_image <= 1 and objects < 30  # one part + manifest per write window, not per shard


def test_batched_parts_and_spread_items_keep_the_decisions(ray_local, tmp_path):
    """Batched parts and paced, spread items: the stored votes replay to the decisions of the
    same chunk votes applied in order (no Ray, no schedule), in far fewer parts than calls.
    The run ends with its last decision: no result is waited for after it (the chunks still
    in flight then were drawn ahead for decided images; short items leave several in flight)."""
    args = scale.parse(["--actors", "3", "--samples-per-s", "20000", "--images", "24", "--sequential", "--n", "3000",
                        "--item-seconds", "0.02", "--output", str(tmp_path / "run")])
    after_the_last: list[bool] = []

    def watch(run) -> None:
        take = run.on_result

        def on_result(key, result):
            after_the_last.append(run.schedule.settled)
            return take(key, result)

        run.on_result = on_result

    result = scale.run_once(args, before_run=watch)
    assert same(decisions_of(args), reference_decisions(args))
    assert result.calls > 4 * result.parts, (result.calls, result.parts)
    assert after_the_last and not any(after_the_last)


def test_idle_shares_split_the_time_not_busy():
    """Per actor: before its first call (start-up), between calls (steady), after its last
    (tail), over actors x wall; calls clamped to the wall, so with the busy share they sum to 1."""
    spans = [[(1.0, 2.0), (2.5, 4.0)], [], [(-1.0, 9.0)]]  # an actor that never worked; one busy past the wall
    shares = scale.idle_shares(spans, 0.0, 5.0)
    assert shares == pytest.approx({"start-up": (1 + 5) / 15, "steady": 0.5 / 15, "tail": 1 / 15})


def test_ctrl_c_writes_what_came_back_and_the_rerun_loses_nothing(ray_local, tmp_path):
    """Ctrl-C with votes not yet written: they are written before the run stops (every
    result taken is stored), and the rerun ends with the decisions the votes give."""
    from pipeline.certify.run import Interrupted

    cut = scale.parse(["--actors", "3", "--samples-per-s", "20000", "--images", "24", "--sequential", "--n", "3000",
                       "--output", str(tmp_path / "cut")])
    taken: list[int] = []

    def stop_after_ten(run) -> None:
        run.write_every_s = 3600.0  # after the first part, nothing is written until the stop
        take = run.on_result

        def on_result(key, result):
            if len(taken) == 10:
                raise KeyboardInterrupt
            taken.append(len(result[0]))
            return take(key, result)

        run.on_result = on_result

    with pytest.raises(Interrupted):
        scale.run_once(cut, before_run=stop_after_ten)
    stored = read_votes(cut.output)  # the first result at once, the nine after it at Ctrl-C
    assert len(stored) == sum(taken) and len(VOTES.parts(cut.output)) == 2
    scale.run_once(cut)
    assert same(decisions_of(cut), reference_decisions(cut))


class _Planned(Exception):
    """Stops a benchmark run once its schedule is made (the test wants the plan, not the run)."""


def test_a_fixed_run_sized_by_dsmooth_tapers_its_shards_at_the_end(ray_local, tmp_path):
    """`certify`'s fixed-n schedule (the job's own, as the benchmark builds it) cuts shards of the
    default size and tapers them at the end, down to single images, so the run does not end on
    a round of full shards that keeps most actors idle; every image is in one shard, in order."""
    shards: list[list[int]] = []

    def plan(run):
        shards.extend([r.image_id for r in shard.records] for shard in run.schedule.shards)
        raise _Planned

    args = scale.parse(["--actors", "2", "--samples-per-s", "20000", "--images", "200", "--n", "2000",
                        "--output", str(tmp_path / "run")])
    with pytest.raises(_Planned):
        scale.run_once(args, before_run=plan)
    sizes = [len(shard) for shard in shards]
    assert sizes[0] == 4 and sizes == sorted(sizes, reverse=True) and sizes[-2:] == [1, 1]
    assert [image for shard in shards for image in shard] == list(range(200))
