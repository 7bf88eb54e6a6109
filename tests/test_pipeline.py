"""End to end: the pipeline on tiny synthetic data, resume after a kill, DDP, bad configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tdcompress.cli import main
from tdcompress.config import load_config
from tdcompress.pipeline import Pipeline
from tdcompress.surgery import decompose

CFG = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 256},
    "model": {"name": "mlp", "kwargs": {"hidden": [64, 64], "num_classes": 4}},
    "dense": {"epochs": 5, "optim": {"lr": 0.05}},
    "compress": {"format": "tt", "ranks": 16},
    "admm": {
        "epochs": 4,
        "rho": 1.0,
        "every_steps": 8,
        "rho_growth": 1.1,
        "optim": {"lr": 0.01, "weight_decay": 0.0},
    },
    "finetune": {"epochs": 2, "optim": {"lr": 0.005, "weight_decay": 0.0}},
    "runtime": {"device": "cpu", "progress": False, "threads": 1},
}


def is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def same(a, b) -> bool:
    """Equal state-dict entries: tensors bit for bit, the layers' records as dicts."""
    return torch.equal(a, b) if is_tensor(a) and is_tensor(b) else a == b


def write_cfg(path: Path, out: Path, **over) -> Path:
    cfg = json.loads(json.dumps(CFG))
    cfg["runtime"]["out_dir"] = str(out)
    for k, v in over.items():
        cfg[k].update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, env_extra=None, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "tdcompress", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_pipeline_end_to_end(tmp_path):
    cfg = load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "run"))
    done = Pipeline(cfg).run()
    assert list(done) == ["train", "plan", "admm", "decompose", "finetune", "evaluate", "report"]
    ev = done["evaluate"]
    assert ev["dense_acc"] > 0.5 and ev["finetuned_acc"] > 0.5
    assert ev["compressed_params"] < ev["dense_params"]
    assert ev["ratio"] == pytest.approx(ev["dense_params"] / ev["compressed_params"])
    assert done["admm"]["residuals"]["primal"] < 0.5  # moving toward Z, not diverging
    out = tmp_path / "run"
    assert (out / "report.md").read_text().startswith("# Compression report")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs].count("admm") == 4
    # rerunning skips finished stages and gives the same result
    assert Pipeline(cfg).run()["evaluate"] == ev


def test_resume_after_kill_gives_same_final_metrics(tmp_path):
    ref = run_cli("pipeline", str(write_cfg(tmp_path / "a.yaml", tmp_path / "a")))
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    slow = {"admm": {"epochs": 4}}
    cfg_b = write_cfg(tmp_path / "b.yaml", tmp_path / "b", **slow)
    p = run_cli("pipeline", str(cfg_b))
    ckpt = tmp_path / "b" / "admm.ckpt.pt"
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 600:
        time.sleep(0.01)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert killed, "the run finished before it could be killed"
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert "admm" not in state["done"]  # killed mid-stage
    p = run_cli("pipeline", str(cfg_b))
    assert p.wait(timeout=600) == 0, p.stdout.read()
    a = json.loads((tmp_path / "a" / "state.json").read_text())["done"]["evaluate"]
    b = json.loads((tmp_path / "b" / "state.json").read_text())["done"]["evaluate"]
    assert a == b
    wa = torch.load(tmp_path / "a" / "finetuned.pt")["model"]
    wb = torch.load(tmp_path / "b" / "finetuned.pt")["model"]
    assert wa.keys() == wb.keys() and all(same(wa[k], wb[k]) for k in wa)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``args`` under ``torch.distributed.run`` with two CPU processes (gloo), on a free
    port (a fixed one can meet another job's rendezvous). On a timeout torchrun is told to
    stop its workers (SIGTERM, then SIGKILL) and the output so far is in the error."""
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # files, not pipes: a worker left alive would hold a pipe open and block the read
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [*cmd, "--master-port", str(port), *args],
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()  # torchrun passes it on to its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if timed_out:
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{text}\n{errors}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, errors)


def test_two_process_gloo_run(tmp_path):
    # with runtime.keep_dir (rank 0 mirrors the run folder; no collective of its own)
    kept = tmp_path / "kept"
    cfg = write_cfg(tmp_path / "c.yaml", tmp_path / "ddp", runtime={"keep_dir": str(kept)})
    p = torchrun("-m", "tdcompress", "pipeline", str(cfg))
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(f.name for f in kept.iterdir()) == [
        "config.json",
        "finetuned.pt",
        "metrics.jsonl",
        "plan.yaml",
        "state.json",
    ]
    done = json.loads((tmp_path / "ddp" / "state.json").read_text())["done"]
    # each rank trained on half of every epoch (batch 32 per rank): above chance (0.25),
    # with evaluation all-reduced over both ranks' shares of the test set
    assert done["train"]["test_acc"] > 0.4
    assert done["evaluate"]["finetuned_acc"] > 0.35
    assert done["evaluate"]["compressed_params"] < done["evaluate"]["dense_params"]


def test_main_says_gives_every_rank_rank_0s_answer_and_cleanup_ends_the_group(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(
        "import json, os, sys\n"
        "import torch.distributed as dist\n"
        "from tdcompress.train.distributed import cleanup, init_distributed, main_says, rank\n"
        "r = int(os.environ['RANK'])\n"
        "init_distributed()\n"
        "assert rank() == r\n"
        "out = [main_says(r == 0), main_says(r == 1), main_says(True), main_says(False)]\n"
        "open(sys.argv[1] + f'.{r}', 'w').write(json.dumps(out))\n"
        "cleanup()\n"
        "cleanup()  # a no-op the second time\n"
        "open(sys.argv[1] + f'.{r}.exit', 'w').write(str(dist.is_initialized()))\n"
    )
    p = torchrun(str(script), str(tmp_path / "out"))
    assert p.returncode == 0, p.stdout + p.stderr
    for r in (0, 1):  # each rank asked with its own view; both get rank 0's
        assert json.loads((tmp_path / f"out.{r}").read_text()) == [True, False, True, False]
        # cleanup destroyed the process group (a live gloo group can abort the exit)
        assert (tmp_path / f"out.{r}.exit").read_text() == "False"


def test_a_rank_behind_rank_0_runs_the_stage_rank_0_just_finished(tmp_path):
    """Rank 0 records a stage as done before a slower rank has started it: the slower rank
    must still run it (skipping it, it met rank 0 in another collective and hung)."""
    cfg = write_cfg(tmp_path / "c.yaml", tmp_path / "run", dense={"epochs": 1}, admm={"epochs": 1})
    script = tmp_path / "behind.py"
    script.write_text(
        "import sys, time\n"
        "from tdcompress.config import load_config\n"
        "from tdcompress.pipeline import Pipeline\n"
        "from tdcompress.train.distributed import cleanup, rank\n"
        "done = Pipeline.done\n"
        "def slow(self, stage):\n"
        "    if rank() == 1 and stage == 'plan':\n"
        "        time.sleep(3)  # rank 0 finishes the plan stage meanwhile\n"
        "    return done(self, stage)\n"
        "Pipeline.done = slow\n"
        "p = Pipeline(load_config(sys.argv[1]))\n"
        "p.run(('train', 'plan', 'admm'))\n"
        "r = rank()\n"
        "cleanup()\n"
        "open(sys.argv[2] + f'.{r}', 'w').write('ok')\n"
    )
    p = torchrun(str(script), str(cfg), str(tmp_path / "out"), timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert all((tmp_path / f"out.{r}").read_text() == "ok" for r in (0, 1))


def test_the_cli_ends_a_successful_command_with_cleanup(tmp_path, monkeypatch):
    import tdcompress.train.distributed as dist_mod

    calls = []
    monkeypatch.setattr(dist_mod, "cleanup", lambda: calls.append("cleanup"))
    cfg = write_cfg(tmp_path / "c.yaml", tmp_path / "run")
    assert main(["plan", str(cfg)]) == 0 and calls == ["cleanup"]
    # after an error no barrier: a rank stuck in a collective would never reach it
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2 and calls == ["cleanup"]


def test_unknown_config_keys_are_rejected_with_the_valid_ones(tmp_path, capsys):
    bad = write_cfg(tmp_path / "c.yaml", tmp_path / "x", admm={"rhoo": 1.0})
    with pytest.raises(ValueError, match=r"unknown config keys \['rhoo'\] in admm; valid keys"):
        load_config(bad)
    assert main(["plan", str(bad)]) == 2
    assert "valid keys are" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be an int"):
        load_config(None, ["dense.epochs=1.5"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_numbers_in_exponent_notation_are_numbers_and_strings_are_refused():
    # YAML 1.1 reads 5e-3 (no dot) as a string: it reached the optimizer and failed there
    cfg = load_config(None, ["finetune.optim.lr=5e-3", "admm.rho=1e-5", "admm.rho_max=1e9"])
    assert (cfg.finetune.optim.lr, cfg.admm.rho, cfg.admm.rho_max) == (0.005, 1e-5, 1e9)
    assert load_config(None, ["compress.target_ratio=6e0"]).compress.target_ratio == 6.0
    for bad, msg in [
        ("compress.target_ratio=abc", "compress.target_ratio must be a number, got 'abc'"),
        ("runtime.threads=two", "runtime.threads must be an int, got 'two'"),
        ("admm.optim.milestones=[0.5, x]", r"admm\.optim\.milestones\[1\] must be a number"),
    ]:
        with pytest.raises(ValueError, match=msg):
            load_config(None, [bad])


@pytest.mark.parametrize(
    "sets,msg",
    [
        (["finetune.optim.schedule=cosin"], r"finetune\.optim\.schedule must be one of"),
        (["data.dataset=ucf11"], r"data\.dataset must be one of \[.*'cifar10'.*got 'ucf11'"),
        (["admm.optim.name=sgdd"], r"admm\.optim\.name must be one of \['sgd', 'adam', 'adamw'\]"),
        (["compress.format=ttt"], r"compress\.format must be one of \[.*'tt'"),
        (["compress.ranks=4", "compress.target_ratio=3"], "at most one of ranks, target_ratio"),
        (["compress.target_ratio=0.5"], r"compress\.target_ratio must be a number > 1"),
        (["admm.epochs=-3"], r"admm\.epochs must be an int >= 0, got -3"),
        (["data.train_subset=-100"], r"data\.train_subset must be null or an int >= 1"),
        (["dense.optim.warmup_epochs=-2"], r"dense\.optim\.warmup_epochs must be an int >= 0"),
        (["admm.rho=1.0", "admm.rho_max=0.01"], r"admm\.rho_max must be >= admm\.rho \(1\)"),
        (["admm.rho=0"], r"admm\.rho must be > 0"),
        (["admm.every_steps=0"], r"admm\.every_steps must be null \(once per epoch\) or"),
        (["dense.optim.milestones=[100, 150]"], r"milestones must be fractions .* in \(0, 1\]"),
        (["admm.mode=hook", "runtime.amp=fp16"], r"admm\.mode must be 'penalty' with runtime"),
        (["finetune.optim.momentum=1.5"], r"finetune\.optim\.momentum must be in \[0, 1\)"),
        (["runtime.execution=dense"], r"runtime\.execution must be one of \['factorized', 're"),
    ],
)
def test_settings_a_stage_would_refuse_hours_later_are_refused_at_load(sets, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, sets)


def test_cli_paths_are_taken_verbatim_not_as_yaml(tmp_path, monkeypatch):
    # as --set values "run #2" read as "run" (a YAML comment): another run's folder
    seen = {}

    class Stop(Exception):
        pass

    def fake_pipeline(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr("tdcompress.pipeline.Pipeline", fake_pipeline)
    cfg_path = write_cfg(tmp_path / "c.yaml", tmp_path / "x")
    for out, root in [(str(tmp_path / "run #2"), "/data/set #1"), ("2026-11-29", "null")]:
        with pytest.raises(Stop):
            main(["pipeline", str(cfg_path), "--out-dir", out, "--data-root", root])
        assert (seen["cfg"].runtime.out_dir, seen["cfg"].data.root) == (out, root)


def test_building_a_runs_model_needs_no_data_files(tmp_path):
    # export builds the model from its checkpoint: the shapes come from the dataset's
    # description, not from loading (it failed without the data root)
    cfg = load_config(
        write_cfg(tmp_path / "c.yaml", tmp_path / "x"),
        ["data.dataset=mnist", f"data.root={tmp_path}", "model.name=lenet5", "model.kwargs={}"],
    )
    pipe = Pipeline(cfg)
    assert pipe.input_shape() == (1, 1, 28, 28)
    assert pipe.dense_model()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert pipe._data is None


def test_missing_data_files_name_the_file(tmp_path):
    cfg = load_config(
        write_cfg(tmp_path / "c.yaml", tmp_path / "x"),
        ["data.dataset=mnist", f"data.root={tmp_path}"],
    )
    with pytest.raises(FileNotFoundError, match="mnist/train-images-idx3-ubyte.gz: file not found"):
        Pipeline(cfg).run(("train",))


def test_diverged_training_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    cfg = load_config(
        write_cfg(tmp_path / "c.yaml", tmp_path / "run", dense={"epochs": 3, "optim": {"lr": 1e6}})
    )
    with pytest.raises(FloatingPointError, match=r"dense epoch 1/3.*dense\.optim\.lr"):
        Pipeline(cfg).run(("train",))
    assert not (tmp_path / "run" / "dense.ckpt.pt").exists()  # nothing non-finite saved


def test_final_test_measures_the_test_set_once_after_a_validation_run(tmp_path):
    """data.final_test: with data.validation the stages and their accuracies stay on the
    held-out split; the evaluate record adds the test accuracy of the dense and fine-tuned
    models (an oracle: the same models on the test loader), and the key may be switched on
    for a finished run folder (no training reruns)."""
    from tdcompress.config import DataConfig
    from tdcompress.data import make_loaders
    from tdcompress.train.loop import evaluate

    path = write_cfg(tmp_path / "c.yaml", tmp_path / "run", data={"validation": 100})
    done = Pipeline(load_config(path)).run()
    ev = done["evaluate"]
    assert ev["evaluated_on"].startswith("validation (100") and "test" not in ev
    mtime = (tmp_path / "run" / "finetuned.pt").stat().st_mtime_ns
    p = Pipeline(load_config(path, ["data.final_test=true"]))  # (not refused: a free key)
    again = p.run()["evaluate"]
    assert (tmp_path / "run" / "finetuned.pt").stat().st_mtime_ns == mtime  # nothing retrained
    assert {k: v for k, v in again.items() if k != "test"} == ev  # validation numbers kept
    cpu = torch.device("cpu")
    test = make_loaders(DataConfig(**{**CFG["data"], "validation": 0}), device=cpu)[1]
    held = p.data()[1]
    assert len(test.images) != len(held.images)  # two different splits
    dense = p._dense_from("dense.pt")
    tuned = p.compressed_model("finetuned.pt")
    assert again["test"] == {
        "dense_acc": evaluate(dense, test, device=cpu)["acc"],
        "finetuned_acc": evaluate(tuned, test, device=cpu)["acc"],
    }
    assert again["finetuned_acc"] == evaluate(tuned, held, device=cpu)["acc"]
    assert "test set: TT accuracy after fine-tuning" in (tmp_path / "run" / "report.md").read_text()


def test_random_init_trains_the_factorized_architecture_from_scratch(tmp_path):
    over = {"init": "random", "format": "tt", "ranks": 16}
    cfg = load_config(
        write_cfg(tmp_path / "c.yaml", tmp_path / "run", compress=over, admm={"epochs": 0})
    )
    p = Pipeline(cfg)
    p.run(("train", "plan", "admm", "decompose"))
    assert p.state()["done"]["decompose"]["source"].startswith("random init")
    scratch = torch.load(tmp_path / "run" / "decomposed.pt")["model"]
    trained = p.dense_model()
    trained.load_state_dict(torch.load(tmp_path / "run" / "dense.pt")["model"])
    from_dense = decompose(trained, p.load_plan())[0].state_dict()
    # the same architecture, and not one tensor taken from the trained dense model
    assert scratch.keys() == from_dense.keys()
    assert not [k for k in scratch if is_tensor(scratch[k]) and same(scratch[k], from_dense[k])]
    with pytest.raises(ValueError, match=r"compress\.init must be one of"):
        load_config(None, ["compress.init=zeros"])


def test_runtime_execution_rebuilt_fine_tunes_the_same_model(tmp_path):
    """runtime.execution: rebuilt runs the factorized layers through their rebuilt kernels
    in fine-tuning and evaluation: the same function, so (one step, float64 sums aside)
    the same fine-tuned weights as the factorized run."""
    from tdcompress.layers import ANY_SHAPE, execution_modes

    over = {"format": "tt", "ranks": 4}
    runs = {}
    for mode in ("factorized", "rebuilt"):
        cfg = load_config(
            write_cfg(
                tmp_path / f"{mode}.yaml",
                tmp_path / mode,
                compress=over,
                admm={"epochs": 0},
                finetune={"epochs": 1},
                runtime={"execution": mode},
            )
        )
        p = Pipeline(cfg)
        p.run(("train", "plan", "admm", "decompose", "finetune"))
        modes = execution_modes(p.compressed_model())
        assert modes and all(
            m == ({ANY_SHAPE: "rebuilt"} if mode == "rebuilt" else {}) for m in modes.values()
        )
        runs[mode] = torch.load(tmp_path / mode / "finetuned.pt")["model"]
    a, b = runs["factorized"], runs["rebuilt"]
    assert a.keys() == b.keys()
    for k in a:
        if is_tensor(a[k]) and a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_model_init_checkpoint_warm_starts_the_dense_phase(tmp_path):
    """model.init_checkpoint: the dense phase starts from those weights (at a vanishing
    learning rate it ends where it started); a missing file names the setting."""
    first = Pipeline(load_config(write_cfg(tmp_path / "a.yaml", tmp_path / "a")))
    first.run(("train",))
    src = tmp_path / "a" / "dense.pt"
    dense = {"epochs": 1, "optim": {"lr": 1e-12, "weight_decay": 0.0}}
    for name, init in (("warm", str(src)), ("cold", None)):
        cfg = load_config(
            write_cfg(tmp_path / f"{name}.yaml", tmp_path / name, dense=dense),
            [f"model.init_checkpoint={init}" if init else "model.init_checkpoint=null"],
        )
        Pipeline(cfg).run(("train",))
    a = torch.load(src)["model"]
    warm = torch.load(tmp_path / "warm" / "dense.pt")["model"]
    cold = torch.load(tmp_path / "cold" / "dense.pt")["model"]
    floats = [k for k in a if is_tensor(a[k]) and a[k].is_floating_point() and "running" not in k]
    assert all(torch.allclose(warm[k], a[k], atol=1e-6) for k in floats)
    assert not all(torch.allclose(cold[k], a[k], atol=1e-3) for k in floats)
    cfg = load_config(
        write_cfg(tmp_path / "m.yaml", tmp_path / "m"),
        [f"model.init_checkpoint={tmp_path / 'none.pt'}"],
    )
    with pytest.raises(FileNotFoundError, match=r"model\.init_checkpoint .*none\.pt.* does not"):
        Pipeline(cfg).run(("train",))


def test_missing_dense_checkpoint_names_the_option(tmp_path):
    cfg = load_config(
        write_cfg(tmp_path / "c.yaml", tmp_path / "run"),
        [f"runtime.dense_checkpoint={tmp_path / 'nope.pt'}"],
    )
    with pytest.raises(FileNotFoundError, match=r"runtime\.dense_checkpoint .*nope\.pt"):
        Pipeline(cfg).run(("train",))


def test_from_scratch_run_waits_for_its_dense_checkpoint_only_at_evaluate(tmp_path):
    dense_ckpt = tmp_path / "dense_run" / "dense.pt"
    fast = {"admm": {"epochs": 0}, "finetune": {"epochs": 1}}
    scratch = {"init": "random", "format": "tt", "ranks": 16}
    sets = [f"runtime.dense_checkpoint={dense_ckpt}"]
    cfg = load_config(
        write_cfg(tmp_path / "s.yaml", tmp_path / "s", compress=scratch, **fast), sets
    )
    Pipeline(cfg).run(("train", "plan", "admm", "decompose"))
    # before evaluate, the run folder has no dense model: exporting it or turning on
    # distillation from it (a setting of a stage not yet started) is refused, saying why
    with pytest.raises(FileNotFoundError, match=r"deferred the dense model .*dense\.pt"):
        Pipeline(cfg).export(weights="dense", format="pt2")
    distill = load_config(tmp_path / "s.yaml", [*sets, "finetune.distill_weight=0.5"])
    with pytest.raises(FileNotFoundError, match=r"deferred its dense model .*--force"):
        Pipeline(distill).run()
    # trained without the dense model, which is still missing: evaluate refuses, naming it
    with pytest.raises(
        FileNotFoundError, match=r"dense_checkpoint .*dense\.pt.* does not exist yet"
    ):
        Pipeline(cfg).run()
    done = Pipeline(cfg).state()["done"]
    assert list(done) == ["train", "plan", "admm", "decompose", "finetune"]
    assert done["train"]["deferred"] == str(dense_ckpt)
    finetuned = torch.load(tmp_path / "s" / "finetuned.pt")["model"]
    # the dense run finishes; the rerun keeps every trained stage and reads its accuracy
    dense = Pipeline(load_config(write_cfg(tmp_path / "d.yaml", tmp_path / "dense_run")))
    dense_acc = dense.run(("train",))["train"]["test_acc"]
    ev = Pipeline(cfg).run()["evaluate"]
    assert ev["dense_acc"] == dense_acc > 0.5
    after = torch.load(tmp_path / "s" / "finetuned.pt")["model"]
    assert all(same(finetuned[k], after[k]) for k in finetuned)
    # a run that does start from the dense weights (ADMM, decompose, distillation) still
    # stops at train
    for i, over in enumerate(
        ["admm.epochs=1", "compress.init=decompose", "finetune.distill_weight=0.5"]
    ):
        bad = load_config(
            write_cfg(tmp_path / "b.yaml", tmp_path / f"b{i}", compress=scratch, **fast),
            [f"runtime.dense_checkpoint={tmp_path / 'nope.pt'}", over],
        )
        with pytest.raises(FileNotFoundError, match=r"runtime\.dense_checkpoint .*nope\.pt"):
            Pipeline(bad).run(("train",))


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path):
    import fcntl

    cfg = load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "run"))
    p = Pipeline(cfg)
    with open(tmp_path / "run" / "run.lock", "a+") as f:  # another holder of the folder
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242")
        f.flush()
        with pytest.raises(RuntimeError, match=r"runtime\.out_dir .* in use .*pid 4242"):
            p.run(("train",))
    assert not (tmp_path / "run" / "dense.pt").exists()
    p.run(("train",))  # free again
    assert (tmp_path / "run" / "dense.pt").exists()


def test_a_refused_process_leaves_the_runs_config_json_alone(tmp_path):
    # B (other admm.rho) is refused by A's lock; before, B had already written its settings
    # into A's config.json, so A's own resume was then refused and B's accepted
    import fcntl

    path = write_cfg(tmp_path / "c.yaml", tmp_path / "run")
    a = Pipeline(load_config(path))
    a.run(("train",))
    saved = (tmp_path / "run" / "config.json").read_text()
    with open(tmp_path / "run" / "run.lock", "a+") as f:  # A is still running
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        b = Pipeline(load_config(path, ["admm.rho=5.0"]))  # ADMM not started: accepted here
        with pytest.raises(RuntimeError, match="in use by another process"):
            b.run()
        assert (tmp_path / "run" / "config.json").read_text() == saved
    Pipeline(load_config(path)).run(("plan", "admm"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["admm"]["rho"] == 1.0
    with pytest.raises(ValueError, match=r"admm\.rho: was 1\.0, now 5\.0"):
        Pipeline(load_config(path, ["admm.rho=5.0"]))


def test_read_metrics_per_epoch_keeps_the_last_record_of_a_relogged_epoch(tmp_path):
    from tdcompress.train.loop import read_metrics

    recs = [
        {"phase": "admm", "epoch": 1, "v": 1},
        {"phase": "admm", "epoch": 2, "v": 2},
        {"phase": "admm", "epoch": 2, "v": 3},  # logged again after a resume
        {"phase": "finetune", "epoch": 1, "v": 4},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    assert read_metrics(path) == recs
    assert [r["v"] for r in read_metrics(path, per_epoch=True)] == [1, 3, 4]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_resuming_with_changed_settings_of_a_started_stage_is_refused(tmp_path):
    fast = {"dense": {"epochs": 1}, "admm": {"epochs": 1}}
    cfg = load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "run", **fast))
    Pipeline(cfg).run(("train", "plan", "admm"))
    # where the data lives, threads, and stages not yet started may change
    same = load_config(
        write_cfg(tmp_path / "c.yaml", tmp_path / "run", **fast),
        [f"data.root={tmp_path}", "runtime.threads=2", "finetune.epochs=5"],
    )
    Pipeline(same).run(("plan",))  # (done: skipped; the run records its settings)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["finetune"]["epochs"] == 5
    for change, key in [
        ("admm.optim.lr=0.5", r"admm\.optim\.lr: was 0\.01, now 0\.5"),
        ("data.batch_size=8", r"data\.batch_size: was 32, now 8"),
        ("compress.ranks=4", r"compress\.ranks: was 16, now 4"),
        ("runtime.amp=bf16", r"runtime\.amp: was None, now 'bf16'"),
    ]:
        bad = load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "run", **fast), [change])
        with pytest.raises(ValueError, match=r"runtime\.out_dir .*run.*train, plan, admm.*" + key):
            Pipeline(bad)
    # a finished stage is skipped on rerun, so changing it would silently do nothing: refused
    with pytest.raises(ValueError, match=r"dense\.epochs: was 1, now 9"):
        Pipeline(
            load_config(
                write_cfg(tmp_path / "c.yaml", tmp_path / "run", **fast), ["dense.epochs=9"]
            )
        )


def test_a_setting_missing_from_an_older_run_folder_counts_as_its_default(tmp_path):
    fast = {"dense": {"epochs": 1}, "admm": {"epochs": 1}}
    cfg = load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "run", **fast))
    Pipeline(cfg).run(("train", "plan", "admm"))
    # a folder written before admm.distill_weight existed (and with model.kwargs set, a
    # section whose default is empty)
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    del old["admm"]["distill_weight"]
    assert old["model"]["kwargs"]
    path.write_text(json.dumps(old))
    Pipeline(cfg)  # same settings: resumes
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"admm\.distill_weight: was 0\.0, now 0\.5"):
        Pipeline(
            load_config(
                write_cfg(tmp_path / "c.yaml", tmp_path / "run", **fast),
                ["admm.distill_weight=0.5"],
            )
        )


def test_compress_allocation_reaches_the_plan(tmp_path):
    from tdcompress.planning import plan

    comp = {"ranks": None, "target_ratio": 4.0, "allocation": "equal_ratio"}
    mlp = {"kwargs": {"hidden": [256, 64, 16], "num_classes": 4}}  # layers of unlike sizes
    path = write_cfg(
        tmp_path / "c.yaml", tmp_path / "run", dense={"epochs": 1}, compress=comp, model=mlp
    )
    p = Pipeline(load_config(path))
    p.run(("train", "plan"))
    got = [lp.spec.ranks for lp in p.load_plan()]
    model = p.dense_model()
    want = {
        a: [lp.spec.ranks for lp in plan(model, "tt", target_ratio=4.0, allocation=a)]
        for a in ("equal_ratio", "equal_rank")
    }
    assert got == want["equal_ratio"] != want["equal_rank"]
    with pytest.raises(ValueError, match=r"compress\.allocation must be one of .*got 'even'"):
        load_config(None, ["compress.allocation=even"])


def test_command_block_is_a_markdown_code_block_holding_the_command_verbatim():
    from tdcompress.report import command_block

    cmd = "python benchmarks/cifar10.py --run a b --data-root ../shared/data  # *not* markdown"
    lines = command_block(cmd, intro="Reproduce:")
    assert lines == ["Reproduce:", "", "```", cmd, "```", ""]
    assert command_block("x")[0] == "Command (from the repository root):"


def test_reuse_stages_takes_the_matching_prefix_of_another_run(tmp_path, capsys):
    a = load_config(write_cfg(tmp_path / "a.yaml", tmp_path / "a"))
    Pipeline(a).run(("train", "plan", "admm", "decompose", "finetune"))
    src = tmp_path / "a"
    # another fine-tuning of the same ADMM phase: everything up to decompose is taken
    b_yaml = write_cfg(tmp_path / "b.yaml", tmp_path / "b", finetune={"optim": {"lr": 0.02}})
    b = Pipeline(load_config(b_yaml))
    assert b.reuse_stages(src) == ["train", "plan", "admm", "decompose"]
    for name in ("dense.pt", "plan.yaml", "admm.pt", "decomposed.pt"):
        assert (tmp_path / "b" / name).read_bytes() == (src / name).read_bytes()
    assert not (tmp_path / "b" / "finetuned.pt").exists()
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    src_rows = [json.loads(x) for x in (src / "metrics.jsonl").read_text().splitlines()]
    assert rows == [r for r in src_rows if r["phase"] in ("dense", "admm")]
    state = b.state()["done"]
    assert state["admm"]["reused_from"] == str(src.resolve())
    assert (
        state["admm"]["test_acc"]
        == json.loads((src / "state.json").read_text())["done"]["admm"]["test_acc"]
    )
    assert b.reuse_stages(src) == []  # taken already: a rerun of the command does nothing
    # the CLI continues from there: only fine-tuning (and evaluation) run
    assert main(["pipeline", str(b_yaml), "--reuse-from", str(src)]) == 0
    out = capsys.readouterr().out
    assert "[train] already done" in out and "[admm] already done" in out
    assert "[finetune] epoch 2/2" in out
    fine_b = torch.load(tmp_path / "b" / "finetuned.pt")["model"]
    fine_a = torch.load(src / "finetuned.pt")["model"]
    assert any(not same(v, fine_a[k]) for k, v in fine_b.items())  # another lr
    # other ADMM settings: only train and plan are taken; the ADMM phase is run anew
    c = Pipeline(load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "c", admm={"rho": 0.5})))
    assert c.reuse_stages(src) == ["train", "plan"]
    assert not (tmp_path / "c" / "admm.pt").exists()
    # a folder with stages of its own, or a source that is not a run folder: refused
    with pytest.raises(ValueError, match=r"already holds started stages \(train, plan"):
        Pipeline(load_config(write_cfg(tmp_path / "d.yaml", src))).reuse_stages(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"reuse source .*nowhere.* is not a run folder"):
        c.reuse_stages(tmp_path / "nowhere")
    assert main(["pipeline", str(b_yaml), "--reuse-from", str(tmp_path / "nowhere")]) == 2


def test_reuse_stages_is_rerunnable_and_copies_only_complete_stages(tmp_path, monkeypatch):
    # (reuse_stages writes state.json in the run folder's module)
    import tdcompress.pipeline.runfolder as runfolder_mod

    a = load_config(write_cfg(tmp_path / "a.yaml", tmp_path / "a"))
    Pipeline(a).run(("train", "plan", "admm", "decompose"))
    src = tmp_path / "a"
    # nothing matches (other dense settings): nothing taken, yet the folder remembers the
    # source, so the same command rerun after its own stages have started is accepted
    other = write_cfg(tmp_path / "o.yaml", tmp_path / "o", dense={"epochs": 1})
    o = Pipeline(load_config(other))
    assert o.reuse_stages(src) == []
    o.run(("train",))
    assert Pipeline(load_config(other)).reuse_stages(src) == []
    # the same source written another way (relative) is the same source
    monkeypatch.chdir(tmp_path)
    assert Pipeline(load_config(other)).reuse_stages("a") == []
    # a killed copy (before the state was written) is redone without duplicate rows
    b_yaml = write_cfg(tmp_path / "b.yaml", tmp_path / "b")
    real = runfolder_mod.atomic_write_text

    def dies_at_state(path, text):
        if Path(path).name == "state.json":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(runfolder_mod, "atomic_write_text", dies_at_state)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(load_config(b_yaml)).reuse_stages(src)
    monkeypatch.setattr(runfolder_mod, "atomic_write_text", real)
    assert Pipeline(load_config(b_yaml)).reuse_stages(src) == ["train", "plan", "admm", "decompose"]
    rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    src_rows = (src / "metrics.jsonl").read_text().splitlines()
    assert rows == src_rows  # dense and admm rows, each once
    # a stage recorded as done whose file is gone ends the prefix (it is run anew)
    (src / "admm.pt").unlink()
    c = Pipeline(load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "c")))
    assert c.reuse_stages(src) == ["train", "plan"]
    # a source gone after the copy: the run resumes with the same command
    shutil.rmtree(src)
    assert Pipeline(load_config(b_yaml)).reuse_stages(src) == []


def test_reuse_of_a_deferred_dense_model_needs_the_file_when_the_config_reads_it(tmp_path):
    dense_ckpt = tmp_path / "later.pt"  # written by another run, not there yet
    scratch = {"init": "random", "format": "tt", "ranks": 16}
    sets = {
        "compress": scratch,
        "admm": {"epochs": 0},
        "runtime": {"dense_checkpoint": str(dense_ckpt)},
    }
    a_yaml = write_cfg(tmp_path / "a.yaml", tmp_path / "a", **sets)
    Pipeline(load_config(a_yaml)).run(("train", "plan"))
    src = tmp_path / "a"
    assert "deferred" in json.loads((src / "state.json").read_text())["done"]["train"]
    # another from-scratch config never reads the dense weights: train is taken as deferred
    b = Pipeline(load_config(write_cfg(tmp_path / "b.yaml", tmp_path / "b", **sets)))
    assert b.reuse_stages(src) == ["train", "plan"]
    # one with ADMM reads them: the deferred train stage (no dense.pt) is not taken
    sets_admm = dict(sets, admm={"epochs": 1})
    c = Pipeline(load_config(write_cfg(tmp_path / "c.yaml", tmp_path / "c", **sets_admm)))
    assert c.reuse_stages(src) == []


def test_cleanup_leaves_a_process_group_it_did_not_create():
    import torch.distributed as dist

    from tdcompress.train.distributed import cleanup, init_distributed

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert init_distributed()  # joins the caller's group: not ours to destroy
        cleanup()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_every_shipped_config_loads():
    # a config that its own pipeline would refuse (an unknown dataset, a bad choice) must not
    # be shipped as runnable; configs/ also names the demo's embedded one
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").rglob("*.yaml")) + [root / "src/tdcompress/demo.yaml"]
    assert len(files) > 10
    for f in files:
        load_config(f)
