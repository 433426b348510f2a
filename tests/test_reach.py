"""What a run reports is what it decided (issue 21, items 1-3, 5; issue 22 item 7's reduce half).

* The largest certifiable radius of a sequential run is its confidence sequence's own
  ceiling (no n <= n_max certifies above it, and it is tight), shown by tables, plots and
  run.json; fixed n keeps Clopper-Pearson's alpha^(1/n).
* A radius no n <= n_max can reach is refused before any sample or query, in one line.
* `dsmooth reduce` certifies at each run's recorded alpha by default, reproducing a
  sequential run's own decisions (from the chunks up to each decision); an explicit
  --alpha recomputes and says so; an at-R run's R is a default column, labelled
  "certified at R" (it measures no clean accuracy).

No Ray: a sequential run is simulated here with the real certifier on Bernoulli votes and
written as the jobs write it (real Parquet, real run.json); expectations come from
`pipeline.stats.confidence_sequences` and scipy, not from the reducer.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import norm

from jobs.cli import main as cli_main
from pipeline.config import ConfigError, option, parse_config
from pipeline.reduce import accuracy_table, load_run, render
from pipeline.reduce.plots import MARKER_GID, certified_accuracy_figure
from pipeline.reduce.tables import AT_RADIUS, NO_CLEAN_NOTE, RECOMPUTED_NOTE
from pipeline.runs.storage import open_run, write_votes
from pipeline.settings import ChunkSize, EstimationSamples, SelectionSamples, SequentialSettings, SmoothingSettings
from pipeline.stats.confidence_sequences import lower_confidence_sequence, success_thresholds
from pipeline.stats.reach import check_reach, largest_radius, reaches, samples_needed
from pipeline.stats.sequential import ESTIMATION, ChunkVotes, SequentialCertifier, SequentialTest
from pipeline.stats.smoothing import max_certifiable_radius

SIGMA, N_MAX, CHUNK, RADIUS = 0.25, 240, 16, 0.125
# Images with p_A near q = Phi(0.5) = 0.69 are decided differently at alpha 0.01 and 0.001.
P_A = [0.97] * 4 + [0.9] * 8 + [0.82] * 8 + [0.6] * 4


# ------------------------------------------------------------------ the ceiling (item 2)


@pytest.mark.parametrize("sigma,alpha,n_max,expected", [
    (0.25, 0.001, 240, 0.425), (0.25, 0.001, 2000, 0.636), (0.25, 0.001, 100_000, 0.924), (0.5, 0.01, 100, None),
])
def test_sequential_ceiling_is_the_confidence_sequence_s_own_and_tight(sigma, alpha, n_max, expected):
    """No n <= n_max certifies any radius above the ceiling, even with every vote for the
    class; just below it, n_max such votes do. It lies below Clopper-Pearson's."""
    ceiling = largest_radius(sigma, alpha, n_max, sequential=True)
    if expected is not None:  # the figures of the issue
        assert ceiling == pytest.approx(expected, abs=5e-4)
    assert ceiling < max_certifiable_radius(n_max, alpha, sigma)
    n = np.arange(1, n_max + 1)
    above = norm.cdf((ceiling + 1e-6) / sigma)
    assert (success_thresholds(n, above, alpha) > n).all()  # s = n is not enough at any n
    below = norm.cdf((ceiling - 1e-6) / sigma)
    assert success_thresholds(n_max, below, alpha) <= n_max
    assert not reaches(ceiling + 1e-6, sigma, alpha, n_max, sequential=True)
    assert reaches(ceiling - 1e-6, sigma, alpha, n_max, sequential=True)


def test_fixed_n_ceiling_stays_clopper_pearson_and_samples_needed_is_the_least():
    cp = max_certifiable_radius(240, 0.001, SIGMA)
    assert largest_radius(SIGMA, 0.001, 240) == pytest.approx(cp)
    assert reaches(cp - 1e-9, SIGMA, 0.001, 240) and not reaches(cp + 1e-9, SIGMA, 0.001, 240)
    for sequential in (False, True):
        for radius in (0.0, 0.43, 0.7):
            needed = samples_needed(radius, SIGMA, 0.001, sequential=sequential)
            assert reaches(radius, SIGMA, 0.001, needed, sequential=sequential)
            assert not reaches(radius, SIGMA, 0.001, needed - 1, sequential=sequential)
    assert samples_needed(7.9 * SIGMA, SIGMA, 0.001, sequential=True) is None  # beyond LARGEST_N


def test_largest_radius_mode_reaches_exactly_the_ceiling_with_unanimous_votes():
    """The ceiling is the one the certifier itself uses: an image whose every vote is for
    its label, sampled to n_max in largest-radius mode, certifies exactly that radius."""
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=N_MAX, chunk_size=CHUNK, tolerance=1e-9)
    certifier = SequentialCertifier(test, labels=np.zeros(1, dtype=np.int64))
    for chunk in range(N_MAX // CHUNK):
        certifier.decide(ChunkVotes(ESTIMATION, np.array([0]), np.array([chunk]), np.array([CHUNK]),
                                    np.array([[CHUNK]])))
    decisions = certifier.decisions()
    assert decisions.certified[0] and decisions.estimation_samples[0] == N_MAX
    assert decisions.radius[0] == pytest.approx(largest_radius(SIGMA, 0.001, N_MAX, sequential=True), abs=1e-12)


# ------------------------------------------------------------------ refusal (item 3)


class _Job(SmoothingSettings, SequentialSettings):
    n0: SelectionSamples = option(20)
    n: EstimationSamples = option(100)
    chunk_size: ChunkSize = option(16)


def test_unreachable_radius_is_refused_in_one_line_with_what_would_reach_it():
    values = {"sigma": SIGMA, "sequential": True, "n_max": N_MAX}
    parse_config(_Job, {**values, "radius": 0.42})  # within 0.425
    with pytest.raises(ConfigError) as refused:
        parse_config(_Job, {**values, "radius": 0.43})
    message = str(refused.value)
    assert "\n" not in message and "0.425" in message
    needed = samples_needed(0.43, SIGMA, 0.001, sequential=True)
    assert f"n_max >= {needed:,}" in message
    assert reaches(0.43, SIGMA, 0.001, needed, sequential=True)  # the advice is right
    parse_config(_Job, {**values, "radius": 0.43, "n_max": needed})
    with pytest.raises(ConfigError, match="n_max = 10"):  # largest-radius mode: nothing certifiable
        parse_config(_Job, {"sigma": SIGMA, "sequential": True, "n_max": 10})
    assert check_reach(0.43, SIGMA, 0.001, N_MAX, sequential=True).message() == message.split(": ", 1)[1]


def test_fixed_n_that_certifies_nothing_gets_the_one_line_warning(caplog):
    """A fixed-n run asks no radius; one whose n cannot certify even R = 0 is warned about
    (same function, Clopper-Pearson), and a sufficient n is not."""
    fields = {"n0": 5}
    with caplog.at_level("WARNING", logger="pipeline.settings"):
        parse_config(_Job, {"sigma": SIGMA, "n": 9, **fields})  # 0.001^(1/9) = 0.46 <= 1/2
    (record,) = [r for r in caplog.records if r.name == "pipeline.settings"]
    assert "n = 9" in record.getMessage() and "n >= 10 would reach it" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.settings"):
        parse_config(_Job, {"sigma": SIGMA, "n": 10, **fields})
    assert not [r for r in caplog.records if r.name == "pipeline.settings"]


def test_certify_api_refuses_an_unreachable_radius_before_any_query(capsys, tmp_path):
    """The API defaults (sigma 0.25, alpha 0.001, n_max 240) reach no R >= 0.43: exit 2,
    one line, no run directory, and no query (the endpoint does not even exist)."""
    from api_support import job_config

    config = job_config("aws", "http://127.0.0.1:1", tmp_path / "run", [0, 3], alpha=0.001, sequential=True,
                        radius=0.43)
    config.pop("chunk_size")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli_main(["certify-api", "--config", str(path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and "largest reachable radius is 0.425" in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_certify_refuses_an_unreachable_radius_in_one_line(capsys, tmp_path):
    argv = ["certify", "--dataset", "cifar10", "--data-root", str(tmp_path), "--classifier", "c.pt",
            "--sigma", "0.25", "--output", str(tmp_path / "out"), "--sequential", "--radius", "0.45", "--n", "240"]
    code = cli_main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "0.425" in errors[0] and "0.45" in errors[0], errors
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ a simulated sequential run


def simulate_run(run: Path, alpha: float, radius: float | None = RADIUS, seed: int = 0, growth: float = 1.0):
    """Drive the real certifier on Bernoulli(P_A) votes as the job does (`growth` > 0 draws
    chunks ahead, some after an image's decision) and store the run as the job stores it."""
    test = SequentialTest(sigma=SIGMA, alpha=alpha, n_max=N_MAX, chunk_size=CHUNK, radius=radius)
    certifier = SequentialCertifier(test, labels=np.zeros(len(P_A), dtype=np.int64))
    rng = np.random.default_rng(seed)
    rows = []
    while work := certifier.pending(growth=growth):
        for w in work:
            batch = []
            for row, first, count in zip(w.image, w.first_chunk, w.num_chunks):
                for chunk in range(first, first + count):
                    size = min(CHUNK, N_MAX - chunk * CHUNK)
                    votes = int(rng.binomial(size, P_A[row]))
                    batch.append((row, chunk, size, votes))
                    rows.append({"run_id": "sim", "image_id": int(row), "label": 0, "phase": ESTIMATION, "n": size,
                                 "counts": [votes, size - votes], "sigma": SIGMA, "seed": 0, "chunk_size": CHUNK,
                                 "chunk": int(chunk), "elapsed_s": 0.01})
            image, chunk, size, votes = (np.array(column) for column in zip(*batch))
            certifier.decide(ChunkVotes(ESTIMATION, image, chunk, size, np.stack([votes, size - votes], axis=1)))
    identity = {"job": "certify", "mode": "certify", "dataset": "sim", "sigma": SIGMA, "n0": 20, "n": N_MAX,
                "seed": 0, "chunk_size": CHUNK,
                "sequential": {**dataclasses.asdict(test), "certify_class": "label"}}
    open_run(run, identity, extra={"alpha": alpha})
    write_votes(run, rows)
    return certifier.decisions()


@pytest.fixture(scope="module")
def run_at_001(tmp_path_factory):
    run = tmp_path_factory.mktemp("seq") / "run"
    return run, simulate_run(run, alpha=0.01)


def test_reduce_defaults_to_the_run_s_alpha_and_its_own_decisions(run_at_001, capsys, tmp_path):
    run, decided = run_at_001
    assert decided.unused_samples.sum() > 0  # chunks were drawn after some decisions
    certs = load_run(run).set_index("image_id").sort_index()
    assert np.array_equal(certs["abstained"].to_numpy(), ~decided.certified)
    assert np.allclose(certs["radius"], np.where(decided.certified, decided.radius, 0.0))
    assert np.array_equal(certs["samples"].to_numpy(), decided.samples)  # only the chunks up to each decision
    # What the old default (0.001) would have reported is another table: the test means something.
    stricter = load_run(run, 0.001).set_index("image_id").sort_index()
    assert not np.array_equal(stricter["abstained"].to_numpy(), certs["abstained"].to_numpy())

    table = tmp_path / "table.csv"
    assert cli_main(["reduce", str(run), "--format", "csv", "--output", str(table)]) == 0
    csv = pd.read_csv(table)
    assert (csv["alpha"] == 0.01).all() and (csv["run_alpha"] == 0.01).all()
    at_r = csv.loc[np.isclose(csv["radius"], RADIUS), "certified_accuracy"]  # the run's R, by default
    assert len(at_r) == 1 and at_r.iloc[0] == pytest.approx(decided.certified.mean())
    assert csv["clean_accuracy"].isna().all()  # a run at R measures no clean accuracy

    capsys.readouterr()
    assert cli_main(["reduce", str(run)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert AT_RADIUS in header and "clean" not in header and f"r = {RADIUS:g}" in header
    assert "α" not in header and RECOMPUTED_NOTE not in out  # the run's own alpha: nothing to say


def test_an_explicit_alpha_recomputes_and_says_so_and_mixed_runs_show_alpha_per_row(run_at_001, capsys, tmp_path):
    run, _ = run_at_001
    assert cli_main(["reduce", str(run), "--alpha", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "0.001 (run 0.01)" in out and RECOMPUTED_NOTE in out and "| α |" in out.splitlines()[0] + "|"
    assert cli_main(["reduce", str(run), "--envelope"]) == 0
    envelope = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| envelope |"))
    assert "nan" not in envelope and "(" not in envelope, envelope  # no clean accuracy to put in parentheses

    other = tmp_path / "other"
    simulate_run(other, alpha=0.001, seed=1)
    assert cli_main(["reduce", str(run), str(other), "--names", "a", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " α " in lines[0]
    row_a = next(line for line in lines if line.startswith("| a |"))
    row_b = next(line for line in lines if line.startswith("| b |"))
    assert "| 0.01 |" in row_a and "| 0.001 |" in row_b


def fixed_n_run(run: Path, alpha: float) -> Path:
    """A fixed-n certify run (as `dsmooth certify` records it: alpha beside the identity)."""
    open_run(run, {"job": "certify", "mode": "certify", "dataset": "sim", "sigma": SIGMA, "n0": 10, "n": 100},
             extra={"alpha": alpha})
    rows = []
    for image_id, votes in enumerate([100, 97, 93, 90, 80, 60]):
        rows += [{"image_id": image_id, "label": 1, "phase": "selection", "n": 10, "counts": [0, 10]},
                 {"image_id": image_id, "label": 1, "phase": "estimation", "n": 100, "counts": [100 - votes, votes]}]
    write_votes(run, rows)
    return run


def test_a_fixed_n_run_is_reduced_at_its_recorded_alpha_and_beside_a_run_at_r(run_at_001, capsys, tmp_path):
    run = fixed_n_run(tmp_path / "fixed", alpha=0.01)
    certs = load_run(run)
    assert certs.alpha == 0.01 and not certs.recomputed
    assert np.allclose(certs["radius"], load_run(run, 0.01)["radius"])
    assert not np.allclose(certs["radius"], load_run(run, 0.001)["radius"])  # alpha matters here
    assert cli_main(["reduce", str(run), "--format", "csv"]) == 0
    assert (pd.read_csv(io.StringIO(capsys.readouterr().out))["alpha"] == 0.01).all()
    assert load_run(run, 0.001).recomputed
    assert cli_main(["reduce", str(run), "--alpha", "0.001"]) == 0
    assert "0.001 (run 0.01)" in capsys.readouterr().out
    # beside a run at R: "clean" keeps its meaning, the run at R has no clean cell
    assert cli_main(["reduce", str(run), str(run_at_001[0]), "--names", "fixed", "seq"]) == 0
    out = capsys.readouterr().out
    assert "| clean |" in out.splitlines()[0] and NO_CLEAN_NOTE.format(threshold="Φ(R/σ)") in out
    seq_row = next(line for line in out.splitlines() if line.startswith("| seq |")).split("|")
    clean_at = out.splitlines()[0].split("|").index(" clean ")
    assert seq_row[clean_at].strip() == ""


def test_tables_plots_and_run_json_use_the_sequence_s_ceiling(run_at_001):
    run, _ = run_at_001
    ceiling = largest_radius(SIGMA, 0.01, N_MAX, sequential=True)
    clopper_pearson = max_certifiable_radius(N_MAX, 0.01, SIGMA)
    certs = load_run(run)
    assert certs.max_radius == pytest.approx(ceiling)
    between = (ceiling + clopper_pearson) / 2  # certifiable by CP's bound, not by this run
    table = accuracy_table([certs], [0.0, RADIUS, between])
    row = table[np.isclose(table["radius"], between)].iloc[0]
    assert row["capped"] and row["max_radius"] == pytest.approx(ceiling)
    text = render(table)
    assert f"r = {between:g}" not in text.splitlines()[0] and f"{ceiling:.3g}" in text
    figure = certified_accuracy_figure([certs])
    markers = [line.get_xdata()[0] for line in figure.axes[0].lines if line.get_gid() == MARKER_GID]
    assert markers == [pytest.approx(ceiling)]
    record = json.loads((run / "run.json").read_text())
    assert record["max_radius"] == pytest.approx(ceiling)
    # the bound the certificates' radii come from, at n_max unanimous votes
    assert ceiling == pytest.approx(SIGMA * norm.ppf(lower_confidence_sequence(N_MAX, N_MAX, 0.01)))


# ------------------------------------------------------------------ item 5


def test_an_api_error_holds_its_chunk_until_asked_again():
    """pipeline/stats/sequential.py's doc: an API error is not a vote against the class; the
    chunk waits for the query to be answered (`chunk_answers` is None until then)."""
    from pipeline.apis.query import OK
    from pipeline.apis.run.state import chunk_answers

    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=16, chunk_size=8, radius=0.0)
    rows = {(ESTIMATION, k): {"status": OK, "top_label": "cat"} for k in range(8)}
    assert chunk_answers(test, rows, 0) is not None
    rows[(ESTIMATION, 3)] = {"status": "error", "top_label": None}
    assert chunk_answers(test, rows, 0) is None
