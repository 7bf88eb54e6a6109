"""benchmarks/cifar100.py: collection of the keep folders into the table and the issue's
targets (fake keep folders; the real runs take days), and every config it lists loads with
the budget the comparison needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("cifar100")


def _rec(phase, epoch, acc, seconds=100.0):
    return {"phase": phase, "epoch": epoch, "test_acc": acc, "train_loss": 1.0, "seconds": seconds}


def _write(folder: Path, state: dict, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"done": state}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _dense(folder: Path, acc: float, epochs: int = 90) -> None:
    recs = [_rec("dense", e, 0.3 + e / 1000) for e in range(1, epochs + 1)]
    _write(folder, {"train": {"test_acc": acc, "params": 278_000}}, recs)


def _compressed(folder: Path, acc: float, admm: int, finetune: int, params: int) -> None:
    ev = {
        "finetuned_acc": acc,
        "compressed_params": params,
        "dense_params": 278_000,
        "macs_reduction": 1.9,
    }
    recs = [_rec("admm", e, 0.5) for e in range(1, admm + 1)]
    recs += [_rec("finetune", e, acc) for e in range(1, finetune + 1)]
    _write(
        folder, {"plan": {"ratio": 278_000 / params, "macs_reduction": 1.9}, "evaluate": ev}, recs
    )


def test_every_listed_config_loads_with_the_budget_of_the_comparison(bench):
    dense = bench.run_config(bench.DENSE)
    assert dense.dense.epochs == 90 and dense.data.dataset == "cifar100"
    for key, (_, method, _) in bench.RUNS.items():
        cfg = bench.run_config(key)
        assert Path(cfg.runtime.keep_dir).name == key  # each run keeps its state apart
        assert cfg.model.kwargs["num_classes"] == 100
        if key == bench.CONTROL:  # 90 more epochs from the 90-epoch dense model
            assert cfg.dense.epochs == 90
            assert Path(cfg.model.init_checkpoint).parent.name == bench.DENSE
        elif method != "dense":  # 90 epochs after the same dense model
            assert cfg.admm.epochs + cfg.finetune.epochs == 90
            assert Path(cfg.runtime.dense_checkpoint).parent.name == bench.DENSE
            assert (cfg.admm.epochs == 0) == (method == "dtf")


def test_collect_reports_the_targets_once_their_runs_have_finished(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "keep_dir", lambda cfg: tmp_path / Path(cfg.runtime.keep_dir).name)
    monkeypatch.setattr(bench, "REPO", tmp_path)
    _dense(tmp_path / "resnet20_dense", 0.640)
    _compressed(tmp_path / "resnet20_tt_5.6x", 0.628, 60, 30, 50_000)
    # ADMM 2.3x runs, the rest not started: only the 5.6x target can be decided
    _write(tmp_path / "resnet20_tt_2.3x", {"plan": {"ratio": 2.3, "macs_reduction": 1.5}},
           [_rec("admm", 1, 0.5), _rec("admm", 2, 0.52)])  # fmt: skip
    doc = bench.collect()
    rows = {r["key"]: r for r in doc["runs"]}
    assert rows["resnet20_tt_2.3x"]["status"] == "running"
    assert rows["resnet20_tt_5.6x"]["delta_vs_dense"] == pytest.approx(-0.012)
    t = doc["targets"]
    assert t["admm_5.6x_within_1pt"]["holds"] is False  # 1.2 points below
    assert t["admm_5.6x_within_1pt"]["points"] == pytest.approx(-1.2)
    assert t["admm_2.3x_above_control"] is None and t["control_explains"] is None
    md = bench.markdown(doc)
    assert "running (admm 2/60, finetune 0/30)" in md and "**does not hold** (-1.20 points)" in md
    # all finished: ADMM 2.3x gains 3 points over dense 90, the control 1 of them
    import shutil

    shutil.rmtree(tmp_path / "resnet20_tt_2.3x")
    _compressed(tmp_path / "resnet20_tt_2.3x", 0.670, 60, 30, 120_000)
    _compressed(tmp_path / "resnet20_tt_2.3x_dtf", 0.655, 0, 90, 120_000)
    _dense(tmp_path / "resnet20_dense_e180", 0.650)
    t = bench.collect()["targets"]
    assert t["admm_2.3x_above_control"] == {"holds": True, "points": pytest.approx(2.0)}
    assert t["admm_2.3x_above_dtf"] == {"holds": True, "points": pytest.approx(1.5)}
    c = t["control_explains"]
    assert c["admm_gain_points"] == pytest.approx(3.0)
    assert c["control_gain_points"] == pytest.approx(1.0)
    assert c["share"] == pytest.approx(1 / 3)
    out = tmp_path / "out"
    bench.write(bench.collect(), out, out)
    saved = json.loads((out / "quality-cifar100.json").read_text())
    assert saved["targets"]["admm_2.3x_above_dtf"]["holds"] is True
    assert (
        "| ResNet-20 TT-SVD + fine-tune 2.3x | done | 65.50 | +1.50 |"
        in (out / "cifar100.md").read_text()
    )
