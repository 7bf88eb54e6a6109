"""benchmarks/bench_inference.py: the compared models are what their labels say, and one
quick run gives every case a row."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_inference")


def test_variants_have_the_stated_ratios_and_counts(bench):
    v = bench.make_variants("resnet20")
    assert list(v) == ["dense", "TT 6.8x equal ranks", "TT 6.8x equal ratio", "Tucker-2 3x"]
    dense_params = v["dense"][1]
    for model, params, _macs in v.values():
        assert params == sum(p.numel() for p in model.parameters())  # counted, not planned
        assert not model.training
    for label, target in [
        ("TT 6.8x equal ranks", 6.8),
        ("TT 6.8x equal ratio", 6.8),
        ("Tucker-2 3x", 3.0),
    ]:
        assert dense_params / v[label][1] == pytest.approx(target, rel=0.02)
    # equal_ratio spends the same parameters on far fewer MACs (ResNet-20: 6.9x vs 2.8x)
    assert v["dense"][2] / v["TT 6.8x equal ratio"][2] > 6
    assert v["dense"][2] / v["TT 6.8x equal ranks"][2] < 3
    # the compressed models compute (their forward runs and is finite)
    with torch.no_grad():
        assert torch.isfinite(v["TT 6.8x equal ratio"][0](torch.randn(2, 3, 32, 32))).all()


def test_one_quick_run_has_a_row_per_case(bench, tmp_path):
    n = torch.get_num_threads()
    try:
        doc = bench.main(["--repeats", "1", "--batches", "2", "--out", str(tmp_path / "i.json")])
    finally:
        torch.set_num_threads(n)
    rows = doc["rows"]
    assert len(rows) == 4 * 2  # variants x modes (no --compile)
    assert {r["mode"] for r in rows} == {"NCHW", "channels_last"}
    dense = {(r["batch"], r["mode"]): r["ms"] for r in rows if r["variant"] == "dense"}
    for r in rows:  # each row against the dense model in the same batch and mode
        assert r["speedup_vs_dense"] == pytest.approx(dense[(r["batch"], r["mode"])] / r["ms"])
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "i.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit, match="--batches must be >= 1"):
        bench.main(["--batches", "0", "--out", str(tmp_path / "j.json")])
    with pytest.raises(SystemExit, match="--repeats must be >= 1, got 0"):
        bench.main(["--repeats", "0", "--out", str(tmp_path / "j.json")])
