"""Turn vote counts and reference logs into certificates, tables and plots.

Each RUN is a run directory (has run.json: certificates are recomputed from its Parquet
votes, at the alpha the run recorded -- for a sequential run exactly its own decisions --
or at --alpha, any alpha, no new samples, which the table then says), a per-image log
written by the reference implementations (Cohen et al.'s or the Denoised Smoothing
authors' TSV logs, or the vision-API `log.txt`; their alpha was fixed when they were
written), or a directory: every run and log under it is one input. Empty or truncated logs
are skipped with a warning; files that are not runs or logs (.png, .csv, .md, ... as a
shell glob picks them up) are passed over silently.

Each row shows an input's clean accuracy once, then its certified accuracy (%) per radius
(the default radii, plus the R of every sequential run certified at R; such a run measures
no clean accuracy, so its first column is its certified accuracy at R). An α column appears
when the inputs' alphas differ or --alpha overrides a run's own. No radius above
sigma*Phi^-1(alpha^(1/n)) can be certified with n samples (a sequential run: its confidence
sequence's ceiling at n_max, which is lower): a radius above every input's limit is left
out (a note says so), a cell above its own input's limit reads "—". --envelope adds, per
radius, the best input (ties to the higher clean accuracy), the way Salman et al. build
Tables 1 and 2, in their "(clean accuracy) certified accuracy" cells. The CSV is long (a
row per input and radius) and keeps every radius, with the columns run, sigma, radius,
certified_accuracy, clean_accuracy, n, alpha, max_radius, capped (True where the radius
lies above max_radius), run_alpha (the alpha the run recorded; differs from alpha after
--alpha).

examples:
  dsmooth reduce runs/cifar10-mse runs/cifar10-stab --names MSE STAB+MSE --plot acc.png
  dsmooth reduce ../shared/data/reference-logs/cohen2019/certify/cifar10 --envelope
  dsmooth reduce runs/api --alpha 0.01 --format csv --output table.csv --per-image certs.csv"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from pipeline.command_settings import ReduceSettings

    parser.add_argument("inputs", nargs="+", metavar="RUN",
                        help="run directory, reference log, or directory to search")
    add_settings_arguments(parser, ReduceSettings)


def settings(args: argparse.Namespace):
    """ReduceSettings from the command line; errors name the flag."""
    from jobs.options import load_settings
    from pipeline.command_settings import ReduceSettings

    return load_settings(ReduceSettings, args, extra={"inputs": args.inputs})


def load(paths: list[str | Path], alpha: float | None = None, names: list[str] | None = None) -> list:
    """Every usable input the paths stand for (`pipeline.reduce.load_inputs`); ValueError when
    none is left, since a table of nothing is never what was meant (the CLI and
    `dsmooth.reduce` both start here)."""
    from pipeline.reduce import load_inputs
    from pipeline.reduce.inputs import is_not_a_log

    inputs = load_inputs(paths, alpha, names=names)
    if not inputs:
        passed_over = sum(is_not_a_log(Path(path)) for path in paths)
        why = f"; {passed_over} of them are not runs or logs by their suffix" if passed_over else ""
        raise ValueError(f"no usable runs or logs among the inputs (see the warnings{why})")
    return inputs


def run(args: argparse.Namespace) -> int:
    from pipeline.reduce import ReduceWarning, accuracy_table, per_image_table, plot_certified_accuracy, render

    chosen = settings(args)
    with warnings.catch_warnings():
        warnings.simplefilter("always", ReduceWarning)
        warnings.showwarning = _print_warning
        inputs = load(chosen.inputs, chosen.alpha, names=chosen.names)

    table = accuracy_table(inputs, chosen.radii, envelope=chosen.envelope)
    text = render(table, chosen.format)
    if chosen.output:
        _write(chosen.output, text)
    else:
        sys.stdout.write(text)
    if chosen.per_image:
        per_image = per_image_table(inputs)
        _write(chosen.per_image, per_image.to_csv(index=False, float_format="%.10g", lineterminator="\n"))
    if chosen.plot:
        plot_certified_accuracy(inputs, chosen.plot, envelope=chosen.envelope)
    print(f"dsmooth reduce: {len(inputs)} input(s), {sum(len(c) for c in inputs)} image certificates", file=sys.stderr)
    return 0


def _write(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One plain line per skipped input, not Python's file:line warning format."""
    print(f"dsmooth reduce: warning: {message}", file=sys.stderr)
