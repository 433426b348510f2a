"""Reduce: vote counts and reference logs -> certificates, tables and plots.

Offline by design: certificates are recomputed from stored counts at any alpha, and the
reference implementations' logs are read into the same shape, so new runs and published
results share one table. No Ray here: the demo job and the CLI both call these functions.
"""

from pipeline.reduce.certificates import (
    Certificates,
    ReduceWarning,
    UnusableInput,
    average_certified_radius,
    certified_accuracy,
    clean_accuracy,
)
from pipeline.reduce.inputs import find_inputs, load_input, load_inputs
from pipeline.reduce.plots import certified_accuracy_figure, plot_certified_accuracy
from pipeline.reduce.reference_logs import describe_path, read_log, sigma_from_path
from pipeline.reduce.tables import DEFAULT_RADII, accuracy_table, per_image_table, render
from pipeline.reduce.votes import certificates_from_votes, load_run

__all__ = [
    "Certificates",
    "DEFAULT_RADII",
    "ReduceWarning",
    "UnusableInput",
    "accuracy_table",
    "average_certified_radius",
    "certificates_from_votes",
    "certified_accuracy",
    "certified_accuracy_figure",
    "clean_accuracy",
    "describe_path",
    "find_inputs",
    "load_input",
    "load_inputs",
    "load_run",
    "per_image_table",
    "plot_certified_accuracy",
    "read_log",
    "render",
    "sigma_from_path",
]
