"""benchmarks/cifar10.py: collection of finished and unfinished runs into the table (fake run
folders; the real runs take hours), and every config it lists loads and plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("cifar10")


def _write(run: Path, state: dict, records: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"done": state}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_dense(run: Path, acc: float) -> None:
    """A finished 30-epoch dense run with final test accuracy ``acc``."""
    _write(
        run,
        {"train": {"test_acc": acc, "params": 270_000}},
        [_rec("dense", e, 0.5 + e / 100) for e in range(1, 31)],
    )


def _rec(phase, epoch, acc, seconds=60.0):
    return {"phase": phase, "epoch": epoch, "test_acc": acc, "train_loss": 1.0, "seconds": seconds}


def test_collect_reports_done_and_running_runs(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "out_dir", lambda cfg: tmp_path / Path(cfg.runtime.out_dir).name)
    _write_dense(tmp_path / "resnet20_dense", 0.9)
    ev = {
        "finetuned_acc": 0.895,
        "compressed_params": 40_000,
        "dense_params": 272_000,
        "macs_reduction": 2.8,
    }
    # the ADMM run was killed in epoch 3 once: epoch 3 appears twice, the last record counts
    recs = [_rec("admm", 1, 0.8), _rec("admm", 2, 0.8), _rec("admm", 3, 0.1), _rec("admm", 3, 0.85)]
    recs += [_rec("admm", e, 0.85) for e in range(4, 21)]
    recs += [_rec("finetune", e, 0.89) for e in range(1, 11)]
    state = {"plan": {"ratio": 6.8, "macs_reduction": 2.8}, "evaluate": ev}
    _write(tmp_path / "resnet20_tt_6.8x", state, recs)
    _write(
        tmp_path / "resnet20_tt_4.5x",
        {"plan": {"ratio": 4.5, "macs_reduction": 1.9}},
        [_rec("admm", 1, 0.8), _rec("admm", 2, 0.81)],
    )
    _write_dense(tmp_path / "resnet20_dense_fp32", 0.903)
    doc = bench.collect()
    rows = {r["key"]: r for r in doc["runs"]}
    # the fp32 check is compared with the bf16 baseline; the baseline with nothing
    assert rows["resnet20_dense_fp32"]["delta_vs_dense"] == pytest.approx(0.003)
    assert "delta_vs_dense" not in rows["resnet20_dense"]
    done = rows["resnet20_tt_6.8x"]
    assert done["status"] == "done"
    assert done["ratio"] == pytest.approx(6.8)
    assert done["delta_vs_dense"] == pytest.approx(-0.005)
    assert len(done["curve"]) == 30 and done["curve"][2]["test_acc"] == 0.85
    assert done["wall_seconds"] == pytest.approx(30 * 60.0)
    assert done["epochs"] == {"admm": 20, "finetune": 10}
    running = rows["resnet20_tt_4.5x"]
    assert running["status"] == "running" and running["epochs_done"] == {"admm": 2, "finetune": 0}
    assert rows["resnet32_dense"]["status"] == "not started"
    md = bench.markdown(doc)
    assert "| ResNet-20 ADMM -> TT 6.8x | done | 89.50 | -0.50 | 91.03 | 40,000 | 6.80x" in md
    assert "running (admm 2/20, finetune 0/10)" in md


def test_every_listed_config_loads_with_the_stated_budget(bench):
    for key, (_, method, _) in bench.RUNS.items():
        cfg = bench.run_config(key)
        n = bench.budget(key)
        assert Path(cfg.runtime.out_dir).name == key
        if method == "dense":
            assert cfg.dense.epochs == n
            ref = bench.dense_run(key)  # the bf16 baseline a dense variant is compared with
            assert ref is None or bench.run_config(ref).dense.epochs == n
            continue
        dense = bench.dense_run(key)
        assert bench.run_config(dense).dense.epochs == n  # compared with the same budget
        assert cfg.model.name == bench.run_config(dense).model.name
        if method == "scratch":
            assert (cfg.compress.init, cfg.admm.epochs, cfg.finetune.epochs) == ("random", 0, 2 * n)
        else:
            assert cfg.admm.epochs + cfg.finetune.epochs == n


def test_train_step_benchmark_runs_every_mode_on_the_same_weights(tmp_path, load_benchmark):
    mod = load_benchmark("bench_train_step")
    import torch

    n = torch.get_num_threads()
    try:
        doc = mod.main(["--repeats", "1", "--models", "lenet5", "--out", str(tmp_path / "t.json")])
    finally:
        torch.set_num_threads(n)
    rows = doc["rows"]
    assert [(r["variant"].split()[0], r["mode"]) for r in rows] == [
        (v, m) for v in ("dense", "tt") for m in ("fp32", "fp32 NHWC", "bf16 NHWC")
    ]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert [r["speedup_vs_fp32"] for r in rows][::3] == [1.0, 1.0]
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == rows
    # the modes convert copies: the model they were built from keeps its memory format
    models = mod.make_models("lenet5")
    mod.step_fn(models["dense"], (1, 28, 28), False, True, 2)
    # conv2 (20 input channels): with one channel, conv1's NCHW and NHWC layouts coincide
    assert models["dense"].conv2.weight.is_contiguous()


class _FakeProc:
    """Finishes after ``steps`` polls with ``rc``."""

    def __init__(self, rc: int, steps: int, events: list, key: str) -> None:
        self.rc, self.steps, self.events, self.key = rc, steps, events, key

    def poll(self):
        self.steps -= 1
        if self.steps > 0:
            return None
        self.events.append(("end", self.key))
        return self.rc


def test_parallel_runs_wait_for_their_dense_model_and_skip_after_a_failure(bench, monkeypatch):
    assert bench.dependencies("resnet32_tt_5.8x") == (["resnet32_dense"], [])
    assert bench.dependencies("resnet20_dense") == ([], [])
    # from scratch: compared with the dense run, but not started from it, so it starts at once
    for key, dense in [
        ("resnet20_tt_6.8x_scratch", "resnet20_dense"),
        ("resnet20_tt_6.8x_scratch_e90", "resnet20_dense_e90"),
    ]:
        assert bench.dependencies(key) == ([], [dense]) and bench.dense_run(key) == dense
        # unless the command line makes it read the dense weights (here: an ADMM phase)
        assert bench.dependencies(key, ["admm.epochs=1"]) == ([dense], [])
    assert bench.dependencies("resnet20_tt_6.8x_dtf_e90") == (["resnet20_dense_e90"], [])
    events: list = []
    rcs = {"resnet32_dense": 1}  # the ResNet-32 baseline fails

    def launch(key, argv, log):
        events.append(("start", key))
        assert argv[0] == (
            "train" if key.endswith(("dense", "dense_fp32", "dense_e90")) else "pipeline"
        )
        assert (log is not None) and log.name == f"{key}.log"
        return _FakeProc(rcs.get(key, 0), 3, events, key)

    monkeypatch.setattr(bench, "_launch", launch)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    keys = ["resnet20_tt_6.8x", "resnet32_tt_5.8x", "resnet20_dense", "resnet32_dense"]
    with pytest.raises(
        SystemExit,
        match=r"resnet32_dense \(exit code 1\).*resnet32_tt_5\.8x "
        r"\(skipped: resnet32_dense failed\)",
    ):
        bench.run(keys, "data", [], jobs=2)
    started = [k for e, k in events if e == "start"]
    assert started == ["resnet20_dense", "resnet32_dense", "resnet20_tt_6.8x"]
    # the two dense runs ran side by side; the compressed run started after its dense run
    assert events.index(("start", "resnet32_dense")) < events.index(("end", "resnet20_dense"))
    assert events.index(("end", "resnet20_dense")) < events.index(("start", "resnet20_tt_6.8x"))
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        bench.run(keys, "data", [], jobs=0)
    # runs that do not wait for one another start in the given order, dense or not
    events.clear()
    keys = ["resnet20_tt_6.8x_eqratio", "resnet20_dense_e90", "resnet20_dense_fp32"]
    bench.run(keys, "data", [], jobs=2)
    assert [k for e, k in events if e == "start"] == keys
    events.clear()
    keys = ["resnet20_dense_e90", "resnet20_tt_6.8x_e90", "resnet20_tt_6.8x_scratch_e90"]
    bench.run(keys, "data", [], jobs=2)
    assert [k for e, k in events if e == "start"] == [keys[0], keys[2], keys[1]]
    # a from-scratch run that reaches its evaluate stage before its dense run has finished
    # stops there (exit code 1) and is rerun once it has
    events.clear()
    rcs = {"resnet20_tt_6.8x_scratch_e90": 1}

    def launch_scratch_fast(key, argv, log):
        events.append(("start", key))
        rc = rcs.pop(key, 0)  # fails the first time only
        return _FakeProc(rc, 2 if key.endswith("scratch_e90") else 6, events, key)

    monkeypatch.setattr(bench, "_launch", launch_scratch_fast)
    bench.run(["resnet20_dense_e90", "resnet20_tt_6.8x_scratch_e90"], "data", [], jobs=2)
    assert events == [
        ("start", "resnet20_dense_e90"),
        ("start", "resnet20_tt_6.8x_scratch_e90"),
        ("end", "resnet20_tt_6.8x_scratch_e90"),
        ("end", "resnet20_dense_e90"),
        ("start", "resnet20_tt_6.8x_scratch_e90"),
        ("end", "resnet20_tt_6.8x_scratch_e90"),
    ]


def test_a_reusing_run_starts_once_its_source_has_the_stage_it_lends(bench, monkeypatch, tmp_path):
    kd, src = "resnet20_tt_6.8x_kd_e90", "resnet20_tt_6.8x_e90"
    assert bench.REUSE[kd] == (src, "decompose")
    argv = bench._argv(kd, "data", [])
    assert argv[-2:] == ["--reuse-from", str(bench.out_dir(bench.run_config(src)))]
    # the real check reads the source's state.json
    monkeypatch.setattr(bench, "out_dir", lambda cfg: tmp_path / Path(cfg.runtime.out_dir).name)
    assert not bench.reuse_ready(kd) and bench.reuse_ready(src)
    (tmp_path / src).mkdir()
    (tmp_path / src / "state.json").write_text(json.dumps({"done": {"admm": {}}}))
    assert not bench.reuse_ready(kd)
    (tmp_path / src / "state.json").write_text(json.dumps({"done": {"decompose": {}}}))
    assert bench.reuse_ready(kd)
    # scheduling: the source "finishes decompose" 3 polls after it starts, and the reusing
    # run then starts beside it (jobs=2) instead of after it
    events: list = []
    polls = {"n": 0}

    def ready(key, sets=None):
        polls["n"] += ("start", src) in events
        return key != kd or polls["n"] > 3

    def launch(key, argv, log):
        events.append(("start", key))
        return _FakeProc(0, 8, events, key)

    monkeypatch.setattr(bench, "reuse_ready", ready)
    monkeypatch.setattr(bench, "_launch", launch)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    bench.run([src, kd], "data", [], jobs=2)
    assert events.index(("start", src)) < events.index(("start", kd)) < events.index(("end", src))
    # a source that never gets there: the run is reported, not waited for forever
    monkeypatch.setattr(bench, "reuse_ready", lambda key, sets=None: key != kd)
    with pytest.raises(SystemExit, match=r"kd_e90 \(not started: resnet20_tt_6\.8x_e90 has not"):
        bench.run([kd], "data", [], jobs=2)


def test_collect_keeps_recorded_rows_and_reports_reruns_beside_them(bench, tmp_path, monkeypatch):
    # run folders are scratch space: on a fresh checkout none exist, and rebuilding the page
    # must not turn finished results into "not started"; a rerun of a recorded config is
    # shown beside the recorded result, never in its place
    monkeypatch.setattr(bench, "out_dir", lambda cfg: tmp_path / Path(cfg.runtime.out_dir).name)
    rec_r32 = {
        "key": "resnet32_dense",
        "label": "ResNet-32 dense",
        "method": "dense",
        "status": "done",
        "top1": 0.91,
        "params": 464_154,
        "ratio": 1.0,
        "macs_reduction": 1.0,
        "paper_top1": 92.49,
        "epochs": {"dense": 30},
        "epochs_done": {"dense": 30},
        "wall_seconds": 600.0,
        "curve": [],
    }
    rec_dense = {**rec_r32, "key": "resnet20_dense", "label": "ResNet-20 dense", "top1": 0.91}
    rec_tt = {"key": "resnet20_tt_6.8x", "status": "done", "top1": 0.88, "delta_vs_dense": -0.03}
    rec_running = {"key": "resnet20_tt_4.5x", "status": "running", "epochs_done": {"admm": 3}}
    rec_gone = {"key": "no_longer_listed", "status": "done", "top1": 0.5}
    recorded = {
        "runs": [rec_dense, rec_tt, rec_running, rec_gone, {**rec_r32, "rerun": {"status": "x"}}]
    }
    # a finished rerun of the dense baseline, and a new run that started from it
    _write_dense(tmp_path / "resnet20_dense", 0.92)
    ev = {"finetuned_acc": 0.89, "compressed_params": 40_000, "dense_params": 270_000}
    _write(
        tmp_path / "resnet20_tt_6.8x_wd",
        {"plan": {"ratio": 6.8, "macs_reduction": 2.8}, "evaluate": {**ev, "macs_reduction": 2.8}},
        [_rec("finetune", e, 0.89) for e in range(1, 11)],
    )
    # an unfinished rerun
    _write(tmp_path / "resnet32_dense", {}, [_rec("dense", 1, 0.3)])
    doc = bench.collect(recorded)
    rows = {r["key"]: r for r in doc["runs"]}
    dense = rows["resnet20_dense"]
    assert dense["top1"] == 0.91 and dense["source"] == "recorded"
    assert dense["rerun"]["status"] == "done" and dense["rerun"]["top1"] == 0.92
    md = bench.markdown({**doc, "runs": [dense, rows["resnet32_dense"]]})
    assert "| ResNet-20 dense | done; rerun done 92.00 | 91.00 |" in md
    r32 = rows["resnet32_dense"]
    assert r32["top1"] == 0.91 and r32["rerun"]["status"] == "running (dense 1/30)"
    assert "| ResNet-32 dense | done; rerun running (dense 1/30) | 91.00 |" in md
    # a recorded row keeps its comparison with the dense model it started from; a new run
    # is compared with the dense model in the folders (the rerun)
    kept = rows["resnet20_tt_6.8x"]
    assert kept["top1"] == 0.88 and kept["source"] == "recorded"
    assert kept["delta_vs_dense"] == -0.03
    assert rows["resnet20_tt_6.8x_wd"]["delta_vs_dense"] == pytest.approx(0.89 - 0.92)
    # an unfinished recorded run is not kept: its epochs went with its folder
    assert rows["resnet20_tt_4.5x"]["status"] == "not started"
    assert "no_longer_listed" not in rows
    # without a record every absent run is "not started"
    assert bench.collect()["runs"][1]["status"] == "not started"


def test_collect_is_stable_and_fills_a_late_comparison(bench, tmp_path, monkeypatch):
    # collecting twice over unchanged folders gives the same table: a finished run that was
    # recorded by the first collect is not its own "rerun" in the second; and a row recorded
    # before its dense run finished gets its comparison once that run is recorded
    monkeypatch.setattr(bench, "out_dir", lambda cfg: tmp_path / Path(cfg.runtime.out_dir).name)
    _write_dense(tmp_path / "resnet20_dense_fp32", 0.905)
    _write(tmp_path / "resnet20_dense", {}, [_rec("dense", 1, 0.4)])  # still running
    first = bench.collect()
    fp32 = {r["key"]: r for r in first["runs"]}["resnet20_dense_fp32"]
    assert fp32["status"] == "done" and "delta_vs_dense" not in fp32
    (tmp_path / "resnet20_dense" / "state.json").write_text(
        json.dumps({"done": {"train": {"test_acc": 0.91, "params": 270_000}}})
    )
    second = bench.collect(json.loads(json.dumps(first)))
    third = bench.collect(json.loads(json.dumps(second)))
    for doc in (second, third):
        rows = {r["key"]: r for r in doc["runs"]}
        assert "rerun" not in rows["resnet20_dense_fp32"] and "rerun" not in rows["resnet20_dense"]
        assert rows["resnet20_dense_fp32"]["delta_vs_dense"] == pytest.approx(0.905 - 0.91)
    assert bench.markdown(second) == bench.markdown(third)
    # the folder gone, a row recorded without a comparison gets one from the recorded dense
    import shutil

    shutil.rmtree(tmp_path / "resnet20_dense_fp32")
    recorded = json.loads(json.dumps(first))
    for r in recorded["runs"]:
        if r["key"] == "resnet20_dense":
            r.update(status="done", top1=0.91)
    rows = {r["key"]: r for r in bench.collect(recorded)["runs"]}
    assert rows["resnet20_dense_fp32"]["source"] == "recorded"
    assert rows["resnet20_dense_fp32"]["delta_vs_dense"] == pytest.approx(0.905 - 0.91)
