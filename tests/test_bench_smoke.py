"""Smoke test of benchmarks/bench_projection.py: its smallest case, one repeat, real checks."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_projection")


def test_conv_layout_matches_manual_indexing(bench):
    g = torch.Generator().manual_seed(1)
    x = bench.conv_tensor(6, 4, 3, [2, 3], [2, 2], g)
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    w = w * math.sqrt(2.0 / (4 * 9))
    for o, i, a, b in [(0, 0, 0, 0), (5, 3, 2, 1), (4, 1, 1, 2)]:
        # (O, kh*kw, I) layout: out index o = 3*o1 + o2, in index i = 2*i1 + i2
        assert x[o // 3, o % 3, 3 * a + b, i // 2, i % 2] == w[o, i, a, b]


def test_tt_matrix_pairs_row_and_column_modes(bench):
    g = torch.Generator().manual_seed(2)
    x = bench.tt_matrix_tensor([2, 3], [4, 5], g)
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(2)) * math.sqrt(1 / 20)
    assert tuple(x.shape) == (8, 15)
    for r, c in [(0, 0), (5, 19), (3, 7)]:
        m1, m2, n1, n2 = r // 3, r % 3, c // 5, c % 5
        assert x[m1 * 4 + n1, m2 * 5 + n2] == w[r, c]


def test_symeig_feasibility_guard(bench):
    assert bench._larger_gram_fits((8, 8, 9, 8, 8), 8) is None
    msg = bench._larger_gram_fits((64, 64, 64, 64), 8)
    assert msg is not None and "262144x262144" in msg


@pytest.fixture
def one_thread():
    # 2-thread LAPACK calls slow down 100x+ when other jobs hold a core; keep the smoke fast
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_summary_picks_fastest_equal_error_peer(bench):
    rows = {
        "ours[gram]": {"median_ms": 1.0, "rel_error": 0.8, "ranks_ok": True},
        "fast_but_worse": {"median_ms": 1.5, "rel_error": 0.9, "ranks_ok": True},
        "slow_equal": {"median_ms": 4.0, "rel_error": 0.8, "ranks_ok": True},
        "gone": {"skipped": "not installed"},
    }
    res = {"case": "t", "rank": 1, "results": rows}
    bench.summarize(res, {"ours[gram]"})
    s = res["summary"]
    assert res["fastest_peer"] == "fast_but_worse"
    assert s["speedup_vs_fastest_peer"] == pytest.approx(1.5)
    # energy kept: 1 - 0.81 = 0.19 vs 1 - 0.64 = 0.36 -> not "equal error"
    assert rows["fast_but_worse"]["energy_vs_ours"] == pytest.approx(0.19 / 0.36)
    assert s["fastest_equal_error_peer"] == "slow_equal"
    assert s["speedup_vs_fastest_equal_error_peer"] == pytest.approx(4.0)
    assert s["goal_2x_met"] and not s["2x_vs_every_peer"]


def test_powerlaw_input_has_decaying_spectrum(bench):
    x = bench.powerlaw_tt_tensor((8, 8, 9, 8), 1.0, torch.Generator().manual_seed(3))
    assert torch.linalg.vector_norm(x) == pytest.approx(1.0, rel=1e-5)
    s = torch.linalg.svdvals(x.reshape(64, 72).double())
    assert s[31] / s[0] < 0.2  # a Gaussian 64x72 matrix has s_32/s_1 around 0.4
    sg = torch.linalg.svdvals(torch.randn(64, 72, generator=torch.Generator().manual_seed(3)))
    assert sg[31] / sg[0] > 0.2


def test_smallest_case_runs_and_agrees(bench, one_thread):
    case = next(c for c in bench.CASES if c.name == "conv64-r8")
    libs = [lib for lib in bench.LIBRARIES if "symeig" not in lib.name]  # 5 s per call
    out = bench.run_case(case, libs, repeats=1, log=lambda s: None)
    rows = out["results"]
    ours = rows["ours[gram]"]
    assert ours["ranks"] == [1, 8, 8, 8, 8, 1] == out["expected_ranks"]
    assert ours["ranks_ok"] and rows["ours[svd]"]["ranks_ok"]
    # independent oracle: the same TT-SVD by LAPACK gives the same error
    assert ours["rel_error"] == pytest.approx(rows["ours[svd]"]["rel_error"], abs=1e-5)
    assert 0.5 < ours["rel_error"] < 1.0  # Gaussian input at rank 8: most energy discarded
    ran = {n: r for n, r in rows.items() if "median_ms" in r}
    peers = [n for n in ran if not n.startswith("ours")]
    if peers:
        best = out["fastest_peer"]
        assert ran[best]["ratio_to_fastest_peer"] == pytest.approx(1.0)
        assert min(ran[n]["median_ms"] for n in peers) == ran[best]["median_ms"]
    for n in ("tensorly[np]", "tensorly[torch]", "torchtt"):  # exact left-to-right TT-SVD
        if n in ran:
            assert ran[n]["ranks_ok"], n
            assert ran[n]["rel_error"] == pytest.approx(ours["rel_error"], abs=1e-5), n
    assert ours["energy_vs_ours"] == pytest.approx(1.0)
    table = bench.format_table([out])
    assert "ours[gram]" in table and "conv64-r8" in table
    assert "| conv64-r8 | 8 | **ours[gram]**" in bench.format_markdown([out])


def test_merge_later_run_replaces_case(bench):
    def run(ms: float) -> dict:
        rows = {
            "ours[gram]": {"median_ms": ms, "rel_error": 0.5, "ranks_ok": True},
            "peer": {"median_ms": 3.0, "rel_error": 0.5, "ranks_ok": True},
        }
        return {
            "environment": {"date_utc": str(ms)},
            "libraries": {"ours[gram]": "", "peer": ""},
            "cases": [{"case": "ucf11-r4", "rank": 4, "results": rows}],
        }

    old = run(2.0)
    old["cases"].append({**run(1.0)["cases"][0], "case": "conv64-r8"})
    merged = bench.merge_runs([old, run(0.5)], ["a.json", "b.json"])
    assert [c["case"] for c in merged["cases"]] == ["conv64-r8", "ucf11-r4"]  # CASES order
    ucf = merged["cases"][1]
    assert ucf["from_run"] == 1 and ucf["summary"]["speedup_vs_fastest_peer"] == pytest.approx(6)
    assert merged["cases"][0]["summary"]["speedup_vs_fastest_peer"] == pytest.approx(3)


def test_gpu_check_exits_cleanly_without_cuda_and_dry_runs_on_cpu(
    load_benchmark, tmp_path, capsys
) -> None:
    import json

    import torch

    gc = load_benchmark("gpu_check")
    if not torch.cuda.is_available():
        assert gc.main(["--out", str(tmp_path / "none.json")]) == 0
        assert "no CUDA device" in capsys.readouterr().out
        assert not (tmp_path / "none.json").exists()
    out = tmp_path / "gpu.json"
    assert gc.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert all(v["ok"] for v in doc["checks"].values()), doc["checks"]
    assert set(doc["train_step_ms"]) == {"dense fp32", "tt 6.8x fp32", "dense bf16", "tt 6.8x bf16"}
    assert doc["export_pt2"]["max_abs_diff"] < 1e-3 and doc["export_onnx"]["max_abs_diff"] < 1e-3
