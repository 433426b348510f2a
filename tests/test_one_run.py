"""What the one certification run (`pipeline.certify.run.CertifyRun`) does the same for
models and APIs: the run's lock comes first, an unreadable image is skipped before any query,
and the summaries say "finished"/"decided" for work and "certified" only for certificates."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


from jobs.cli import main as cli_main
from pipeline.apis.run.modes import Summary, format_summary
from pipeline.runs.lock import exclusive_run

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"


def _one_line_error(capsys, argv: list[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    code = cli_main(argv)
    seconds = time.monotonic() - started
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1, errors
    return code, errors[0], seconds


def test_a_held_run_is_refused_before_data_and_models_load(capsys, tmp_path):
    """The second writer learns at once that the run is taken, even when its data and
    checkpoints could not be loaded at all (they are never opened)."""
    out = tmp_path / "run"
    with exclusive_run(out, "dsmooth certify"):
        code, line, seconds = _one_line_error(capsys, [
            "certify", "--dataset", "cifar10", "--data-root", str(tmp_path / "no-data"), "--classifier",
            str(tmp_path / "no-classifier.pt"), "--sigma", "0.25", "--output", str(out)])
        assert code == 2 and "being written by another job" in line and seconds < 10, line
        code, line, _ = _one_line_error(capsys, [
            "certify-api", "--provider", "aws", "--dataset", "folder", "--data-root", str(tmp_path / "no-data"),
            "--sigma", "0.25", "--max-queries", "100", "--output", str(out)])
        assert code == 2 and "being written by another job" in line, line


def test_bad_settings_leave_no_run_directory(capsys, tmp_path):
    out = tmp_path / "run"
    code, line, _ = _one_line_error(capsys, [
        "certify", "--dataset", "cifar10", "--data-root", str(tmp_path / "no-data"), "--classifier",
        str(MODELS / "classifier.pt"), "--sigma", "0.25", "--output", str(out)])
    assert code == 2 and not out.exists(), line


def test_api_summary_says_finished_or_decided_and_certified_only_for_certificates():
    fixed = format_summary(Summary("complete", "aws", images_total=4, images_complete=4), "runs/x")
    assert "complete: every image is finished" in fixed and "certified" not in fixed.split("\n")[0]
    assert "images: 4/4 finished" in fixed
    sequential = format_summary(Summary("complete", "aws", images_total=10, images_complete=10, certified=7,
                                        radius=0.125, queries_per_image=30.0, fixed_queries=106), "runs/x")
    assert "complete: every image is decided" in sequential
    assert "7 of 10 decided images certified at R = 0.125, 3 not certified" in sequential
    assert "every image is certified" not in sequential


def test_certify_api_skips_an_unreadable_image_without_a_query(tmp_path, ray_local):
    from api_support import IMAGES, job_config
    from jobs.certify_api import certify_api
    from pipeline.apis.emulator import EmulatorServer
    from pipeline.apis.run.prepare import load_job_config
    from pipeline.apis.books.querylog import read_query_log

    folder = tmp_path / "images"
    folder.mkdir()
    for png in sorted(IMAGES.glob("*.png"))[:2]:
        shutil.copy(png, folder / png.name)
    (folder / "ILSVRC2012_val_00000000.png").write_bytes(b"not a png")  # sorts first: image 0
    with EmulatorServer() as emulator:
        out = tmp_path / "run"
        config = job_config("aws", emulator.url, out, [0, 1, 2], data_root=str(folder), on_bad_image="skip")
        summary = certify_api(load_job_config(config))
        calls = emulator.calls("aws")
    assert summary.status == "complete" and summary.images_complete == 2 and summary.skipped == 1
    assert calls == summary.attempts == 2 * (1 + 5 + 20)  # not one query for the skipped image
    assert set(read_query_log(out)["image_id"]) == {1, 2}
    skipped = json.loads((out / "run.json").read_text())["skipped_images"]
    assert [s["image_id"] for s in skipped] == [0] and "ILSVRC2012_val_00000000.png" in skipped[0]["name"]


def test_model_and_api_rows_are_one_vote_row_type_that_round_trips(tmp_path):
    """Both samplers build `VoteRow`s; the Parquet schema is VoteRow's fields, in order, and a
    row of each kind reads back as written."""
    from dataclasses import fields
    from datetime import datetime, timezone

    import numpy as np

    from pipeline.apis.run.state import answer_vote_row
    from pipeline.certify.pair import ModelIdentity
    from pipeline.certify.plan import CertifyConfig, requests_of
    from pipeline.certify.run import Shard, model_vote_rows
    from pipeline.config import parse_config
    from pipeline.data.core import ImageRecord
    from pipeline.runs.storage import VOTE_SCHEMA, read_votes, write_votes
    from pipeline.runs.storage import VoteRow

    assert VOTE_SCHEMA.names == [f.name for f in fields(VoteRow)]
    config = parse_config(CertifyConfig, {"dataset": "cifar10", "data_root": "d", "classifier": "c", "sigma": 0.5,
                                          "output": "o", "n0": 2, "n": 5, "seed": 9})
    shard = Shard(0, (ImageRecord(7, "img7", 1),))
    model = model_vote_rows(run_id="r", config=config, records=shard.records, requests=requests_of(config)(shard),
                            counts=np.array([[0, 2], [1, 4]]), compute_s=1.0, worker="actor-0",
                            finished_at=datetime(2026, 1, 1, tzinfo=timezone.utc), classifier=ModelIdentity("f", "s"),
                            denoiser=None, class_names=["a", "b"])
    answers = [{"image_id": 8, "image_name": "img8", "top_label": label, "latency_s": 0.5,
                "answered_at": "2026-01-01T00:00:00+00:00"} for label in ("Cat", "Cat", "Dog")]
    api = answer_vote_row(answers[0], answers, "estimation", {"sigma": 0.25, "seed": 0, "chunk_size": 8,
                                                              "provider": "aws"}, "r", chunk=3)
    assert all(isinstance(row, VoteRow) for row in [*model, api])
    write_votes(tmp_path, [*model, api])
    stored = read_votes(tmp_path).set_index(["image_id", "phase"])
    for row in [*model, api]:
        back = stored.loc[(row.image_id, row.phase)]
        assert list(back["counts"]) == row.counts and back["n"] == row.n and back["label_name"] == row.label_name
    assert list(stored.loc[(8, "estimation"), "classes"]) == ["Cat", "Dog"] and stored.loc[(8, "estimation"), "chunk"] == 3
