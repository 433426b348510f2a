"""`dsmooth reduce`: certificates from votes at any alpha, reference logs, tables, envelope, plot.

Expected values are recomputed here independently (pandas on the raw logs, scipy's beta and
binomtest on the counts written), never copied from the reducer's own output.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import beta, binomtest, norm

from jobs.cli import main
from pipeline.reduce import (
    ReduceWarning,
    accuracy_table,
    average_certified_radius,
    certified_accuracy,
    load_input,
    load_inputs,
    plot_certified_accuracy,
    render,
    sigma_from_path,
)
from pipeline.reduce.plots import MARKER_GID, certified_accuracy_figure
from pipeline.stats.smoothing import ABSTAIN, certify_counts, predict_counts
from pipeline.runs.storage import open_run, write_votes

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "data" / "reference-logs"
RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
CSV_HEADER = "run,sigma,radius,certified_accuracy,clean_accuracy,n,alpha,max_radius,capped,run_alpha"

COHEN_CIFAR = REF / "cohen2019/certify/cifar10/resnet110/noise_0.25/test/sigma_0.25"  # time in seconds
COHEN_IMAGENET = REF / "cohen2019/certify/imagenet/resnet50/noise_0.25/test/sigma_0.25"  # H:MM:SS, 427 rows
COHEN_PREDICT = REF / "cohen2019/predict/imagenet/resnet50/noise_0.25/test/N_1000"  # no radius column
SALMAN_CIFAR = REF / "salman2020/cifar10/mse_obj/MODEL_resnet110_90epochs_DENOISER_cifar10_dncnn_epochs_90"
SALMAN_IMAGENET = REF / "salman2020/imagenet/MODEL_resnet50/noise_0.25/test_N10000/sigma_0.25"
API_LOG = REF / "salman2020/vision_api/azure/imagenet_denoiser_mse/0.25/log.txt"


# ---------------------------------------------------------------- helpers (independent of the reducer)



@pytest.fixture
def reference_logs() -> Path:
    """The published per-image logs beside the checkout (skips with a reason where absent)."""
    from data_support import shared_data

    return shared_data("reference-logs")


def dsmooth(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real console script in a subprocess (falls back to `python -m jobs.cli`)."""
    script = shutil.which("dsmooth")
    command = [script] if script else [sys.executable, "-m", "jobs.cli"]
    done = subprocess.run([*command, "reduce", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def read_csv_table(text: str) -> pd.DataFrame:
    assert text.splitlines()[0] == CSV_HEADER
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values={"sigma": [""]})


def raw_log(path: Path) -> tuple[pd.Series, pd.Series]:
    """(correct, radius) straight from a log file with pandas."""
    if path.name == "log.txt":
        frame = pd.read_csv(path, sep="\t", header=None, names=["idx", "correct", "radius", "label", "predict"])
        correct = frame["correct"].astype(str) == "True"
    else:
        frame = pd.read_csv(path, sep="\t")
        correct = frame["correct"] == 1
    radius = frame["radius"] if "radius" in frame else pd.Series(0.0, index=frame.index)
    return correct, radius


def expected_accuracy(path: Path, radius_at_least: float) -> float:
    correct, radius = raw_log(path)
    return float((correct & (radius >= radius_at_least)).mean())


def write_log(path: Path, rows: list[tuple[int, float]]) -> Path:
    """A Cohen-format log: rows of (correct, radius); wrong rows predict another class."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for i, (correct, radius) in enumerate(rows):
        lines.append(f"{i}\t3\t{3 if correct else 5}\t{radius}\t{int(correct)}\t0:00:01.5")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def cp_lower(n_a: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound from the beta quantile."""
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def vote(image_id: int, phase: str, counts: list[int], n: int | None = None, **extra) -> dict:
    return {"image_id": image_id, "phase": phase, "counts": counts, "n": sum(counts) if n is None else n, **extra}


# ---------------------------------------------------------------- reference logs


def test_cli_reproduces_certified_accuracy_of_reference_logs(tmp_path, reference_logs):
    salman = SALMAN_CIFAR / "noise_0.25/test_N10000/sigma_0.25"
    files = {
        "cohen-cifar": COHEN_CIFAR, "cohen-imagenet": COHEN_IMAGENET, "cohen-predict": COHEN_PREDICT,
        "salman-cifar": salman, "salman-imagenet": SALMAN_IMAGENET, "api": API_LOG,
    }
    per_image = tmp_path / "certs.csv"
    done = dsmooth(*map(str, files.values()), "--names", *files, "--format", "csv", "--per-image", str(per_image))
    table = read_csv_table(done.stdout)
    assert list(table.columns) == CSV_HEADER.split(",")
    assert len(table) == len(files) * len(RADII)
    for name, path in files.items():
        rows = table[table["run"] == name].set_index("radius")
        assert list(rows.index) == RADII
        for radius in RADII:
            assert rows.at[radius, "certified_accuracy"] == pytest.approx(expected_accuracy(path, radius), abs=1e-9)
            assert rows.at[radius, "clean_accuracy"] == pytest.approx(expected_accuracy(path, 0.0), abs=1e-9)
        assert rows["sigma"].iloc[0] == pytest.approx(0.25)  # sigma_0.25 / noise_0.25 / .../0.25/log.txt
    # A sanity anchor on the data itself: Cohen's sigma=0.25 CIFAR-10 model is not trivial.
    assert 0.5 < table[(table.run == "cohen-cifar") & (table.radius == 0.25)].certified_accuracy.item() < 0.7

    certs = pd.read_csv(per_image)
    assert certs.groupby("run").size().to_dict() == {name: len(raw_log(p)[0]) for name, p in files.items()}
    seconds = pd.read_csv(COHEN_CIFAR, sep="\t")["time"]
    clock = pd.to_timedelta(pd.read_csv(COHEN_IMAGENET, sep="\t")["time"]).dt.total_seconds()
    assert np.allclose(certs[certs.run == "cohen-cifar"]["time_s"], seconds)
    assert np.allclose(certs[certs.run == "cohen-imagenet"]["time_s"], clock)
    api = certs[certs.run == "api"]
    raw = pd.read_csv(API_LOG, sep="\t", header=None, names=["idx", "correct", "radius", "label", "predict"])
    assert list(api["abstained"]) == list(raw["predict"].astype(str) == "-1")
    assert average_certified_radius(load_input(API_LOG, 0.001)) == pytest.approx(
        float((raw["radius"] * (raw["correct"].astype(str) == "True")).mean())
    )


def test_sigma_from_path():
    assert sigma_from_path("x/noise_0.50/test/sigma_0.25") == 0.25
    assert sigma_from_path("predict/imagenet/resnet50/noise_0.12/test/N_100") == 0.12
    assert sigma_from_path("vision_api/azure/no_denoiser/0.12/log.txt") == 0.12
    assert sigma_from_path("vision_api/azure/imagenet_denoiser_mse/0.25_1k/log.txt") == 0.25
    assert sigma_from_path("logs/resnet50/run3/log.txt") is None


def test_collection_skips_empty_logs_with_a_warning_naming_them(reference_logs):
    everything = sorted(p for p in REF.rglob("*") if p.is_file())
    empty = [p for p in everything if len([l for l in p.read_text().splitlines() if l.strip()]) <= 1]
    assert empty, "the reference collection is known to hold header-only logs"
    done = dsmooth(str(REF), "--format", "csv", "--radii", "0", "0.5")
    for path in empty:
        assert str(path) in done.stderr
    table = read_csv_table(done.stdout)
    usable = {p.relative_to(REF).as_posix() for p in everything if p not in empty}
    assert set(table["run"]) == usable
    row = table[(table.run == COHEN_CIFAR.relative_to(REF).as_posix()) & (table.radius == 0.5)]
    assert row.certified_accuracy.item() == pytest.approx(expected_accuracy(COHEN_CIFAR, 0.5))


def test_truncated_and_empty_files_are_skipped_never_crash(tmp_path, capsys, reference_logs):
    good = tmp_path / "logs/good/sigma_0.25"
    good.parent.mkdir(parents=True)
    shutil.copy(COHEN_CIFAR, good)
    text = COHEN_CIFAR.read_text()
    cut = text.index("\n", 2000) - 3  # mid-row: the writer died while writing a number
    mid_row = tmp_path / "logs/mid-row/sigma_0.25"
    mid_row.parent.mkdir()
    mid_row.write_text(text[:cut])
    short_row = tmp_path / "logs/short-row/sigma_0.25"  # a clipped row that did get a line end
    short_row.parent.mkdir()
    short_row.write_text(text[: text.index("\n", 2000) + 1] + "2000\t3\t3\n")
    zero = tmp_path / "logs/zero/sigma_0.50"
    zero.parent.mkdir()
    zero.write_bytes(b"")
    header_only = tmp_path / "logs/header/sigma_1.00"
    header_only.parent.mkdir()
    header_only.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")

    assert main(["reduce", str(tmp_path / "logs"), "--format", "csv", "--radii", "0", "0.5"]) == 0
    out, err = capsys.readouterr()
    for bad in (mid_row, short_row, zero, header_only):
        assert str(bad) in err
    table = read_csv_table(out)
    assert set(table.run) == {"good/sigma_0.25"}
    assert table.set_index("radius").at[0.5, "certified_accuracy"] == pytest.approx(expected_accuracy(COHEN_CIFAR, 0.5))

    # Nothing usable at all is an error (exit 2), still not a traceback.
    assert main(["reduce", str(zero), str(mid_row)]) == 2
    assert "no usable" in capsys.readouterr().err


# ---------------------------------------------------------------- envelope


def synthetic_group(tmp_path: Path) -> list[Path]:
    """Four 10-image logs whose envelope at r = 0, 0.25, 0.5 is known by construction."""
    wrong = [(0, 0.0)]
    return [
        write_log(tmp_path / "a/sigma_0.12", [(1, 0.2)] * 8 + wrong * 2),  # clean .8; .8 / 0 / 0
        write_log(tmp_path / "b/sigma_0.25", [(1, 0.3)] * 5 + [(1, 0.6)] + wrong * 4),  # clean .6; .6 / .6 / .1
        write_log(tmp_path / "c/sigma_0.50", [(1, 0.1)] + [(1, 0.3)] * 4 + [(1, 0.6)] * 2 + wrong * 3),  # .7; .7/.6/.2
        write_log(tmp_path / "d/sigma_1.00", [(1, 0.1)] + [(1, 0.3)] * 4 + [(1, 0.6)] * 2 + wrong * 3),  # same as c
    ]


def test_envelope_best_per_radius_ties_to_higher_clean_accuracy(tmp_path, capsys):
    paths = synthetic_group(tmp_path)
    args = ["reduce", *map(str, paths), "--names", "A", "B", "C", "D", "--radii", "0", "0.25", "0.5"]
    assert main([*args, "--envelope", "--format", "csv"]) == 0
    table = read_csv_table(capsys.readouterr().out)
    envelope = table[table.run == "envelope"].set_index("radius")
    # r=0: A alone is best. r=0.25: B and C tie at .6, C has the higher clean accuracy (.7);
    # C and D tie completely, the input given first (C) wins. r=0.5: C (tie with D again).
    assert envelope["certified_accuracy"].to_dict() == pytest.approx({0.0: 0.8, 0.25: 0.6, 0.5: 0.2})
    assert envelope["clean_accuracy"].to_dict() == pytest.approx({0.0: 0.8, 0.25: 0.7, 0.5: 0.7})
    assert envelope["sigma"].to_dict() == pytest.approx({0.0: 0.12, 0.25: 0.5, 0.5: 0.5})
    assert len(table) == 4 * 3 + 3

    assert main([*args, "--format", "csv"]) == 0
    assert "envelope" not in capsys.readouterr().out


def test_envelope_over_a_real_group_matches_pandas(reference_logs):
    done = dsmooth(str(SALMAN_CIFAR), "--envelope", "--format", "csv")
    table = read_csv_table(done.stdout)
    files = sorted(p for p in SALMAN_CIFAR.rglob("sigma_*"))
    assert len(files) == 8
    envelope = table[table.run == "envelope"].set_index("radius")
    for radius in RADII:
        scores = [(expected_accuracy(p, radius), expected_accuracy(p, 0.0), -i) for i, p in enumerate(files)]
        best_certified, best_clean, index = max(scores)
        assert envelope.at[radius, "certified_accuracy"] == pytest.approx(best_certified)
        assert envelope.at[radius, "clean_accuracy"] == pytest.approx(best_clean)
        sigma = float(re.search(r"sigma_([\d.]+)$", str(files[-index])).group(1))
        assert envelope.at[radius, "sigma"] == pytest.approx(sigma)


# ---------------------------------------------------------------- votes


def certify_run(tmp_path: Path) -> Path:
    run = tmp_path / "run-certify"
    open_run(run, {"sigma": 0.5, "n0": 100, "n": 1000})
    rows = [
        vote(0, "selection", [2, 95, 3], label=1), vote(0, "estimation", [10, 980, 10], label=1),  # certified
        vote(1, "selection", [5, 90, 5], label=1), vote(1, "estimation", [480, 520, 0], label=1),  # abstains
        vote(2, "selection", [1, 9, 90], label=0), vote(2, "estimation", [0, 40, 960], label=0),  # wrong class
        # 100 of image 3's estimation samples gave no vote: they count against c_A
        vote(3, "selection", [0, 100, 0], label=1), vote(3, "estimation", [0, 900, 0], n=1000, label=1),
        vote(5, "selection", [0, 100, 0], label=1), vote(5, "estimation", [470, 530, 0], label=1),  # alpha decides
        vote(4, "selection", [0, 100, 0], label=1),  # estimation never written: job died
    ]
    write_votes(run, rows[:6], worker="actor/0")
    write_votes(run, rows[6:], worker="actor/1")
    return run


@pytest.mark.parametrize("alpha", [0.001, 0.1])
def test_votes_certified_at_reduce_time_alpha(tmp_path, alpha):
    run = certify_run(tmp_path)
    with pytest.warns(ReduceWarning, match=r"1 image\(s\) have no estimation row"):
        certs = load_input(run, alpha).set_index("image_id")
    assert sorted(certs.index) == [0, 1, 2, 3, 5]  # image 4 skipped
    estimation = {0: (980, 1000, 1), 1: (520, 1000, 1), 2: (960, 1000, 2), 3: (900, 1000, 1), 5: (530, 1000, 1)}
    labels = {0: 1, 1: 1, 2: 0, 3: 1, 5: 1}
    for image, (n_a, n, chosen) in estimation.items():
        bound = cp_lower(n_a, n, alpha)
        assert certs.at[image, "p_a_lower"] == pytest.approx(bound, rel=1e-9)
        if bound > 0.5:
            assert certs.at[image, "predict"] == chosen
            assert certs.at[image, "radius"] == pytest.approx(0.5 * norm.ppf(bound), rel=1e-9)
            assert certs.at[image, "correct"] == (chosen == labels[image])
        else:
            assert certs.at[image, "predict"] == ABSTAIN and certs.at[image, "radius"] == 0.0
            assert not certs.at[image, "correct"] and certs.at[image, "abstained"]
    # the alpha given at reduce time, not the one used while sampling, decides image 5
    assert certs.at[5, "abstained"] == (alpha == 0.001)
    assert certs.at[1, "abstained"]
    assert not certs.at[2, "correct"] and certs.at[2, "radius"] > 0
    # and the table follows: accuracy counts all 5 complete images
    correct_radii = [0.5 * norm.ppf(cp_lower(980, 1000, alpha)), 0.5 * norm.ppf(cp_lower(900, 1000, alpha))]
    if alpha == 0.1:
        correct_radii.append(0.5 * norm.ppf(cp_lower(530, 1000, alpha)))
    accuracy = certified_accuracy(certs, [0.0, 0.5])
    assert accuracy[0.0] == pytest.approx(len(correct_radii) / 5)
    assert accuracy[0.5] == pytest.approx(sum(r >= 0.5 for r in correct_radii) / 5)
    assert average_certified_radius(certs) == pytest.approx(sum(correct_radii) / 5)


def test_votes_cli_two_alphas_and_per_image(tmp_path, capsys):
    run = certify_run(tmp_path)
    per_image = tmp_path / "per-image.csv"
    for alpha in (0.001, 0.1):
        assert main(["reduce", str(run), "--names", "mse", "--alpha", str(alpha), "--format", "csv",
                     "--per-image", str(per_image), "--radii", "0"]) == 0
        out, err = capsys.readouterr()
        assert "no estimation row" in err
        clean = read_csv_table(out).certified_accuracy.item()
        assert clean == pytest.approx((3 if alpha == 0.1 else 2) / 5)
        certs = pd.read_csv(per_image).set_index("image_id")
        assert certs.at[5, "radius"] == pytest.approx(
            0.5 * norm.ppf(cp_lower(530, 1000, alpha)) if alpha == 0.1 else 0.0
        )
        assert (certs["sigma"] == 0.5).all() and (certs["run"] == "mse").all()


def test_label_string_votes_from_an_api(tmp_path):
    run = tmp_path / "run-api"
    open_run(run, {"sigma": 0.25})
    write_votes(run, [
        vote(0, "selection", [15, 5], classes=["cat", "dog"], label=-1, label_name="cat"),
        vote(0, "estimation", [10, 85, 3], n=100, classes=["dog", "cat", "bird"], label=-1, label_name="cat"),
        vote(1, "selection", [15, 5], classes=["cat", "dog"], label=-1, label_name="dog"),
        vote(1, "estimation", [90, 10], n=100, classes=["cat", "dog"], label=-1, label_name="dog"),
        vote(2, "selection", [5, 5], classes=["b", "a"], label=-1, label_name="a"),  # tie -> "a"
        vote(2, "estimation", [2, 95], n=100, classes=["b", "a"], label=-1, label_name="a"),
        vote(3, "selection", [], n=20, classes=[], label=-1, label_name="a"),  # every query failed
        vote(3, "estimation", [], n=100, classes=[], label=-1, label_name="a"),
    ])
    certs = load_input(run, 0.001).set_index("image_id")
    assert certs.at[0, "predict"] == "cat" and certs.at[0, "correct"]
    assert certs.at[0, "radius"] == pytest.approx(0.25 * norm.ppf(cp_lower(85, 100, 0.001)))  # 2 failed samples count
    assert certs.at[1, "predict"] == "cat" and not certs.at[1, "correct"]
    assert certs.at[2, "predict"] == "a" and certs.at[2, "correct"]
    assert certs.at[3, "abstained"] and not certs.at[3, "correct"] and certs.at[3, "radius"] == 0.0
    assert certify_counts({"cat": 15, "dog": 5}, {"dog": 10, "cat": 85, "bird": 3}, 0.25, 0.001, n=100) == (
        "cat", pytest.approx(certs.at[0, "radius"]))


def test_predict_rows(tmp_path):
    run = tmp_path / "run-predict"
    open_run(run, {"sigma": 0.25})
    rng = np.random.default_rng(7)
    random_counts = [rng.multinomial(int(rng.integers(1, 200)), rng.dirichlet([0.6] * 4)).tolist() for _ in range(300)]
    rows = [
        vote(0, "prediction", [3, 90, 7], label=1),
        vote(1, "prediction", [45, 55, 0], label=1),
        vote(2, "prediction", [2, 40], classes=["cat", "dog"], label=-1, label_name="dog"),
        vote(3, "prediction", [30, 0, 30], label=0),  # tie: never a decision
    ] + [vote(10 + i, "prediction", counts, label=i % 4) for i, counts in enumerate(random_counts)]
    write_votes(run, rows)
    for alpha in (0.001, 0.05):
        certs = load_input(run, alpha).set_index("image_id")
        assert (certs["radius"] == 0).all() and certs["p_a_lower"].isna().all()
        assert certs.at[0, "predict"] == (1 if binomtest(90, 97).pvalue <= alpha else ABSTAIN)
        assert certs.at[0, "predict"] == 1 and certs.at[0, "correct"]
        assert binomtest(55, 100).pvalue > 0.05 and certs.at[1, "abstained"] and not certs.at[1, "correct"]
        assert certs.at[2, "predict"] == "dog" and certs.at[2, "correct"]
        assert certs.at[3, "abstained"]
        for i, counts in enumerate(random_counts):
            expected = predict_counts(counts, alpha)
            assert certs.at[10 + i, "predict"] == expected, counts
            assert certs.at[10 + i, "correct"] == (expected != ABSTAIN and expected == i % 4)


def test_ten_thousand_images_reduce_in_seconds(tmp_path):
    run = tmp_path / "run-big"
    open_run(run, {"sigma": 0.5})
    rng = np.random.default_rng(0)
    selection = rng.multinomial(100, [0.05] * 10 + [0.5], size=10_000)
    estimation = rng.multinomial(10_000, [0.05] * 10 + [0.5], size=10_000)
    rows = []
    for i in range(10_000):
        rows.append(vote(i, "selection", selection[i].tolist(), label=10))
        rows.append(vote(i, "estimation", estimation[i].tolist(), label=10))
    write_votes(run, rows)
    started = time.perf_counter()
    certs = load_input(run, 0.001)
    elapsed = time.perf_counter() - started
    assert len(certs) == 10_000
    assert elapsed < 10.0, f"10,000 images took {elapsed:.1f}s"
    for i in range(0, 10_000, 1250):
        predicted, radius = certify_counts(selection[i], estimation[i], 0.5, 0.001)
        assert certs["predict"].iloc[i] == predicted and certs["radius"].iloc[i] == pytest.approx(radius, rel=1e-12)


# ---------------------------------------------------------------- rendering and plot


def markdown_rows(markdown: str) -> dict[str, list[str]]:
    """The markdown table as {first cell: cells}, the header under "input"."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| "):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_markdown_latex_and_plot(tmp_path):
    paths = synthetic_group(tmp_path)
    inputs = load_inputs(paths, 0.001, names=["no_denoiser", "MSE", "STAB+MSE", "Gaussian"])
    assert [c.sigma for c in inputs] == [0.12, 0.25, 0.5, 1.0]
    table = accuracy_table(inputs, [0.0, 0.25, 0.5], envelope=True)

    markdown = render(table, "markdown")
    rows = markdown_rows(markdown)
    # Clean accuracy once per row, plain certified accuracy per radius; n unknown: no n column.
    assert rows["input"] == ["input", "sigma", "clean", "r = 0.25", "r = 0.5", "ACR"]
    assert rows["no_denoiser"][:5] == ["no_denoiser", "0.12", "80.0", "0.0", "0.0"]
    assert rows["STAB+MSE"][:5] == ["STAB+MSE", "0.5", "70.0", "60.0", "20.0"]
    # The envelope keeps the papers' "(clean) certified": its winner changes with the radius.
    assert rows["envelope"][:5] == ["envelope", "", "80.0", "(70.0) 60.0", "(70.0) 20.0"]
    assert all(len(cells) == len(rows["input"]) for cells in rows.values())
    assert "—" not in markdown and "capped" not in markdown  # no n known: nothing is capped

    latex = render(table, "latex")
    assert "\\begin{tabular}" in latex and "\\end{tabular}" in latex
    assert "no\\_denoiser & 0.12 & 80.0 & 0.0 & 0.0" in latex
    assert "envelope &  & 80.0 & (70.0) 60.0 & (70.0) 20.0" in latex

    csv_lines = render(table, "csv").splitlines()
    assert csv_lines[0] == CSV_HEADER and len(csv_lines) == 1 + 4 * 3 + 3

    figure = certified_accuracy_figure(inputs, envelope=True)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert labels[:4] == [f"{c.name} (σ={c.sigma:g})" for c in inputs] and labels[4] == "envelope"
    # Issue 22 item 9: % on the axis as in the tables; one colour per input whatever the order.
    assert figure.axes[0].get_ylim() == (0.0, 100.0) and "%" in figure.axes[0].get_ylabel()
    curves = [line for line in figure.axes[0].lines if line.get_label() in labels[:4]]
    assert max(float(np.nanmax(line.get_ydata())) for line in curves) > 1.0
    colour_of = {line.get_label(): line.get_color() for line in curves}
    assert len(set(colour_of.values())) == 4
    flipped = certified_accuracy_figure(list(reversed(inputs)))
    assert {line.get_label(): line.get_color() for line in flipped.axes[0].lines
            if line.get_label() in colour_of} == colour_of
    same_sigma = [c.copy() for c in inputs[:2]]
    for c in same_sigma:
        c.sigma = 0.25
    same_labels = certified_accuracy_figure(same_sigma).axes[0].get_legend_handles_labels()[1]
    assert not any("σ" in label for label in same_labels[:2]) and "σ = 0.25" in certified_accuracy_figure(
        same_sigma).get_suptitle()
    assert not [line for line in figure.axes[0].lines if line.get_gid() == MARKER_GID]  # n unknown: no marker
    title = figure.get_suptitle()
    assert "n not recorded" in title and "10 images each" in title
    png = plot_certified_accuracy(inputs, tmp_path / "plots/acc.png", envelope=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_cli_writes_output_and_plot_files(tmp_path, capsys):
    paths = synthetic_group(tmp_path)
    output, plot = tmp_path / "out/table.tex", tmp_path / "out/acc.png"
    args = ["reduce", *map(str, paths[:2]), "--format", "latex", "--output", str(output), "--plot", str(plot)]
    assert main(args) == 0
    assert capsys.readouterr().out == ""
    assert " & 0.12 & 80.0 & 0.0 & 0.0" in output.read_text()  # sigma, clean, r = 0.25, r = 0.5
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["reduce", *map(str, paths[:2]), "--names", "only-one"]) == 2
    assert "--names" in capsys.readouterr().err


# ---------------------------------------------------------------- what n allows: capped radii, titles


SIGMA_RUNS, ALPHA = 0.25, 0.001


def r_max(n: int, alpha: float = ALPHA, sigma: float = SIGMA_RUNS) -> float:
    """The largest certifiable radius from scipy alone: all n votes for c_A."""
    return sigma * float(norm.ppf(beta.ppf(alpha, n, 1)))


def run_with_n(tmp_path: Path, slug: str, n: int, unanimous: int, strong: int, abstain: int) -> tuple[Path, list[float]]:
    """A certify run (as `dsmooth certify` records it) of images with all n votes for the
    label, 90 % of them, or a split that abstains; returns the directory and the radii."""
    run = tmp_path / slug
    open_run(run, {"job": "certify", "mode": "certify", "dataset": "cifar10/test", "data": "cifar10-sample",
                   "sigma": SIGMA_RUNS, "n0": 10, "n": n, "classifier": "cifar_resnet20",
                   "denoiser": None if slug == "alone" else "dncnn_small"})
    rows, radii = [], []
    counts = [[0, n]] * unanimous + [[n // 10, n - n // 10]] * strong + [[n // 2, n - n // 2]] * abstain
    for image_id, estimation in enumerate(counts):
        rows += [vote(image_id, "selection", [0, 10], label=1), vote(image_id, "estimation", estimation, label=1)]
        bound = cp_lower(estimation[1], n, ALPHA)
        radii.append(SIGMA_RUNS * float(norm.ppf(bound)) if bound > 0.5 else 0.0)
    write_votes(run, rows)
    return run, radii


def test_radius_columns_are_capped_by_n(tmp_path, capsys):
    """n = 100 cannot certify r = 0.5 (its limit is below), n = 1000 can: that cell alone
    reads "—"; r = 0.75 is above both limits and is left out with a note naming it."""
    small, small_radii = run_with_n(tmp_path, "alone", 100, unanimous=4, strong=3, abstain=3)
    large, large_radii = run_with_n(tmp_path, "denoised", 1000, unanimous=5, strong=3, abstain=2)
    assert r_max(100) < 0.5 < r_max(1000) < 0.75
    assert max(small_radii) == pytest.approx(r_max(100)) and max(large_radii) == pytest.approx(r_max(1000))
    radii = ["0", "0.25", "0.5", "0.75"]

    assert main(["reduce", str(small), str(large), "--names", "alone", "denoised", "--radii", *radii]) == 0
    markdown = capsys.readouterr().out
    rows = markdown_rows(markdown)
    assert rows["input"] == ["input", "sigma", "n", "clean", "r = 0.25", "r = 0.5", "ACR"]
    for name, n, found in (("alone", 100, small_radii), ("denoised", 1000, large_radii)):
        expected = {r: sum(x >= r and x > 0 for x in found) / len(found) for r in (0.0, 0.25, 0.5)}
        assert rows[name][2:5] == [str(n), f"{100 * expected[0.0]:.1f}", f"{100 * expected[0.25]:.1f}"]
        assert rows[name][5] == ("—" if r_max(n) < 0.5 else f"{100 * expected[0.5]:.1f}")
    note = next(line for line in markdown.splitlines() if line.startswith("Not shown"))
    assert "r = 0.75" in note and "capped by n" in note and f"{r_max(1000):.3g}" in note
    assert any(line.startswith("—:") and "capped by n" in line for line in markdown.splitlines())

    assert main(["reduce", str(small), str(large), "--names", "alone", "denoised", "--radii", *radii,
                 "--format", "csv"]) == 0
    table = read_csv_table(capsys.readouterr().out)
    assert len(table) == 2 * len(radii)  # the CSV keeps every radius, and says which are capped
    for name, n in (("alone", 100), ("denoised", 1000)):
        rows_n = table[table.run == name].set_index("radius")
        assert (rows_n["n"] == n).all() and (rows_n["alpha"] == ALPHA).all()
        assert rows_n["max_radius"].iloc[0] == pytest.approx(r_max(n))
        assert rows_n["capped"].tolist() == [float(r) > r_max(n) for r in radii]
        assert (rows_n.loc[rows_n["capped"], "certified_accuracy"] == 0).all()

    assert main(["reduce", str(small), str(large), "--radii", *radii, "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert "$r=0.5$" in latex and "$r=0.75$" not in latex and " & --- & " in latex
    assert "% Not shown: r = 0.75" in latex


def test_plot_title_and_largest_certifiable_radius_markers(tmp_path):
    small, _ = run_with_n(tmp_path, "alone", 100, unanimous=4, strong=3, abstain=3)
    large, _ = run_with_n(tmp_path, "denoised", 1000, unanimous=5, strong=3, abstain=2)
    inputs = load_inputs([small, large], ALPHA, names=["alone", "denoised"])
    figure = certified_accuracy_figure(inputs)
    axes = figure.axes[0]
    markers = sorted(line.get_xdata()[0] for line in axes.lines if line.get_gid() == MARKER_GID)
    assert markers == pytest.approx([r_max(100), r_max(1000)])
    assert axes.get_xlim()[1] > r_max(1000)  # the limits are on the axis
    title = figure.get_suptitle().replace("\n", " ")
    for part in ("cifar10/test", "cifar10-sample", "cifar_resnet20", "dncnn_small", f"{SIGMA_RUNS:g}",
                 f"{ALPHA:g}", "10 images", "α", "σ"):
        assert part in title, (part, title)
    assert "100" in title and "1,000" in title.replace("1000", "1,000")
    legend = axes.get_legend_handles_labels()[1]
    assert any("largest certifiable radius" in label for label in legend)

    png = plot_certified_accuracy(inputs, tmp_path / "acc.png", title="my headline")
    with Image.open(png) as image:
        assert image.size[0] >= 800
    assert "my headline" in certified_accuracy_figure(inputs, title="my headline").get_suptitle()


def test_logs_get_n_dataset_and_model_from_documented_paths(tmp_path, reference_logs):
    salman = load_input(SALMAN_CIFAR / "noise_0.25/test_N10000/sigma_0.25", ALPHA)
    assert (salman.n, salman.alpha, salman.dataset) == (10_000, 0.001, "cifar10/test")  # as the data README says
    assert "resnet110" in salman.model and "dncnn" in salman.model
    radii = raw_log(SALMAN_CIFAR / "noise_0.25/test_N10000/sigma_0.25")[1]
    assert salman.max_radius == pytest.approx(r_max(10_000, 0.001, 0.25))
    assert radii.max() == pytest.approx(salman.max_radius, abs=5e-3)  # unanimous images reach the limit
    api = load_input(API_LOG, ALPHA)
    assert api.n == 100 and api.model.endswith("azure API") and raw_log(API_LOG)[1].max() <= api.max_radius + 5e-4
    cohen = load_input(COHEN_CIFAR, ALPHA)  # n is not in the path: unknown, nothing capped
    assert cohen.n is None and cohen.max_radius is None and cohen.dataset == "cifar10/test"
    assert load_input(COHEN_PREDICT, ALPHA).max_radius is None  # PREDICT certifies no radius
    # A path that names an n its radii contradict: the n is not believed.
    fine = write_log(tmp_path / "x/test_N100/sigma_0.25", [(1, 0.3), (0, 0.0)])
    contradicted = write_log(tmp_path / "y/test_N100/sigma_0.25", [(1, 0.9), (0, 0.0)])
    assert load_input(fine, ALPHA).n == 100 and load_input(contradicted, ALPHA).n is None


def test_glob_of_a_demo_folder_skips_outputs_silently(tmp_path, capsys):
    """`dsmooth reduce runs/demo/*` gets the runs and the demo's own PNG, CSV and MD files:
    only the runs are read and no warning is printed; a broken log still warns."""
    folder = tmp_path / "demo"
    run, _ = run_with_n(folder, "alone", 100, unanimous=4, strong=3, abstain=3)
    inputs = load_inputs([run], ALPHA)
    plot_certified_accuracy(inputs, folder / "certified_accuracy.png")
    (folder / "table.md").write_text(render(accuracy_table(inputs), "markdown"))
    (folder / "table.csv").write_text(render(accuracy_table(inputs), "csv"))
    expanded = sorted(str(p) for p in folder.iterdir())  # what the shell's glob passes
    assert len(expanded) == 4
    assert main(["reduce", *expanded, "--alpha", "0.01", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and set(read_csv_table(out)["run"]) == {str(run)}

    broken = folder / "half-written-log"
    broken.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    assert main(["reduce", *expanded, str(broken), "--format", "csv"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and str(broken) in err

    assert main(["reduce", str(folder / "table.md"), str(folder / "certified_accuracy.png")]) == 2
    assert "not runs or logs" in capsys.readouterr().err


# ---------------------------------------------------------------- one CERTIFY / PREDICT everywhere


def oracle_certify(selection: list[int], estimation: list[int], n: int, sigma: float, alpha: float):
    """Cohen et al.'s CERTIFY from scipy alone: c_A by the *selection* argmax (lowest index on
    ties), p_A the one-sided Clopper-Pearson bound of its *estimation* count out of n."""
    if sum(selection) == 0:
        return ABSTAIN, 0.0
    c_a = int(np.argmax(selection))
    k = estimation[c_a] if c_a < len(estimation) else 0
    p = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    return (c_a, sigma * norm.ppf(p)) if p > 0.5 else (ABSTAIN, 0.0)


def oracle_predict(counts: list[int], alpha: float):
    ordered = sorted(counts, reverse=True) + [0, 0]
    first, second = ordered[0], ordered[1]
    if first + second == 0 or binomtest(first, first + second, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(np.argmax(counts))


def random_counts(rng: np.random.Generator, classes: int, total: int) -> list[int]:
    """Counts with many ties and zeros: a few distinct values spread over the classes."""
    if total == 0:
        return [0] * classes
    if classes >= 2 and rng.random() < 0.3:  # a tie at the top
        top = int(rng.integers(0, total // 2 + 1))
        rest = rng.multinomial(total - 2 * top, np.ones(classes) / classes) if classes > 2 else [total - 2 * top]
        counts = [top, top, *list(rest)[: classes - 2]]
        counts[-1] += total - sum(counts)
        return [int(c) for c in rng.permutation(counts)]
    return rng.multinomial(total, rng.dirichlet([0.3] * classes)).tolist()


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_reducer_scalar_functions_and_scipy_agree_on_thousands_of_count_matrices(tmp_path, alpha):
    """The reducer (through Parquet), `certify_counts` / `predict_counts` and an oracle written
    with scipy here agree on 3,000 random images, ties, zeros and failed samples included."""
    from pipeline.reduce import load_run

    rng = np.random.default_rng(int(alpha * 1000))
    sigma, rows, expected = 0.5, [], {}
    for image_id in range(3000):
        classes = int(rng.integers(1, 6))
        n0, n = int(rng.integers(0, 40)), int(rng.integers(1, 400))
        selection = random_counts(rng, classes, n0)
        estimation = random_counts(rng, classes, n - int(rng.integers(0, 3)) if n > 2 else n)
        truth = oracle_certify(selection, estimation, n, sigma, alpha)
        if sum(selection):
            scalar = certify_counts(np.array(selection), np.array(estimation), sigma, alpha, n=n)
            assert scalar[0] == truth[0] and scalar[1] == pytest.approx(truth[1], rel=1e-9, abs=1e-12)
        expected[image_id] = truth
        rows += [vote(image_id, "selection", selection, label=0), vote(image_id, "estimation", estimation, n=n, label=0)]
    predict_counts_rows = {}
    for image_id in range(3000, 4500):
        counts = random_counts(rng, int(rng.integers(1, 6)), int(rng.integers(0, 300)))
        predict_counts_rows[image_id] = counts
        assert predict_counts(np.array(counts, dtype=np.int64), alpha) == oracle_predict(counts, alpha)
        rows.append(vote(image_id, "prediction", counts, label=0))
    run = tmp_path / "run"
    open_run(run, {"sigma": sigma})
    write_votes(run, rows)
    certs = load_run(run, alpha).set_index("image_id")
    for image_id, (cls, radius) in expected.items():
        assert certs.at[image_id, "predict"] == cls, image_id
        assert certs.at[image_id, "radius"] == pytest.approx(radius, rel=1e-9, abs=1e-12)
    for image_id, counts in predict_counts_rows.items():
        assert certs.at[image_id, "predict"] == oracle_predict(counts, alpha)


def test_label_votes_agree_with_the_scalar_functions_on_random_mappings(tmp_path):
    """API rows (label strings, in any order) against `certify_counts` on mappings and an oracle
    whose ties go to the smaller label."""
    rng = np.random.default_rng(11)
    names = ["cat", "dog", "bird", "car", "tree"]
    rows, expected = [], {}
    for image_id in range(800):
        chosen = list(rng.choice(names, size=int(rng.integers(1, 5)), replace=False))
        selection = dict(zip(chosen, random_counts(rng, len(chosen), int(rng.integers(1, 30)))))
        counted = list(rng.choice(names, size=int(rng.integers(1, 5)), replace=False))
        estimation = dict(zip(counted, random_counts(rng, len(counted), int(rng.integers(1, 120)))))
        n = sum(estimation.values()) + int(rng.integers(0, 3))
        if sum(selection.values()) == 0:
            continue
        top = max(selection.values())
        c_a = min(label for label, count in selection.items() if count == top)
        k = estimation.get(c_a, 0)
        p = 0.0 if k == 0 else float(beta.ppf(0.01, k, n - k + 1))
        expected[image_id] = (c_a, 0.25 * norm.ppf(p)) if p > 0.5 else ("-1", 0.0)
        scalar = certify_counts(selection, estimation, 0.25, 0.01, n=n)
        assert (str(scalar[0]) if scalar[0] != ABSTAIN else "-1") == expected[image_id][0]
        rows += [vote(image_id, "selection", list(selection.values()), classes=list(selection), label=-1,
                      label_name=c_a),
                 vote(image_id, "estimation", list(estimation.values()), n=n, classes=list(estimation), label=-1,
                      label_name=c_a)]
    run = tmp_path / "run"
    open_run(run, {"sigma": 0.25})
    write_votes(run, rows)
    certs = load_input(run, 0.01).set_index("image_id")
    for image_id, (cls, radius) in expected.items():
        assert certs.at[image_id, "predict"] == cls
        assert certs.at[image_id, "radius"] == pytest.approx(radius, rel=1e-9, abs=1e-12)


def test_certificates_use_the_selection_class_when_the_draws_disagree(tmp_path):
    """Selection names class 1, the estimation draw is mostly class 0: CERTIFY bounds p_A of
    class 1 and abstains. Choosing c_A from the estimation counts would certify class 0 with a
    large radius, the textbook error that voids the guarantee. Checked on model votes in
    Parquet and on API votes rebuilt from a query log."""
    from pipeline.apis.books.ledger import Journal, answer_record, sent_record
    from pipeline.apis.run.state import votes_from_queries
    from pipeline.reduce import certificates_from_votes

    run = tmp_path / "model-run"
    open_run(run, {"sigma": 0.5})
    write_votes(run, [vote(0, "selection", [0, 10, 0], label=0), vote(0, "estimation", [900, 100, 0], label=0),
                      vote(1, "selection", [10, 0, 0], label=0), vote(1, "estimation", [900, 100, 0], label=0)])
    certs = load_input(run, 0.001).set_index("image_id")
    assert certs.at[0, "predict"] == ABSTAIN and certs.at[0, "radius"] == 0.0 and not certs.at[0, "correct"]
    assert certs.at[1, "predict"] == 0 and certs.at[1, "radius"] > 0.4  # same estimation, agreeing selection

    api = tmp_path / "api-run"
    open_run(api, {"sigma": 0.25, "n0": 10, "n": 100, "seed": 0, "chunk_size": 16, "provider": "aws"})
    queries = [{"image_id": 0, "image_name": "x.png", "phase": "clean", "sample": 0, "status": "ok",
                "top_label": "cat", "attempts": 1}]
    queries += [{"image_id": 0, "phase": "selection", "sample": k, "status": "ok", "top_label": "dog", "attempts": 1}
                for k in range(10)]
    queries += [{"image_id": 0, "phase": "estimation", "sample": k, "status": "ok",
                 "top_label": "cat" if k < 95 else "dog", "attempts": 1} for k in range(100)]
    journal = Journal(api)
    for number, query in enumerate(queries):
        call = f"call-{number}"
        journal.append(sent_record(call, journal.invocation, "aws", query["image_id"], "x.png", query["phase"],
                                   query["sample"], 1, "w"))
        journal.append(answer_record(call, "ok", top_label=query["top_label"], labels=[query["top_label"]],
                                     scores=[0.9]))
    journal.close()
    votes = pd.DataFrame(votes_from_queries(api))
    api_certs = certificates_from_votes(votes, 0.001, sigma=0.25).set_index("image_id")
    assert api_certs.at[0, "predict"] == "-1" and api_certs.at[0, "abstained"] and not api_certs.at[0, "correct"]


def test_an_at_r_run_gets_its_own_radius_column_by_default():
    """Issue 22 item 7: `dsmooth reduce` of a sequential run certified at R shows R without
    --radii (its certificates only answer "at R?", so R is the one column that matters)."""
    import pandas as pd

    from pipeline.reduce.certificates import make_certificates

    frame = pd.DataFrame({"image_id": [0, 1], "label": [3, 4], "predict": [3, 4], "radius": [0.2, 0.0],
                          "correct": [True, True], "abstained": [False, False]})
    certs = make_certificates(frame, name="seq", sigma=0.25, alpha=0.001, n=100_000, sequence_shape=2.0,
                              at_radius=0.125)
    table = accuracy_table([certs])
    assert 0.125 in set(table["radius"]) and "r = 0.125" in render(table, "markdown")
