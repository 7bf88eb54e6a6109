"""Shared fixtures: the real-data root (tests that need it skip when it is absent)."""

from __future__ import annotations

import importlib.util
import os
import sys
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


def _load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (once per session; benchmarks import each other)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def load_benchmark():
    return _load_benchmark
