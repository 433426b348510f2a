"""Every `<!-- run -->` / `<!-- ci -->` block of README.md and docs/ runs, as written, at the
tiny size its marker appends (see docs/reference/docs-tests.md). Blocks of one page run in
order in one scratch folder, so a later block may use an earlier one's output. Slow tier: each
page starts its own local Rays, in fresh processes, as a user's shell would."""

from __future__ import annotations

import pytest

from docs_support import hooks, page_name, pages, run_block, scratch

pytestmark = pytest.mark.slow

RUNNABLE = {
    page_name(path): [b for b in hooks.blocks(path.read_text(), page_name(path)) if b.marker in ("run", "ci")]
    for path in pages()
}
RUNNABLE = {page: blocks for page, blocks in RUNNABLE.items() if blocks}


def test_some_blocks_are_run():
    """The docs runner has pages and blocks to run (a marker parser that found none would pass every page)."""
    assert len(RUNNABLE) >= 8 and sum(map(len, RUNNABLE.values())) >= 15


@pytest.mark.parametrize("page", sorted(RUNNABLE))
def test_page_commands_run(page, tmp_path, own_ray):
    """Every `run`/`ci` shell block of the page runs as written, at the tiny size its marker appends, in a
    fresh shell that starts its own Ray as a user's would."""
    folder = scratch(tmp_path / "work")
    for block in RUNNABLE[page]:
        result = run_block(block, folder)
        assert result.returncode == 0, (
            f"{page}:{block.line} failed (exit {result.returncode})\n--- block\n{block.code}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}")


def test_mkdocs_serve_serves_the_site_on_localhost():
    """`mkdocs serve` starts and serves the site (the generated command-line reference included) on
    127.0.0.1."""
    import importlib.util
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from docs_support import ROOT

    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e \".[docs]\")")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mkdocs", "serve", "--no-livereload", "-a", f"127.0.0.1:{port}"],
                              cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, page = time.monotonic() + 120, None
        while time.monotonic() < deadline and page is None:
            time.sleep(1)
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/reference/cli/", timeout=5) as answer:
                    page = answer.read().decode()
            except OSError:
                continue
        assert page is not None, "mkdocs serve did not answer within 120 s"
        assert "dsmooth certify-api" in page and "--max-queries" in page
    finally:
        server.terminate()
        server.wait(timeout=30)
