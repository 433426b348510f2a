"""Turn command-line paths into inputs: a run directory (has run.json) is one input, a log
file is one input, and any other directory stands for every run and log found under it.

Unusable inputs (empty or truncated logs, runs without votes) are skipped with a
ReduceWarning that names them, so one dead run in a collection of hundreds costs a line on
stderr, not the whole table. Files that are plainly not logs (a table, a plot, a config: see
NOT_LOGS) are passed over silently, whether found in a directory or named on the command
line -- `dsmooth reduce runs/demo/*` expands to the runs *and* the demo's PNG, CSV and MD.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pipeline.reduce.certificates import Certificates, ReduceWarning, UnusableInput
from pipeline.reduce.reference_logs import read_log
from pipeline.reduce.votes import load_run
from pipeline.runs.fs import Location
from pipeline.runs.storage import RUN_FILE, is_run

# Files that sit beside logs but are never logs (outputs, docs, checkpoints, archives).
NOT_LOGS = {
    ".md", ".rst", ".json", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".pdf", ".svg", ".csv", ".tex",
    ".parquet", ".py", ".pyc", ".ipynb", ".gz", ".tgz", ".tar", ".zip", ".pt", ".pth", ".pkl", ".npy",
    ".npz", ".tmp", ".sh", ".html",
}


logger = logging.getLogger(__name__)


def is_not_a_log(path: str | Path | Location) -> bool:
    """A file whose suffix says it is an output, document or checkpoint, never a log."""
    location = Location.of(path)
    return Path(location.name).suffix.lower() in NOT_LOGS and not location.is_dir()


def load_input(path: str | Path | Location, alpha: float | None = None, name: str | None = None) -> Certificates:
    """One run directory (at `alpha`, by default the run's own) or one reference log (alpha
    fixed when it was written), local or on object storage. Raises UnusableInput for an empty/truncated log
    or a run without votes."""
    location = Location.of(path)
    if is_run(location):
        return load_run(location, alpha, name=name)
    if location.is_dir():
        raise UnusableInput(f"{path}: a directory without {RUN_FILE}; use load_inputs to search it")
    if not location.exists():
        raise FileNotFoundError(f"no such run or log: {path}")
    return read_log(location, name=name)


def find_inputs(directory: str | Path | Location) -> list[Location]:
    """Every run directory and candidate log under `directory`, in sorted order; a run's own
    files are not searched (its votes are the run)."""
    found: list[Location] = []
    runs: list[str] = []
    for folder, dirs, files in Location.of(directory).walk():
        if any(folder.path == run or folder.path.startswith(run + "/") for run in runs):
            continue
        if RUN_FILE in files:
            found.append(folder)
            runs.append(folder.path)
            continue
        if any(part.startswith(".") for part in folder.path.split("/")[-1:]):
            continue
        for file in sorted(files):
            if not file.startswith(".") and Path(file).suffix.lower() not in NOT_LOGS:
                found.append(folder / file)
    return sorted(found, key=lambda location: location.path)


def load_inputs(paths: Sequence[str | Path], alpha: float | None = None,
                names: Sequence[str] | None = None) -> list[Certificates]:
    """Load every input the paths stand for, skipping unusable ones with a warning and files
    that are not logs (`is_not_a_log`, e.g. a shell glob's PNG) with one info log line.

    `names` label the paths one for one; a directory's inputs are then named
    `NAME/relative path`. Without names an input is named by its path (relative to the
    directory argument it was found under)."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"--names gives {len(names)} name(s) for {len(paths)} input path(s)")
    planned: list[tuple[Location, str]] = []
    passed_over: list[str] = []
    for index, argument in enumerate(paths):
        location = Location.of(argument)
        given = None if names is None else names[index]
        if not location.exists():
            raise FileNotFoundError(f"no such run, log or directory: {argument}")
        if is_not_a_log(location):
            passed_over.append(location.name)
            continue
        if location.is_dir() and not is_run(location):
            found = find_inputs(location)
            if not found:
                warnings.warn(f"{argument}: no runs or logs found under it", ReduceWarning, stacklevel=2)
            for item in found:
                relative = item.path[len(location.path.rstrip("/")) + 1 :] or "."
                if given is None:
                    label = relative if relative != "." else str(argument)
                else:
                    label = given if len(found) == 1 else f"{given}/{relative}"
                planned.append((item, label))
        else:
            planned.append((location, given if given is not None else str(argument)))
    if passed_over:
        logger.info("passed over %d file(s) that are not runs or logs: %s", len(passed_over), ", ".join(passed_over))
    planned = _unique_names(planned)
    loaded = []
    for location, label in planned:
        try:
            loaded.append(load_input(location, alpha, name=label))
        except UnusableInput as error:
            warnings.warn(f"skipped {error}", ReduceWarning, stacklevel=2)
    return loaded


def _unique_names(planned: list[tuple[Location, str]]) -> list[tuple[Location, str]]:
    """Two directory arguments can hold the same relative path; fall back to full paths."""
    counts = Counter(label for _, label in planned)
    return [(location, str(location) if counts[label] > 1 else label) for location, label in planned]
