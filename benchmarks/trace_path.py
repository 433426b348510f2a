"""A reader's path: which project files the per-image loop of `dsmooth certify` and
`dsmooth certify-api` runs through, in the driver and in the Ray workers.

Runs each job on 1 image (the shipped CIFAR-10 sample and pair; certify-api through the local
emulator, no denoiser) with a line tracer (`benchmarks/trace_hook/sitecustomize.py`) in the
driver and in every Ray worker, and prints, per job: the non-test files the loop executed
lines in, the lines those files hold (what a reader opens), and the lines executed.

The loop: in the driver, `CertifyRun.run` (read an image, submit, take results, write the
vote rows); in a worker, every actor call after the actor's construction.

    python benchmarks/trace_path.py                 # both jobs
    python benchmarks/trace_path.py --job certify-api --files   # and the files, one a line

Takes about a minute per job on 2 CPU cores (Ray start-up dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK = Path(__file__).resolve().parent / "trace_hook"
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"


def _env(trace_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HOOK), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p and Path(p).resolve() != REPO])
    env["DSMOOTH_TRACE_DIR"] = str(trace_dir)
    env["DSMOOTH_TRACE_ROOT"] = str(REPO)
    return env


def _dsmooth(args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=900)
    if done.returncode != 0:
        sys.exit(f"dsmooth {args[0]} failed ({done.returncode}); see {log}:\n{log.read_text()[-3000:]}")


def run_certify(work: Path) -> Path:
    trace = work / "trace-certify"
    trace.mkdir()
    _dsmooth(["certify", "--dataset", "cifar10", "--data-root", str(REPO / "pipeline/assets/cifar10-sample"),
              "--max", "1", "--classifier", str(MODELS / "classifier.pt"),
              "--denoiser", str(MODELS / "denoiser_stab_mse_s0.25.pt"), "--sigma", "0.25", "--n0", "100",
              "--n", "1000", "--actors", "1", "--output", str(work / "run-certify")],
             _env(trace), work / "certify.log")
    return trace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_certify_api(work: Path) -> Path:
    trace = work / "trace-certify-api"
    trace.mkdir()
    port = _free_port()
    plain = {k: v for k, v in os.environ.items() if not k.startswith("DSMOOTH_TRACE")}
    plain["PYTHONPATH"] = str(REPO)
    emulator = subprocess.Popen([sys.executable, "-m", "jobs.cli", "api-emulator", "--port", str(port)], cwd=REPO,
                                env=plain, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or emulator.poll() is not None:
                    sys.exit("the API emulator did not start")
                time.sleep(0.5)
        env = _env(trace)
        env.update(AWS_ACCESS_KEY_ID="emulated", AWS_SECRET_ACCESS_KEY="emulated", AWS_DEFAULT_REGION="us-east-1")
        _dsmooth(["certify-api", "--config", str(REPO / "examples/certify_api_emulated.yaml"),
                  "--data-root", str(REPO / "pipeline/assets/cifar10-sample/test/airplane"), "--max", "1",
                  "--endpoint", f"http://127.0.0.1:{port}", "--output", str(work / "run-certify-api")],
                 env, work / "certify-api.log")
    finally:
        emulator.terminate()
        emulator.wait(30)
    return trace


def summarise(trace: Path) -> dict:
    """Union over the processes: file -> executed lines; and which roles ran each file."""
    lines: dict[str, set[int]] = defaultdict(set)
    roles: dict[str, set[str]] = defaultdict(set)
    for part in trace.glob("*.json"):
        data = json.loads(part.read_text())
        for name, numbers in data["lines"].items():
            lines[name].update(numbers)
            roles[name].add(data["role"])
    size = {name: sum(1 for _ in open(REPO / name, encoding="utf-8")) for name in lines}
    return {"files": sorted(lines), "file_lines": sum(size.values()), "executed": sum(map(len, lines.values())),
            "size": size, "roles": roles, "lines": lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=["certify", "certify-api", "both"], default="both")
    parser.add_argument("--files", action="store_true", help="list the files (lines held, executed, where)")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs and raw traces here")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="dsmooth-trace-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = {"certify": run_certify, "certify-api": run_certify_api}
    for job in (jobs if args.job == "both" else [args.job]):
        result = summarise(jobs[job](work))
        print(f"dsmooth {job}, 1 image: the per-image loop crosses {len(result['files'])} files "
              f"({result['file_lines']:,} lines), {result['executed']:,} lines executed")
        if args.files:
            for name in result["files"]:
                where = "+".join(sorted(result["roles"][name]))
                print(f"  {name:48s} {result['size'][name]:5d} lines  {len(result['lines'][name]):4d} run  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
