"""benchmarks/tuning_lenet.py (issue 19's campaign driver): the run list gives every method
the same tuning effort and budgets, its commands load and reach the right config keys, a
final waits for its method's tuning winner, the selection, and collection of a fake results
document into the tables and paired differences (oracles computed by hand). No real data:
run folders are faked."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from tdcompress.config import load_config


@pytest.fixture(scope="module")
def tl(load_benchmark):
    return load_benchmark("tuning_lenet")


def _cfg(tl, camp, r):
    """The config run ``r``'s command builds (parsed back from the command's words)."""
    words = camp.command(r)
    assert words[:3] == ["tdcompress", "train" if r["phase"] == "dense" else "pipeline", tl.CONFIG]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = load_config(tl.REPO / words[2], sets)
    cfg.runtime.out_dir = words[words.index("--out-dir") + 1]
    return cfg


def _fake_state(run: Path, done: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "state.json").write_text(json.dumps({"done": done}))


def _fake_tuned(run: Path, val: float, test: dict | None = None) -> None:
    ev = {
        "evaluated_on": "validation (5000 held out of the training set)",
        "finetuned_acc": val,
        "admm_acc": None,
        "decomposed_acc": 0.5,
        "compressed_params": 14_615,
        "dense_params": 431_080,
    }
    if test is not None:
        ev["test"] = test
    _fake_state(run, {"evaluate": ev})
    rows = [{"phase": "finetune", "epoch": 1, "test_acc": val, "seconds": 10.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))


def test_every_method_gets_k_configurations_and_the_same_budgets(tl):
    camp = tl.Campaign()
    assert camp.tuning_budget == 18 and camp.k == 4
    tune = camp.tuning_runs()
    for st in tl.SETTINGS:
        for m in tl.METHODS:
            names = [r["config"] for r in tune if (r["setting"], r["method"]) == (st, m)]
            assert names == [c.name for c in tl.GRIDS[m][:4]]
    assert all(len(g) == tl.K_MAX for g in tl.GRIDS.values())  # K can grow alike
    assert "A2" in [c.name for c in tl.GRIDS["admm"][:2]]  # the paper-like one is always tried
    # finals: 3 budgets x 3 seeds per setting and method, none resolved before its winner
    finals = camp.final_runs()
    assert len(finals) == 3 * 3 * 3 * 3 and all(r["config"] is None for r in finals)
    for r in finals:
        assert not camp.ready(r)
        with pytest.raises(ValueError, match="no winner yet"):
            camp.command(r)
    runs = camp.runs()
    assert [r["phase"] for r in runs][:6] == ["dense"] * 6  # dense first, then tuning
    assert len({r["out_dir"] for r in camp.runs("tuning")}) == len(camp.runs("tuning"))


def test_commands_parse_and_reach_the_right_keys(tl):
    camp = tl.Campaign(data_root="/data")
    for r in camp.dense_runs():
        cfg = _cfg(tl, camp, r)
        assert (cfg.data.dataset, cfg.seed, cfg.dense.epochs) == (r["dataset"], r["seed"], 6)
        assert cfg.data.validation == 5000 and not cfg.data.final_test
        assert cfg.dense.optim.lr == (0.02 if r["dataset"] == "fashion_mnist" else 0.05)
        assert cfg.runtime.out_dir == f"runs/tuning_lenet/dense/{r['dataset']}/s{r['seed']}"
    by_name = {c.name: c for g in tl.GRIDS.values() for c in g}
    for r in camp.tuning_runs():
        cfg = _cfg(tl, camp, r)
        b = r["budget"]
        assert cfg.data.validation == 5000 and not cfg.data.final_test and cfg.seed == 0
        assert cfg.compress.target_ratio == tl.SETTINGS[r["setting"]].ratio
        assert cfg.data.dataset == tl.SETTINGS[r["setting"]].dataset
        dense = f"runs/tuning_lenet/dense/{cfg.data.dataset}/s0/dense.pt"
        assert cfg.runtime.dense_checkpoint == dense
        assert (cfg.runtime.threads, cfg.runtime.progress, cfg.runtime.amp) == (1, False, "bf16")
        ep = tl.epochs_trained(r["method"], cfg, cfg)
        assert ep["after_dense"] == b  # the same budget after the dense model
        c = by_name[r["config"]]
        if r["method"] == "admm":
            a = round(c.split * b)
            assert (cfg.admm.epochs, cfg.finetune.epochs, cfg.compress.init) == (
                a,
                b - a,
                "decompose",
            )
            row = next(x for x in tl.ADMM_GRID if x[0] == c.name)
            assert (cfg.admm.optim.lr, cfg.finetune.optim.lr, cfg.admm.rho) == row[2:5]
            assert (cfg.admm.rho_max, cfg.admm.every_steps) == row[6:8]
            if row[5] != tl.OURS:
                assert cfg.admm.rho_growth == row[5]
        else:
            assert cfg.admm.epochs == 0
            init = "random" if r["method"] == "scratch" else "decompose"
            assert cfg.compress.init == init
            assert cfg.finetune.epochs == b + (6 if r["method"] == "scratch" else 0)
            row = next(x for x in tl.TRAINED_GRIDS[r["method"]] if x[0] == c.name)
            o = cfg.finetune.optim
            lr = row[2]
            if lr == tl.DENSE_LR:
                lr = 0.02 if cfg.data.dataset == "fashion_mnist" else 0.05
            assert (o.name, o.lr, o.weight_decay, o.schedule, o.warmup_epochs) == (
                row[1],
                lr,
                row[3],
                row[4],
                row[5],
            )
            assert o.momentum == 0.9
    # the paper-like candidate: Z/U once per epoch, constant small rho
    a2 = next(r for r in camp.tuning_runs() if r["config"] == "A2")
    cfg = _cfg(tl, camp, a2)
    assert cfg.admm.every_steps is None and cfg.admm.rho == cfg.admm.rho_max == 1e-3
    assert cfg.admm.rho_growth == 1.0


@pytest.mark.parametrize("budget", [6, 18, 54])
def test_our_rho_reaches_rho_max_at_three_quarters_of_the_updates(tl, budget):
    camp = tl.Campaign(budgets=(budget,))
    r = next(r for r in camp.tuning_runs() if r["config"] == "A4")
    cfg = _cfg(tl, camp, r)
    assert cfg.admm.epochs == budget // 2
    updates = cfg.admm.epochs * math.ceil(55_000 / 128) // 25
    rho_end = cfg.admm.rho * cfg.admm.rho_growth ** (0.75 * updates)
    assert rho_end == pytest.approx(cfg.admm.rho_max, rel=1e-3)  # (growth: 6 digits)
    assert "admm.rho_growth" in " ".join(camp.overrides(r))


def test_selection_takes_the_highest_validation_accuracy_ties_to_the_earlier(tl):
    assert tl.select([("A1", 90.0), ("A2", 91.5), ("A3", 91.0)]) == "A2"
    assert tl.select([("A1", 91.5), ("A2", 91.5), ("A3", 91.0)]) == "A1"
    assert tl.select([("A1", None), ("A2", 80.0), ("A3", 80.0)]) == "A2"  # diverged loses
    assert tl.select([("A1", None), ("A2", None)]) is None


def test_finals_wait_for_their_winner_then_run_it(tl, tmp_path):
    camp = tl.Campaign(settings=("mnist-30x",), root=str(tmp_path), data_root="/data")
    final = next(r for r in camp.final_runs() if r["method"] == "dtf" and r["budget"] == 6)
    assert not camp.ready(final)
    _fake_state(tmp_path / "dense/mnist/s0", {"train": {"test_acc": 0.99, "params": 431_080}})
    tune = [r for r in camp.tuning_runs() if r["method"] == "dtf"]
    for r, acc in zip(tune[:3], (0.97, 0.98, 0.975)):
        _fake_tuned(tmp_path / r["id"], acc)
    assert not camp.ready(final)  # D4 has no result yet
    # D4 diverged: its log says so; it is a result and loses
    camp.log_dir.mkdir(parents=True)
    log = camp.log_dir / (tune[3]["id"].replace("/", "_") + ".log")
    log.write_text("tdcompress: error: finetune epoch 1/18: the training loss is nan (diverged)\n")
    assert camp.result(tune[3])["status"] == "diverged"
    assert camp.ready(final) and final["config"] == "D2"
    assert final["out_dir"] == f"{tmp_path}/final/mnist-30x/dtf/D2/b6/s0"
    cfg = _cfg(tl, camp, final)
    assert cfg.data.final_test and cfg.finetune.optim.lr == 0.01 and cfg.finetune.epochs == 6
    assert "--reuse-from" not in camp.command(final)
    # the final of the tuning budget and seed takes the winner's tuning run
    mid = next(
        r for r in camp.final_runs() if (r["method"], r["budget"], r["seed"]) == ("dtf", 18, 0)
    )
    words = camp.command(mid)
    assert words[-2:] == ["--reuse-from", f"{tmp_path}/tune/mnist-30x/dtf/D2/b18"]
    # a final of a seed whose dense model is missing waits for it
    s1 = next(r for r in camp.final_runs() if (r["method"], r["seed"]) == ("dtf", 1))
    assert not camp.ready(s1)


def _final_record(setting, method, budget, seed, test, val=None, status="ok"):
    ds = "fashion_mnist" if setting.startswith("fashion") else "mnist"
    config = {"admm": "A1", "dtf": "D2", "scratch": "S1"}[method]
    return {
        "id": f"final/{setting}/{method}/{config}/b{budget}/s{seed}",
        "phase": "final",
        "dataset": ds,
        "setting": setting,
        "method": method,
        "config": config,
        "budget": budget,
        "seed": seed,
        "epochs": {"dense": 6, "admm": 4, "finetune": 2, "after_dense": 6, "total": 12},
        "status": status,
        "val_top1": test if val is None else val,
        "test_top1": test,
        "dense_test_top1": 99.0 + seed / 10,
        "wall_seconds": 100.0,
        "command": "tdcompress pipeline ...",
    }


def test_collect_builds_the_tables_and_paired_differences(tl, tmp_path):
    # recorded results only (their run folders are gone): tuning of one setting, finals
    tests = {
        "admm": (98.0, 98.5, 99.0),
        "dtf": (97.0, 98.0, 98.6),
        "scratch": (98.2, 98.1, 98.9),
    }
    runs = [
        {
            "id": f"tune/mnist-30x/{m}/{c.name}/b18",
            "phase": "tuning",
            "setting": "mnist-30x",
            "method": m,
            "config": c.name,
            "status": "ok",
            "val_top1": 90.0 + i,
            "wall_seconds": 50.0,
        }
        for m in tl.METHODS
        for i, c in enumerate(tl.GRIDS[m][:2])
    ]
    runs += [
        _final_record("mnist-30x", m, 6, s, v) for m, vs in tests.items() for s, v in enumerate(vs)
    ]
    runs.append({"id": "final/other/run", "phase": "final", "status": "ok"})  # outside: kept
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"runs": runs, "verdict": "hand-written"}))
    camp = tl.Campaign(
        settings=("mnist-30x",), budgets=(6, 18), seeds=(0, 1, 2), k=2, root=str(tmp_path)
    )
    page, fig = tmp_path / "p.md", tmp_path / "f.png"
    doc = tl.collect(camp, "CMD", res, page, fig)
    # the winners are the second rows (91 > 90), so the recorded A1/D2/S1 finals do not count
    assert doc["winners"] == {
        "mnist-30x/admm": "A2",
        "mnist-30x/dtf": "D2",
        "mnist-30x/scratch": "S2",
    }
    finals = doc["summary"]["finals"]
    assert list(finals) == ["mnist-30x/dtf/b6"]
    assert finals["mnist-30x/dtf/b6"]["mean"] == pytest.approx((97.0 + 98.0 + 98.6) / 3)
    saved = json.loads(res.read_text())
    assert saved["verdict"] == "hand-written" and {r["id"] for r in saved["runs"]} == {
        r["id"] for r in runs
    }

    # now with the recorded winners matching the finals: the full table and pairs
    for r in runs:
        if r["phase"] == "tuning":
            r["val_top1"] = 95.0 if r["config"] in ("A1", "D2", "S1") else 90.0
    res.write_text(json.dumps({"runs": runs}))
    doc = tl.collect(camp, "CMD", res, page, fig)
    finals = doc["summary"]["finals"]
    admm = finals["mnist-30x/admm/b6"]
    assert (admm["n"], admm["of"], admm["config"]) == (3, 3, "A1")
    assert admm["mean"] == pytest.approx(98.5) and admm["std"] == pytest.approx(0.5)
    pairs = doc["summary"]["paired"]
    # ADMM - dtf: 1.0, 0.5, 0.4 -> mean 0.6333, sd 0.3215; 3 wins; 0.6333 > 2 * 0.3215 / sqrt(3)
    p = pairs["mnist-30x/b6/admm-dtf"]
    assert p["mean"] == pytest.approx(1.9 / 3) and p["std"] == pytest.approx(0.32146, abs=1e-5)
    assert (p["wins"], p["ties"], p["losses"], p["beyond_noise"]) == (3, 0, 0, True)
    # ADMM - scratch: -0.2, 0.4, 0.1 -> mean 0.1, 2 wins, 1 loss: not beyond noise
    p = pairs["mnist-30x/b6/admm-scratch"]
    assert p["mean"] == pytest.approx(0.1) and p["std"] == pytest.approx(0.3)
    assert (p["wins"], p["ties"], p["losses"], p["beyond_noise"]) == (2, 0, 1, False)
    assert tl.admm_wins(pairs) == []
    assert doc["summary"]["dense"]["mnist"]["mean"] == pytest.approx(99.1)
    text = page.read_text()
    assert "| mnist-30x | 6 | ADMM -> TT | A1 | 98.50 ± 0.50 | 98.00, 98.50, 99.00 |" in text
    assert "| mnist-30x | 6 | TT-SVD + fine-tune | +0.63 ± 0.32 | 3 | 3 / 0 / 0 | yes |" in text
    assert "| mnist-30x | 18 | ADMM -> TT | - | not run |" in text
    assert "| mnist-30x | ADMM -> TT | A1 | 95.00 | 50 | **chosen** |" in text
    assert "nowhere" in text
    # wall time: 6 tuning runs of 50 s, in hours (it read 0.0 h when divided twice)
    assert doc["wall_hours"]["tuning"] == pytest.approx(round(300 / 3600, 2))
    assert "tuning 0.1 h" in text


def test_a_cell_where_admm_beats_both_is_named(tl):
    finals = {}
    for m, vs in {
        "admm": (99.0, 99.2, 99.1),
        "dtf": (98.0, 98.1, 98.3),
        "scratch": (98.5, 98.6, 98.4),
    }.items():
        finals[f"mnist-60x/{m}/b54"] = {
            "setting": "mnist-60x",
            "method": m,
            "budget": 54,
            "test": {str(s): v for s, v in enumerate(vs)},
        }
    assert tl.admm_wins(tl.paired(finals)) == ["mnist-60x at 54 epochs"]


def test_recorded_command_is_the_one_that_ran(tl, tmp_path):
    camp = tl.Campaign(settings=("mnist-30x",), root=str(tmp_path), data_root="/data")
    _fake_state(tmp_path / "dense/mnist/s0", {"train": {"test_acc": 0.99, "params": 431_080}})
    r = camp.tuning_runs()[0]
    _fake_tuned(tmp_path / r["id"], 0.98)
    got = camp.collect_run(r)
    assert got["val_top1"] == pytest.approx(98.0) and got["wall_seconds"] == 10.0
    assert shlex.split(got["command"]) == camp.command(r, data_root="DATA")  # (as the page)
    assert "/data" in camp.command(r)
    assert got["overrides"] == camp.overrides(r) and got["epochs"]["after_dense"] == 18


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--k", "1"], "--k must be an int in"),
        (["--budgets", "1"], "--budgets must be an int >= 2"),
        (["--run"], "--run and --smoke need --data-root"),
        (["--settings", "cifar-30x"], "invalid choice"),
        (["--smoke", "--data-root", "."], "--smoke needs its own --out-dir"),
    ],
)
def test_bad_arguments_name_the_option(tl, argv, msg, capsys):
    with pytest.raises(SystemExit):
        tl.main(argv)
    assert msg in capsys.readouterr().err


def test_a_diverged_final_is_left_out_of_the_mean_and_the_pairs_and_shown(tl):
    runs = [_final_record("mnist-60x", "admm", 54, s, v) for s, v in enumerate((97.0, 97.2, 96.9))]
    runs += [_final_record("mnist-60x", "scratch", 54, s, v) for s, v in ((0, 98.0), (1, 98.4))]
    runs.append(_final_record("mnist-60x", "scratch", 54, 2, None, status="diverged"))
    summ = tl.summarise(runs, (0, 1, 2))
    row = summ["finals"]["mnist-60x/scratch/b54"]
    assert (row["n"], row["of"], row["diverged"]) == (2, 3, [2])
    assert row["mean"] == pytest.approx(98.2)
    p = summ["paired"]["mnist-60x/b54/admm-scratch"]
    assert p["n"] == 2 and p["mean"] == pytest.approx(-1.1) and p["losses"] == 2
    only = tl.summarise([_final_record("mnist-60x", "dtf", 6, 0, None, status="diverged")], (0,))
    assert only["finals"]["mnist-60x/dtf/b6"]["mean"] is None
