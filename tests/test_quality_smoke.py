"""Smoke tests of benchmarks/quality.py and benchmarks/rho_sensitivity.py on real MNIST
(--quick budgets): one JSON entry per run with consistent fields, resume skips finished runs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quality")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _argv(tmp: Path, data_root: Path) -> list[str]:
    return [
        "--quick",
        "--out-dir", str(tmp / "runs"),
        "--results-dir", str(tmp / "res"),
        "--docs-dir", str(tmp / "docs"),
        "--data-root", str(data_root),
    ]  # fmt: skip


def test_quality_quick(load_benchmark, tmp: Path, data_root: Path) -> None:
    q = load_benchmark("quality")
    argv = ["--dataset", "mnist", "--ratios", "60", "--methods", "admm", "scratch", "admm-svd"]
    doc = q.main([*argv, *_argv(tmp, data_root)])
    saved = json.loads((tmp / "res" / "quality-mnist.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(doc["runs"]))
    runs = {r["method"]: r for r in saved["runs"]}
    assert [r["method"] for r in saved["runs"]] == ["dense", "admm", "scratch", "admm-svd"]
    dense, admm, scratch, svd = (runs[m] for m in ("dense", "admm", "scratch", "admm-svd"))

    # LeNet-5 (Caffe): 20*1*25+20 + 50*20*25+50 + 800*500+500 + 500*10+10 parameters
    assert dense["params"] == 431_080 and dense["ratio"] == 1.0
    assert dense["top1"] > 0.5  # one epoch on 2000 images learns something
    for r in (admm, scratch):
        assert r["status"] == "ok" and 0.0 <= r["top1"] <= 1.0
        assert r["ratio"] == pytest.approx(431_080 / r["params"])
        assert abs(r["ratio"] / 60 - 1) < 0.03  # the planner's tolerance
        assert 0 < r["macs"] < r["dense_macs"]
        assert r["macs_reduction"] == pytest.approx(r["dense_macs"] / r["macs"])
        assert r["dense_top1"] == dense["top1"] and r["wall_seconds"] > 0
    # same architecture, same budget after the dense baseline
    assert admm["params"] == scratch["params"] and admm["layers"] == scratch["layers"]
    assert admm["epochs"]["after_dense"] == scratch["epochs"]["after_dense"] == 2
    assert scratch["epochs"]["total"] == dense["epochs"]["total"] + 2
    # ADMM starts from the dense weights (hard link or copy), scratch from noise
    a, d = Path(admm["run_dir"]) / "dense.pt", Path(dense["run_dir"]) / "dense.pt"
    assert a.read_bytes() == d.read_bytes()
    assert admm["admm_top1"] > 0.5 and scratch["decomposed_top1"] < 0.3
    # svd cannot reach 60x on LeNet-5 (every rank 1 gives 54.4x): recorded, not crashed
    assert svd["status"] == "unreachable" and "54.4" in svd["reason"] and svd["top1"] is None

    md = (tmp / "docs" / "quality-mnist.md").read_text()
    assert "python benchmarks/quality.py --dataset mnist --ratios 60" in md
    assert f"| 60x | TT from scratch | {100 * scratch['top1']:.2f} |" in md
    assert (tmp / "docs" / "quality-mnist.png").stat().st_size > 0

    # rerun: every run is skipped, results unchanged
    mtime = os.stat(Path(admm["run_dir"]) / "state.json").st_mtime_ns
    again = q.main([*argv, *_argv(tmp, data_root)])
    assert json.loads(json.dumps(again["runs"])) == saved["runs"]
    assert os.stat(Path(admm["run_dir"]) / "state.json").st_mtime_ns == mtime


def test_quality_budget_and_seeds(
    load_benchmark,
) -> None:
    q = load_benchmark("quality")
    base = q.load_config(q.DEFAULT_CONFIG)
    d, a, f = base.dense.epochs, base.admm.epochs, base.finetune.epochs
    budgets = {}
    for m in q.METHODS:
        cfg = q.load_config(q.DEFAULT_CONFIG, q.method_sets(m, base))
        budgets[m] = q.epochs_trained(m, cfg, base)["after_dense"]
        if m == "scratch":
            assert cfg.finetune.epochs == d + a + f and cfg.finetune.optim == base.dense.optim
    assert set(budgets.values()) == {a + f}
    args = q.parser().parse_args(
        ["--dataset", "mnist", "--ratios", "60", "10", "30", "--seeds", "0", "--middle-seeds", "1"]
    )
    runs = q.plan_runs(args)
    assert runs.count((1, None, "dense")) == 1
    assert {r for s, r, m in runs if s == 1 and m != "dense"} == {30}
    assert len(runs) == 2 + 3 * len(q.METHODS) + len(q.METHODS)
    args.middle_methods = ["admm", "dtf"]
    runs = q.plan_runs(args)
    assert [(r, m) for s, r, m in runs if s == 1] == [(None, "dense"), (30, "admm"), (30, "dtf")]
    assert len(runs) == 2 + 3 * len(q.METHODS) + 2
    with pytest.raises(SystemExit):
        q.parser().parse_args(["--dataset", "mnist", "--ratios", "0.5"])


def test_rho_sensitivity_quick(load_benchmark, tmp: Path, data_root: Path) -> None:
    rs = load_benchmark("rho_sensitivity")
    doc = rs.main(["--rhos", "1e-3", "2e-2", "--ratio", "60", *_argv(tmp, data_root)])
    saved = json.loads((tmp / "res" / "rho_sensitivity.json").read_text())
    assert [r["rho"] for r in saved["runs"]] == [1e-3, 2e-2]
    assert len(doc["runs"]) == 2
    for r in saved["runs"]:
        c = r["curves"]
        assert c["epoch"] == [1] and c["rho"] == [r["rho"]]  # rho held constant
        assert r["rho_growth"] == 1.0
        assert math.isfinite(c["train_loss"][0]) and c["train_loss"][0] > 0
        assert 0 < c["primal"][0] < 10 and 0 <= c["test_acc"][0] <= 1
        assert c["test_acc"][-1] == pytest.approx(r["admm_top1"])  # Z/U updates keep W
        assert 0 <= r["top1"] <= 1
        rows = [
            json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        ]
        admm_rows = [x for x in rows if x["phase"] == "admm"]
        assert admm_rows[-1]["admm/primal"] == c["primal"][0]
    assert (tmp / "docs" / "rho_sensitivity.png").stat().st_size > 0
    assert "| 0.02 |" in (tmp / "docs" / "rho_sensitivity.md").read_text()
