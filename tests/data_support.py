"""Real data beside the checkout (`../shared/data`): present in CI and on the developers'
machines, absent on a user's clone, where the tests that need it skip with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under `../shared/data`; the calling test skips with a one-line reason when it is
    absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {Path('..', 'shared', 'data', *parts)} (real data beside the checkout; absent here)")
    return path
