"""Smoke test of benchmarks/bench_admm_overhead.py: a tiny batch, one repeat; the penalty
and hook modes must give the same parameters (timings are not asserted)."""

from __future__ import annotations

import json
import math


def test_admm_overhead_bench_writes_finite_medians_and_equal_modes(load_benchmark, tmp_path):
    bench = load_benchmark("bench_admm_overhead")
    out = tmp_path / "o.json"
    doc = bench.main(["--batch", "4", "--repeats", "1", "--warmup", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == doc
    assert set(doc["median_ms"]) == {"plain", "penalty", "hook"}
    assert all(math.isfinite(v) and v > 0 for v in doc["median_ms"].values())
    assert all(math.isfinite(v) for v in doc["overhead_vs_plain"].values())
    assert doc["penalty_vs_hook_max_param_diff"] < 1e-5
