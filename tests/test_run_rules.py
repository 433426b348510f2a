"""The rules of one certification run, checked in this process without Ray
(`pipeline.certify.inprocess`): what is saved when a run is interrupted, what a resume
draws, which images are skipped, and how a sequential run decides. The same `CertifyRun` and
schedules drive the Ray pools; what only Ray can show (placement, actor death, the object
store, job submission) is tested on Ray (tests/test_certify_job.py, tests/test_node_loss.py).

The shipped ResNet-20 on the shipped CIFAR-10 sample: real votes, a second or two a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.certify import certify
from pipeline.certify.config import CertifyConfig
from pipeline.certify.inprocess import InProcessSampler
from pipeline.certify.run import Interrupted
from pipeline.runs.storage import read_run_record, read_votes
from pipeline.runs.storage import VoteRow

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
IDS = [0, 60, 120, 180, 240, 300]


def settings(output: Path, **overrides) -> CertifyConfig:
    values = {"dataset": "cifar10", "data_root": str(SAMPLE), "ids": IDS, "classifier": str(MODELS / "classifier.pt"),
              "sigma": 0.25, "n0": 10, "n": 60, "seed": 3, "batch_size": 100, "shard_size": 1, "optimize": False,
              "output": str(output)}
    values.update(overrides)
    return CertifyConfig(**values)


def interrupt_at_read(monkeypatch, reads: int) -> None:
    """Ctrl-C as the run reads its `reads`-th image (images are read just in time, as their
    work goes out), as a user's interrupt arrives between two results."""
    real = InProcessSampler.read
    seen = []

    def read(self, row):
        seen.append(row)
        if len(seen) == reads:
            raise KeyboardInterrupt
        return real(self, row)

    monkeypatch.setattr(InProcessSampler, "read", read)


def counts(output: Path, key: tuple[str, ...] = ("image_id", "phase")) -> dict:
    frame = read_votes(output)
    return {tuple(row[k] for k in key): list(row["counts"]) for _, row in frame.iterrows()}


def test_an_interrupted_fixed_run_keeps_what_it_counted_and_resumes_to_one_runs_votes(tmp_path, monkeypatch):
    once = certify(settings(tmp_path / "once"), in_process=True)
    assert once.finished_now == len(IDS)

    interrupt_at_read(monkeypatch, reads=4)
    with pytest.raises(Interrupted) as stop:
        certify(settings(tmp_path / "resumed"), in_process=True)
    saved = set(read_votes(tmp_path / "resumed").image_id)
    assert stop.value.saved == len(saved) >= 1 and len(saved) < len(IDS)  # the count is what was written
    monkeypatch.undo()

    resumed = certify(settings(tmp_path / "resumed"), in_process=True)
    assert resumed.finished_now == len(IDS) - len(saved)  # only what was missing is drawn
    assert counts(tmp_path / "resumed") == counts(tmp_path / "once")
    raw = read_votes(tmp_path / "resumed")
    assert not raw.duplicated(["image_id", "phase"]).any()


def test_an_unreadable_image_is_skipped_before_any_sample_and_listed(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, source in enumerate(sorted(SAMPLE.glob("test/*/0000.jpg"))[:5]):
        (folder / f"{index:04d}.jpg").write_bytes(source.read_bytes())
    (folder / "0002.jpg").write_bytes(b"this is not a JPEG")
    common = dict(dataset="folder", data_root=str(folder), ids=None, mode="predict", n=20)

    with pytest.raises(Exception, match="0002.jpg"):  # the default stops, naming the file
        certify(settings(tmp_path / "fail", **common), in_process=True)
    assert sorted(read_votes(tmp_path / "fail").image_id) == [0, 1]  # what came before it stays

    outcome = certify(settings(tmp_path / "skip", on_bad_image="skip", **common), in_process=True)
    assert [s["name"] for s in outcome.skipped] == ["0002.jpg"]
    assert [s["name"] for s in read_run_record(tmp_path / "skip")["skipped_images"]] == ["0002.jpg"]
    assert sorted(read_votes(tmp_path / "skip").image_id) == [0, 1, 3, 4]  # not one sample drawn for it


def test_a_sequential_run_draws_the_floor_for_clear_images_and_resumes_to_the_same_decisions(tmp_path, monkeypatch):
    sequential = dict(sequential=True, radius=0.25, n=2000, chunk_size=32, n0=100)
    once = certify(settings(tmp_path / "once", **sequential), in_process=True)
    decided = once.decisions
    assert (decided.status != 0).all()
    drawn = read_votes(tmp_path / "once").groupby("image_id")["n"].sum()
    for row, image_id in enumerate(IDS):
        if decided.certified[row] and decided.estimation_samples[row] <= 64:
            assert drawn[image_id] <= 100, (image_id, drawn[image_id])  # nothing drawn ahead of a clear image

    interrupt_at_read(monkeypatch, reads=3)
    with pytest.raises(Interrupted):
        certify(settings(tmp_path / "resumed", **sequential), in_process=True)
    monkeypatch.undo()
    resumed = certify(settings(tmp_path / "resumed", **sequential), in_process=True).decisions
    for field in ("status", "estimation_samples", "estimation_votes", "certified"):
        assert np.array_equal(getattr(resumed, field), getattr(decided, field)), field
    keys = ("image_id", "phase", "chunk")
    first = counts(tmp_path / "once", keys)
    assert all(first[key] == value for key, value in counts(tmp_path / "resumed", keys).items() if key in first)


def test_in_process_rows_are_the_vote_rows_of_the_pool(tmp_path):
    """The sampler builds the same `VoteRow`s as the Ray pool (`vote_rows_of`), with its worker named."""
    outcome = certify(settings(tmp_path / "run", ids=IDS[:2]), in_process=True)
    frame = read_votes(tmp_path / "run")
    assert outcome.finished_now == 2 and set(frame.worker) == {"in-process"}
    assert list(frame.columns)[: len(VoteRow.__dataclass_fields__)] == list(VoteRow.__dataclass_fields__)
    assert (frame.n == frame.counts.map(sum)).all()
