"""`certify --sequential` and `reduce` of a sequential run, end to end: real Ray (one local
instance for the module), real Parquet, the shipped CIFAR-10 models on a handful of images.

What is checked: the run's decisions are exactly `replay` of its stored chunk rows; a run
that lost part of its votes (as a kill does) resumes to identical decisions; reduce
recomputes them (and at another alpha only from the drawn chunks); the identity holds
the sequential settings and alpha, and nothing new for fixed-n runs; chunks that come back
out of order are decided in order; bad flags are one-line errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cifar_support import two_per_class
from jobs.cli import main as cli_main
from pipeline.certify.plan import CertifyConfig, certify_identity
from pipeline.stats.sequential import ESTIMATION, ChunkVotes, SequentialCertifier, SequentialTest, Status, replay
from pipeline.certify.schedule import ChunkScheduler, chunk_votes_from_rows
from pipeline.runs.storage import VOTE_SCHEMA, VOTES, RunMismatchError, open_run, read_votes

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"
SIGMA, RADIUS, N_MAX, CHUNK = 0.25, 0.25, 600, 32
# Images of the 20 below with every kind of outcome for the shipped pair at R = 0.25:
# certified early (11, 14, 18), given up early (0, 6), sampled long (16).
IDS = [0, 6, 11, 14, 16, 18]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return two_per_class(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def local_ray(ray_local):
    """The session's one Ray (tests/conftest.py), fake API credentials in its workers."""


def settings(cifar_root: Path, output: Path, **overrides) -> dict:
    values = {
        "dataset": "cifar10", "data_root": str(cifar_root), "ids": IDS, "classifier": str(MODELS / "classifier.pt"),
        "denoiser": str(MODELS / "denoiser_mse_s0.25.pt"), "sigma": SIGMA, "n": N_MAX, "chunk_size": CHUNK,
        "batch_size": 64, "actors": 1, "sequential": True, "radius": RADIUS, "output": str(output),
    }
    values.update(overrides)
    return values


def run_certify(in_process: bool = False, **values):
    from jobs.certify import certify

    return certify(CertifyConfig(**values), in_process=in_process)


def stored_replay(output: Path, alpha: float | None = None) -> tuple[np.ndarray, object]:
    """Decisions rebuilt here from the raw Parquet chunk rows (not through the job's code)."""
    frame = pa.concat_tables(pq.read_table(p, schema=VOTE_SCHEMA) for p in VOTES.parts(output)).to_pandas()
    test_fields = {k: v for k, v in _identity(output)["sequential"].items() if k != "certify_class"}
    test = SequentialTest(**{**test_fields, **({"alpha": alpha} if alpha else {})})
    rows_of = {image_id: row for row, image_id in enumerate(IDS)}
    labels = frame.drop_duplicates("image_id").set_index("image_id").loc[IDS, "label"].to_numpy()
    return labels, replay(test, chunk_votes_from_rows(frame, rows_of), labels=labels).decisions()


def _identity(output: Path) -> dict:
    import json

    return json.loads((output / "run.json").read_text())["identity"]


def same_decisions(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True)
               for f in ("status", "reason", "target", "radius", "p_lower", "estimation_votes", "estimation_samples"))


@pytest.fixture(scope="module")
def uninterrupted(local_ray, cifar_root, tmp_path_factory):
    output = tmp_path_factory.mktemp("seq") / "run"
    outcome = run_certify(**settings(cifar_root, output))
    return output, outcome


# --------------------------------------------------------------------------- no Ray


def test_flags_without_sequential_or_out_of_reach_are_one_line_errors(capsys, tmp_path):
    common = ["certify", "--dataset", "cifar10", "--data-root", str(tmp_path), "--classifier", "c.pt",
              "--sigma", "0.25", "--output", str(tmp_path / "out")]
    cases = [
        (["--radius", "0.25"], "radius only applies with sequential"),
        (["--n-max", "500"], "n_max only applies with sequential"),
        (["--sequential", "--radius", "3"], "cannot be certified"),
        (["--sequential", "--mode", "predict"], "needs mode certify"),
    ]
    for argv, expected in cases:
        code = cli_main([*common, *argv])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and expected in errors[0], (argv, errors)
    assert not (tmp_path / "out").exists()


def test_identity_holds_sequential_settings_and_alpha_only_when_sequential(tmp_path, cifar_root):
    from pipeline.data import open_dataset
    from pipeline.certify.pair import ModelBytes, load_pair

    split = open_dataset("cifar10", cifar_root, "test")
    _, info = load_pair(ModelBytes.read(MODELS / "classifier.pt"), ModelBytes.read(MODELS / "denoiser_mse_s0.25.pt"),
                        split.describe(), sigma=SIGMA)
    fixed = {k: v for k, v in settings(cifar_root, tmp_path / "o").items()
             if k not in ("sequential", "radius")}
    # Fixed n: the identity is what it was before sequential existed (old runs still resume),
    # and alpha is not part of it (reduce recomputes at any alpha).
    base = certify_identity(CertifyConfig(**fixed), split, info)
    assert "sequential" not in base
    assert certify_identity(CertifyConfig(**fixed, alpha=0.01), split, info) == base
    seq = certify_identity(CertifyConfig(**settings(cifar_root, tmp_path / "o")), split, info)
    assert seq["sequential"]["alpha"] == 0.001 and seq["sequential"]["radius"] == RADIUS
    assert seq["sequential"]["n_max"] == N_MAX and seq["sequential"]["chunk_size"] == CHUNK
    assert {k: v for k, v in seq.items() if k != "sequential"} == base
    for change in ({"alpha": 0.01}, {"radius": 0.5}, {"n_max": 300}, {"futility_alpha": 0.1},
                   {"certify_class": "top"}, {"futility": "mixture"}):
        other = certify_identity(CertifyConfig(**settings(cifar_root, tmp_path / "o", **change)), split, info)
        assert other != seq, change
    # ... so a run directory refuses to resume under another alpha.
    open_run(tmp_path / "run", seq)
    other = certify_identity(CertifyConfig(**settings(cifar_root, tmp_path / "o", alpha=0.01)), split, info)
    with pytest.raises(RunMismatchError, match="sequential"):
        open_run(tmp_path / "run", other)


def test_chunks_coming_back_out_of_order_are_decided_in_order():
    """The scheduler hands out chunks ahead, they return in any order; the decisions equal
    those of the chunks applied in order, whatever the arrival order."""
    rng = np.random.default_rng(5)
    test = SequentialTest(sigma=0.25, alpha=0.001, n_max=640, chunk_size=16, radius=0.25)
    p = np.array([0.99, 0.9, 0.7, 0.5, 0.3, 0.95, 0.85, 0.6])
    labels = np.zeros(len(p), dtype=np.int64)
    votes = {(row, c): int(rng.binomial(16, p[row])) for row in range(len(p)) for c in range(40)}
    reference = replay(test, [ChunkVotes(ESTIMATION, np.array([r for r, _ in votes]), np.array([c for _, c in votes]),
                                         np.full(len(votes), 16), np.array(list(votes.values())))], labels=labels)
    scheduler = ChunkScheduler(SequentialCertifier(test, labels=labels), growth=1.0, ahead=3)
    in_flight: list = []
    reordered = 0
    while not scheduler.finished:
        tasks = scheduler.next_chunks(48)
        # Work goes to undecided images only: a decided image frees its share at once.
        assert all(scheduler.cert.status[t.row] == Status.UNDECIDED for t in tasks)
        in_flight += tasks
        if not tasks or rng.random() < 0.5:
            rng.shuffle(in_flight)  # answer a random half, in random order
            back, in_flight = in_flight[: max(1, len(in_flight) // 2)], in_flight[max(1, len(in_flight) // 2):]
            reordered += any(a.chunk > b.chunk for a, b in zip(back, back[1:]) if a.row == b.row)
            for task in back:
                scheduler.accept(ESTIMATION, [task.row], [task.chunk], [16], np.array([votes[(task.row, task.chunk)]]))
    assert reordered, "the test never returned chunks out of order"
    assert same_decisions(scheduler.cert.decisions(), reference.decisions())
    assert (scheduler.cert.decisions().status != Status.UNDECIDED).all()


def _drawn_per_image(test: SequentialTest, p: np.ndarray, items_in_flight: int = 2, seed: int = 0) -> np.ndarray:
    """Drive a `ChunkScheduler` as one actor with `items_in_flight` work items does (the pool's
    per_actor), answering the oldest item each step; the samples drawn per image."""
    rng = np.random.default_rng(seed)
    scheduler = ChunkScheduler(SequentialCertifier(test, labels=np.zeros(len(p), dtype=np.int64)))
    drawn, items = np.zeros(len(p), dtype=np.int64), []
    while not scheduler.finished:
        tasks = scheduler.next_chunks(10_000) if len(items) < items_in_flight else []
        if tasks:
            items.append(tasks)
            for t in tasks:
                drawn[t.row] += test.chunk_samples(t.phase, t.chunk)
            continue
        for t in items.pop(0):  # the oldest item comes back
            size = test.chunk_samples(t.phase, t.chunk)
            scheduler.accept(t.phase, [t.row], [t.chunk], [size], np.array([rng.binomial(size, p[t.row])]))
    return drawn


def test_clear_images_draw_no_chunk_ahead_in_the_growing_first_chunks():
    """An image whose votes all go one way (R = sigma = 0.25, alpha = 0.001) is decided by 64
    samples; with a second work item in flight, as the pool keeps per actor, it must not have
    drawn its next chunk (64 more) already. A hard image, past the first chunks, still runs
    ahead so the actor never waits on the driver."""
    from pipeline.sampling.noise import growing_schedule

    test = SequentialTest(sigma=0.25, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25,
                          first_chunks=growing_schedule(256), futility="geometric")
    clear = _drawn_per_image(test, np.ones(20))
    assert clear.max() <= 100 and clear.min() == 64, clear
    hard = ChunkScheduler(SequentialCertifier(test, labels=np.zeros(1, dtype=np.int64)))
    for chunk in range(len(test.first_chunks) + 4):  # past the first chunks, votes at the threshold
        size = test.chunk_samples(ESTIMATION, chunk)
        assert [t.chunk for t in hard.next_chunks(size)] == [chunk]
        hard.accept(ESTIMATION, [0], [chunk], [size], np.array([round(size * test.threshold)]))
    first = hard.next_chunks(256)
    assert first and hard.next_chunks(256), "no chunk ahead for a hard image: the actor would idle"


def test_old_fixed_n_parts_without_chunk_column_still_read(tmp_path):
    """Parts written before the `chunk` column existed read it as null: fixed-n rows."""
    from pipeline.reduce import certificates_from_votes

    old_schema = pa.schema([f for f in VOTE_SCHEMA if f.name != "chunk"])
    rows = [{"image_id": 0, "phase": phase, "n": n, "counts": counts, "label": 3, "sigma": 0.25}
            for phase, n, counts in (("selection", 10, [0, 0, 0, 10]), ("estimation", 100, [0, 1, 0, 99]))]
    table = pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in old_schema}, schema=old_schema)
    (tmp_path / "votes").mkdir()
    pq.write_table(table, tmp_path / "votes" / "part-old.parquet")
    votes = read_votes(tmp_path)
    assert len(votes) == 2 and votes["chunk"].isna().all()
    certs = certificates_from_votes(votes, 0.001, sigma=0.25)
    assert certs["predict"].tolist() == [3] and certs["radius"].iloc[0] > 0 and "samples" not in certs


# --------------------------------------------------------------------------- real Ray


def test_sequential_run_stores_chunks_and_its_decisions_are_their_replay(uninterrupted):
    output, outcome = uninterrupted
    frame = read_votes(output)
    raw = pa.concat_tables(pq.read_table(p, schema=VOTE_SCHEMA) for p in VOTES.parts(output)).to_pandas()
    assert len(frame) == len(raw.drop_duplicates(["image_id", "phase", "chunk"]))  # one row per chunk
    assert frame["chunk"].notna().all() and set(frame["phase"]) == {ESTIMATION}  # labelled: no selection
    assert (frame["n"] == CHUNK).all() and (frame["counts"].map(sum) <= frame["n"]).all()
    assert set(frame["image_id"]) == set(IDS)
    # Each image's chunks are 0, 1, 2, ... without a gap.
    for _, rows in frame.groupby("image_id"):
        assert sorted(rows["chunk"]) == list(range(len(rows)))
    labels, replayed = stored_replay(output)
    decisions = outcome.decisions
    assert same_decisions(decisions, replayed)
    assert (decisions.status != Status.UNDECIDED).all()
    certified = decisions.certified
    assert 0 < certified.sum() < len(IDS), "the images should not all end alike"
    assert (decisions.target[certified] == labels[certified]).all() and (decisions.radius[certified] >= RADIUS).all()
    # Stopped early: far fewer samples than n per image, and the summary says so.
    summary = outcome.sequential
    assert summary.certified == certified.sum() and summary.samples_used == decisions.samples.mean()
    assert summary.samples_drawn < N_MAX / 2
    assert f"{summary.certified} of {len(IDS)} images certified at R = {RADIUS:g}" in outcome.report()


def test_resume_after_lost_votes_gives_identical_decisions(local_ray, uninterrupted, cifar_root, tmp_path):
    """A kill loses the parts not yet written: here each image keeps only the first half of
    its chunks, and the longest one also loses its chunk 1 (a gap: the chunks after it are
    drawn again). The rerun draws what is missing with the same noise and reaches exactly
    the same decisions, and a finished run is left as it is."""
    import shutil

    from pipeline.runs.storage import write_votes

    reference_dir, reference = uninterrupted
    output = tmp_path / "run"
    shutil.copytree(reference_dir, output)
    raw = pa.concat_tables(pq.read_table(p, schema=VOTE_SCHEMA) for p in VOTES.parts(output)).to_pandas()
    chunks = raw.groupby("image_id")["chunk"].transform("max") + 1
    longest = raw.loc[chunks.idxmax(), "image_id"]
    keep = (raw["chunk"] < (chunks + 1) // 2) & ~((raw["image_id"] == longest) & (raw["chunk"] == 1))
    keep |= (raw["image_id"] == longest) & (raw["chunk"] == 2)
    for part in VOTES.parts(output):
        part.delete()
        (output / "votes" / (part.name + ".json")).unlink(missing_ok=True)  # runs before manifests/ had it here
    write_votes(output, raw[keep].to_dict("records"))
    _, partial = stored_replay(output)
    assert (partial.status == Status.UNDECIDED).any(), "nothing left to resume"
    # Other speed settings: they never change a decision.
    outcome = run_certify(**settings(cifar_root, output, batch_size=32, actors=2))
    assert same_decisions(outcome.decisions, reference.decisions)
    assert 0 < outcome.sequential.drawn_now < reference.sequential.drawn_now  # only what was lost
    assert same_decisions(stored_replay(output)[1], reference.decisions)
    before = sorted(p.name for p in VOTES.parts(output))
    again = run_certify(**settings(cifar_root, output))
    assert same_decisions(again.decisions, reference.decisions) and sorted(p.name for p in VOTES.parts(output)) == before
    assert again.sequential.drawn_now == 0


def test_reduce_recomputes_a_sequential_run(capsys, uninterrupted, tmp_path):
    output, outcome = uninterrupted
    decisions = outcome.decisions
    per_image = tmp_path / "per_image.csv"
    table = tmp_path / "table.csv"
    code = cli_main(["reduce", str(output), "--alpha", "0.001", "--radii", "0", "0.25", "0.5", "--format", "csv",
                     "--output", str(table), "--per-image", str(per_image)])
    assert code == 0
    rows = pd.read_csv(per_image).set_index("image_id").loc[IDS]
    certified = decisions.certified
    assert np.allclose(rows["radius"], np.where(certified, decisions.radius, 0.0))
    assert (rows.loc[certified, "radius"] >= RADIUS).all() and (rows.loc[~certified, "radius"] == 0).all()
    assert (rows["samples"].to_numpy() == decisions.samples).all()
    assert (rows["abstained"].to_numpy() == ~certified).all()
    csv = pd.read_csv(table)
    assert np.allclose(csv["samples_per_image"], decisions.samples.mean())
    at_r = csv.loc[csv["radius"] == RADIUS, "certified_accuracy"].iloc[0]
    assert at_r == pytest.approx(certified.mean())
    capsys.readouterr()
    assert cli_main(["reduce", str(output), "--radii", "0.25"]) == 0
    assert "samples/image" in capsys.readouterr().out
    # Another alpha: a valid replay of the same chunks (no new samples); a stricter alpha
    # certifies a subset, and an image it cannot decide with those chunks is not certified.
    from pipeline.reduce import load_run

    strict = load_run(output, 1e-6).set_index("image_id").loc[IDS]
    _, replayed = stored_replay(output, alpha=1e-6)
    assert (strict["abstained"].to_numpy() == ~replayed.certified).all()
    assert not (replayed.certified & ~certified).any()


# --------------------------------------------------------------------------- certify-api


API_IDS = [0, 3, 11, 74]  # RGB and grayscale images of ../shared/data/imagenet-val-100
API_RADIUS = 0.125


@pytest.fixture()
def emulator():
    from pipeline.apis.emulator import EmulatorServer

    with EmulatorServer(seed=1) as server:
        yield server


def run_api(emulator, output: Path, **overrides):
    from api_support import job_config
    from jobs.certify_api import certify_api
    from pipeline.apis.run.prepare import load_job_config

    values = {"n0": 20, "n": 100, "alpha": 0.001, "budget.max_queries": 10_000, **overrides}
    config = job_config("aws", emulator.url, output, API_IDS, **values)
    if "chunk_size" not in overrides:
        config.pop("chunk_size")  # the job's own default (8 for a sequential API run)
    return certify_api(load_job_config(config))


def per_image(output: Path, alpha: float = 0.001) -> pd.DataFrame:
    from pipeline.reduce import load_run

    return pd.DataFrame(load_run(output, alpha)).set_index("image_id").sort_index()


def test_certify_api_sequential_fewer_queries_same_certificates_budget_and_resume(local_ray, emulator, tmp_path):
    """The paper's API setting (n0 = 20, n = 100: 121 queries per image with the clean one)
    against sequential at R = 0.125 with the API defaults (chunks of 8, n_max 240): at least
    3x fewer queries, no fewer certificates at R. A run stopped by its query budget stops at
    exactly that many calls and resumes, asking no query twice, to identical decisions."""
    fixed = run_api(emulator, tmp_path / "fixed")
    fixed_calls = emulator.calls("aws")
    assert fixed.status == "complete" and fixed_calls == len(API_IDS) * 121
    fixed = per_image(tmp_path / "fixed")  # certified accuracy: the clean answer certified at R
    fixed_certified = int((fixed["correct"] & (fixed["radius"] >= API_RADIUS)).sum())

    seq = run_api(emulator, tmp_path / "seq", sequential=True, radius=API_RADIUS)
    seq_calls = emulator.calls("aws") - fixed_calls
    assert seq.status == "complete" and seq.undecided == 0 and seq.images_complete == len(API_IDS)
    assert seq_calls * 3 <= fixed_calls, (seq_calls, fixed_calls)
    assert seq.certified >= fixed_certified and seq.certified > 0
    assert seq.queries_per_image == pytest.approx(seq_calls / len(API_IDS))
    assert seq.certificates_per_dollar == pytest.approx(seq.certified / (seq_calls / 1000))
    certs = per_image(tmp_path / "seq")  # replay of the stored chunk rows
    assert int((certs["correct"] & (certs["radius"] >= API_RADIUS)).sum()) == seq.certified
    assert (certs["samples"] + 1).sum() <= seq_calls  # every used sample was asked (plus the clean query)

    # Stopped by the budget, then resumed: exactly the budget, nothing asked twice, same decisions.
    budget = 30
    before = emulator.calls("aws")
    first = run_api(emulator, tmp_path / "cut", sequential=True, radius=API_RADIUS, **{"budget.max_queries": budget})
    assert first.status == "budget" and emulator.calls("aws") - before == budget == first.attempts
    second = run_api(emulator, tmp_path / "cut", sequential=True, radius=API_RADIUS)
    # One chunk at a time per image: no query for a decided image, so the interrupted run asked
    # exactly what the uninterrupted one did -- none twice (the answered ones are reused).
    assert second.status == "complete" and emulator.calls("aws") - before == seq_calls
    assert second.run.calls == seq_calls
    resumed = per_image(tmp_path / "cut")
    assert resumed[["predict", "radius", "samples", "abstained"]].equals(certs[["predict", "radius", "samples", "abstained"]])
    assert second.certified == seq.certified


def test_certify_api_sequential_flags_are_checked(capsys, tmp_path):
    from api_support import job_config
    from pipeline.apis.run.prepare import load_job_config
    from pipeline.config import ConfigError

    config = job_config("aws", "http://127.0.0.1:1", tmp_path, API_IDS, sequential=True, radius=API_RADIUS)
    config.pop("chunk_size")
    loaded = load_job_config(config)
    assert (loaded.chunk_size, loaded.n_max) == (8, 240)  # the API defaults
    with pytest.raises(ConfigError, match="radius only applies with sequential"):
        load_job_config(job_config("aws", "http://127.0.0.1:1", tmp_path, API_IDS, radius=API_RADIUS))
    with pytest.raises(ConfigError, match="certify_class"):
        load_job_config(job_config("aws", "http://127.0.0.1:1", tmp_path, API_IDS, sequential=True,
                                   certify_class="top"))


def test_sequential_run_with_a_diffusion_denoiser(cifar_root, tmp_path):
    """A sigma-independent diffusion denoiser (the shipped small DDPM, a diffusers folder)
    works in a sequential run like any denoiser: the run's sigma picks its timestep, chunks
    are stored and the decisions are their replay (counted in this process: no Ray needed)."""
    pytest.importorskip("diffusers")
    output = tmp_path / "run"
    outcome = run_certify(in_process=True, **settings(cifar_root, output, denoiser=str(MODELS / "ddpm_small"),
                                                      ids=IDS[:3]))
    frame = read_votes(output)
    assert set(frame["denoiser"]) == {"diffusers_unet"} and frame["chunk"].notna().all()
    frame = pa.concat_tables(pq.read_table(p, schema=VOTE_SCHEMA) for p in VOTES.parts(output)).to_pandas()
    test_fields = {k: v for k, v in _identity(output)["sequential"].items() if k != "certify_class"}
    rows_of = {image_id: row for row, image_id in enumerate(IDS[:3])}
    labels = frame.drop_duplicates("image_id").set_index("image_id").loc[IDS[:3], "label"].to_numpy()
    replayed = replay(SequentialTest(**test_fields), chunk_votes_from_rows(frame, rows_of), labels=labels).decisions()
    assert same_decisions(outcome.decisions, replayed)
    assert (outcome.decisions.status != Status.UNDECIDED).all()
