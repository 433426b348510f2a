"""`dsmooth`: the command line.

Each subcommand lives in its own module under `jobs/` exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so `--help` is
instant and does not start Ray or import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

DESCRIPTION = """\
dsmooth turns a pretrained image classifier -- or a vision API you can only query -- into a
provably robust one with denoised smoothing (Salman et al., 2020): a denoiser D is put in
front of the classifier f, and randomized smoothing (Cohen et al., 2019) of f(D(x)) gives a
certified radius (L2; L1 under --noise uniform|laplace) for each prediction.

Jobs run on a local Ray started for you, or on a cluster given by --address / RAY_ADDRESS.
Run `dsmooth COMMAND --help` for each command's options."""

# name -> (module under jobs/, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "the main job: certify the shipped CIFAR-10 sample with and without denoisers, in minutes"),
    "certify": ("jobs.certify", "certify (or predict) a data set with a denoiser-classifier pair across Ray actors"),
    "models": ("jobs.models_cmd", "list the denoiser and classifier architectures dsmooth can build"),
    "convert-diffusion": ("jobs.convert_diffusion",
                          "convert a diffusers folder or guided-diffusion checkpoint into a dsmooth denoiser"),
    "reduce": ("jobs.reduce", "turn vote counts and reference logs into certificates, tables and plots"),
    "train": ("jobs.train", "train denoisers (and classifiers) with Ray Train over a sweep of sigmas, objectives and surrogates"),
    "certify-api": ("jobs.certify_api", "certify a commercial vision API under query and cost budgets"),
    "api-emulator": ("jobs.api_emulator", "serve a local emulator of the AWS, Google, Azure and Clarifai vision APIs on 127.0.0.1"),
}


def version() -> str:
    """The installed package's version (the source tree's pyproject.toml when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dsmooth")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from jobs.options import Parser

    parser = Parser(prog="dsmooth", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dsmooth {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        # Options are added lazily (see main) so that `dsmooth --help` imports nothing heavy.
    return parser


def add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (results still print)")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug lines, and Ray's own output (worker logs, its INFO lines)")


def command_parser(name: str) -> tuple[Any, argparse.ArgumentParser]:
    """(the command's module, its full parser): what `dsmooth NAME` parses, and what the CLI
    reference (`jobs/cli_reference.py`) documents, so the two cannot differ."""
    from jobs.options import Parser

    module = importlib.import_module(COMMANDS[name][0])
    sub = Parser(prog=f"dsmooth {name}", description=(module.__doc__ or COMMANDS[name][1]).strip())
    module.add_arguments(sub)
    add_verbosity_arguments(sub)
    return module, sub


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        from jobs import logs
        from pipeline.errors import Refused

        module, sub = command_parser(argv[0])
        args = sub.parse_args(argv[1:])
        logs.setup(logs.VERBOSE if args.verbose else logs.QUIET if args.quiet else logs.NORMAL)
        try:
            return int(module.run(args) or 0)
        except KeyboardInterrupt as stop:
            print(str(stop) if str(stop) else "interrupted; finished work is kept and a rerun resumes it",
                  file=sys.stderr)
            return 130
        except (Refused, ValueError, FileNotFoundError, PermissionError, KeyError) as error:
            # Bad input: one clear line, not a traceback (use --debug-style env to see more).
            if _debug():
                raise
            print(f"dsmooth {argv[0]}: error: {error}", file=sys.stderr)
            return 2
    parser.parse_args(argv)
    parser.print_help()
    return 0 if argv else 1


def _debug() -> bool:
    import os

    return os.environ.get("DSMOOTH_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
