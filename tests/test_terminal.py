"""What a user's terminal receives: no escape codes from the libraries under dsmooth.

Issue 22 item 6: a stray ESC[0m after the result. Ray's `ray.init` imports its CLI logger,
whose `colorama.init()` registers an exit hook that writes a colour reset to stdout when it is a
terminal, so the test runs a real `dsmooth certify` on a pseudo-terminal (off a terminal the
hook writes nothing, which is why captured output never showed it).
"""

from __future__ import annotations

import errno
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"


def _run_on_a_terminal(args: list[str], timeout: float) -> tuple[int, bytes]:
    """Run `args` with stdout and stderr on one pseudo-terminal; (exit status, all it wrote)."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=REPO, env=env)
    os.close(follower)
    written, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError as error:  # EIO: every writer closed the terminal
                if error.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            written += chunk
        return job.wait(timeout=max(1.0, deadline - time.monotonic())), bytes(written)
    finally:
        job.kill()
        os.close(leader)


@pytest.mark.slow
def test_certify_on_a_terminal_writes_no_escape_codes(tmp_path):
    """A small real run (local Ray, one image): nothing it writes to the terminal -- the log
    lines, the progress, the summary, Ray's shutdown -- holds an ESC byte."""
    status, written = _run_on_a_terminal(
        [sys.executable, "-m", "jobs.cli", "certify", "--dataset", "cifar10",
         "--data-root", "pipeline/assets/cifar10-sample", "--max", "1",
         "--classifier", str(MODELS / "classifier.pt"), "--denoiser", str(MODELS / "denoiser_stab_mse_s0.25.pt"),
         "--sigma", "0.25", "--n0", "10", "--n", "100", "--actors", "1", "--output", str(tmp_path / "run")],
        timeout=600)
    text = written.decode(errors="replace")
    assert status == 0 and "1 images selected" in text, text[-3000:]
    assert b"\x1b" not in written, repr(written[-400:])
