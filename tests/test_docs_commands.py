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
    assert len(RUNNABLE) >= 8 and sum(map(len, RUNNABLE.values())) >= 15


@pytest.mark.parametrize("page", sorted(RUNNABLE))
def test_page_commands_run(page, tmp_path, own_ray):
    folder = scratch(tmp_path / "work")
    for block in RUNNABLE[page]:
        result = run_block(block, folder)
        assert result.returncode == 0, (
            f"{page}:{block.line} failed (exit {result.returncode})\n--- block\n{block.code}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}")
