"""``tdcompress bench CONFIG`` on a tiny finished run: the side-by-side document's structure
and that every number is finite (timings are not asserted: see docs/performance.md)."""

from __future__ import annotations

import json
import math

import pytest

from tdcompress.cli import main
from test_cli import error_line, write_cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = write_cfg(tmp)
    assert main(["pipeline", str(cfg)]) == 0
    return cfg


def test_bench_prints_and_writes_dense_and_compressed_side_by_side(tiny_run, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tiny_run.parent / "b.json"
    argv = ["bench", str(tiny_run), "--batch-sizes", "1", "3", "--repeats", "2"]
    argv += ["--runtimes", "eager", "onnxruntime", "--output", str(out)]
    capsys.readouterr()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "compressed speedup" in text and f"written: {out}" in text
    doc = json.loads(out.read_text())
    assert doc["meta"]["reference"] == "dense" and doc["meta"]["execution_choice"] is True
    assert set(doc["models"]) == {"dense", "compressed"}
    dense, comp = doc["models"]["dense"], doc["models"]["compressed"]
    assert comp["params"] < dense["params"]
    assert comp["onnx_bytes"] < dense["onnx_bytes"]  # the file keeps the compressed size
    assert set(comp["rebuilt_layers"]) == {"eager", "onnxruntime"}
    assert dense["rebuilt_layers"] == {"eager": [], "onnxruntime": []}
    for rec in (dense, comp):
        assert rec["macs_per_sample"] > 0
        for mem in rec["peak_rss_mib"].values():
            assert math.isfinite(mem["peak"]) and mem["peak"] >= mem["baseline"] > 0
    cases = {(r["model"], r["runtime"], r["threads"], r["batch"]) for r in doc["rows"]}
    assert cases == {
        (m, rt, 1, b)
        for m in ("dense", "compressed")
        for rt in ("eager", "onnxruntime")
        for b in (1, 3)
    }
    for r in doc["rows"]:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert math.isfinite(r["speedup_vs_dense"]) and r["speedup_vs_dense"] > 0
        lo, hi = r["speedup_ci95"]  # (2 repeats: the range of the paired ratios)
        assert 0 < lo <= hi
        if r["model"] == "dense":
            assert r["speedup_vs_dense"] == 1.0 and lo == hi == 1.0


@pytest.mark.parametrize("n", [1, 5, 6, 30, 101])
def test_median_ci95_holds_the_median_and_covers_it_as_stated(n):
    """The interval brackets the sample median and, for n >= 6, covers the true median of
    a symmetric distribution in about 95% of samples (the order-statistics bound)."""
    import random

    from tdcompress.bench import median_ci95

    rng = random.Random(n)
    hits = 0
    for _ in range(2000):
        v = [rng.gauss(0.0, 1.0) for _ in range(n)]
        lo, hi = median_ci95(v)
        s = sorted(v)
        med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        assert lo <= med <= hi
        hits += lo <= 0.0 <= hi
    if n >= 6:
        assert 0.93 <= hits / 2000 <= 0.995, hits / 2000
    with pytest.raises(ValueError, match="at least one value"):
        median_ci95([])


def test_bench_without_choice_or_memory_and_bad_settings(tiny_run, capsys):
    argv = ["bench", str(tiny_run), "--batch-sizes", "2", "--repeats", "1", "--no-choice"]
    argv += ["--no-memory", "--runtimes", "eager"]
    assert main(argv) == 0
    doc = json.loads((tiny_run.parent / "run" / "bench.json").read_text())
    assert doc["meta"]["execution_choice"] is False
    assert "peak_rss_mib" not in doc["models"]["compressed"]
    assert [r["runtime"] for r in doc["rows"]] == ["eager", "eager"]
    error_line(
        capsys,
        ["bench", str(tiny_run), "--batch-sizes", "0", "--runtimes", "eager"],
        "batch_sizes must be ints >= 1, got [0]",
    )
    error_line(
        capsys,
        ["bench", str(tiny_run), "--repeats", "0", "--runtimes", "eager"],
        "repeats must be an int >= 1, got 0",
    )


def test_export_with_the_execution_choice_keeps_the_compressed_file(tiny_run, capsys):
    pytest.importorskip("onnxscript")
    run = tiny_run.parent / "run"
    base = ["export", str(tiny_run), "--batch-size", "4", "--format", "onnx"]
    assert main([*base, "--output", str(run / "chosen.onnx"), "--execution-choice"]) == 0
    assert "chosen.onnx (onnx" in capsys.readouterr().out
    assert main([*base, "--output", str(run / "dense.onnx"), "--weights", "dense"]) == 0
    assert main([*base, "--output", str(run / "plain.onnx")]) == 0
    chosen, plain = (run / "chosen.onnx").stat().st_size, (run / "plain.onnx").stat().st_size
    assert chosen < (run / "dense.onnx").stat().st_size
    assert abs(chosen - plain) < 0.25 * plain  # whatever ran rebuilt: the cores, not kernels


def test_bench_models_chooses_at_each_thread_count(factorized_net):
    """One prepared model per runtime, thread count and batch size: the execution choice is
    made (and reported) for each case the model is timed in."""
    import torch

    from tdcompress.bench import bench_models

    n = torch.get_num_threads()
    try:
        doc = bench_models(
            {"dense": factorized_net(), "compressed": factorized_net()},
            (1, 3, 16, 16),
            batch_sizes=(1,),
            threads=(1, 2),
            runtimes=("eager",),
            repeats=2,
            choice_repeats=1,
            memory=False,
        )
    finally:
        torch.set_num_threads(n)
    rec = doc["models"]["compressed"]
    assert set(rec["rebuilt_layers_by_case"]) == {"1 threads, batch 1", "2 threads, batch 1"}
    assert rec["rebuilt_layers"] == rec["rebuilt_layers_by_case"]["1 threads, batch 1"]
    # eager: what runs rebuilt is deployed as PyTorch's own layers
    for case, by_rt in rec["densified_layers_by_case"].items():
        assert by_rt["eager"] == rec["rebuilt_layers_by_case"][case]["eager"]
    assert {(r["model"], r["threads"]) for r in doc["rows"]} == {
        (m, t) for m in ("dense", "compressed") for t in (1, 2)
    }
