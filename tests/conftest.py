"""Shared fixtures: the real-data root (tests that need it skip when it is absent), the
benchmark loader, and a small CNN holding every kind of factorized layer."""

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


def _factorized_net():
    """A small CNN on (N, 3, 16, 16) inputs with BN and every factorized layer kind (TT, TR,
    Tucker-2 and low-rank convs; TT and low-rank linears): 10 outputs, seeded."""
    import torch
    from torch import nn

    from tdcompress.layers import (
        LowRankConv2d,
        LowRankLinear,
        TRConv2d,
        TTConv2d,
        TTLinear,
        Tucker2Conv2d,
    )

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        TTConv2d(8, 16, 3, ranks=3, padding=1, stride=2),
        Tucker2Conv2d(16, 16, 3, (4, 4), padding=1),
        LowRankConv2d(16, 16, 3, 4, padding=1),
        TRConv2d(16, 8, 3, ranks=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        TTLinear(32, 16, ranks=4),
        nn.ReLU(),
        LowRankLinear(16, 10, 3),
    )


@pytest.fixture(scope="session")
def factorized_net():
    """Factory of :func:`_factorized_net` (a fresh, identically seeded model per call)."""
    return _factorized_net
