"""Shared fixtures: the real-data root (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("TDCOMPRESS_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_root() -> Path:
    root = _data_root()
    if not (root / "mnist").is_dir():
        pytest.skip(f"real datasets not found under {root} (set TDCOMPRESS_DATA_ROOT)")
    return root
