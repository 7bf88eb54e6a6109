"""runtime.keep_dir (train/keep.py): a run's resumable state mirrored into a second folder,
restored into an empty run folder, resumed to the same weights as an unbroken run, pruned
to the final weights when the run ends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tdcompress.pipeline.phase as phase_mod
from tdcompress.config import load_config
from tdcompress.pipeline import Pipeline
from tdcompress.train.keep import kept_files, mirror_run_folder, restore_run_folder
from test_pipeline import write_cfg


def test_kept_files_follow_the_stages() -> None:
    every = {
        "config.json",
        "state.json",
        "metrics.jsonl",
        "plan.yaml",
        "dense.pt",
        "dense.ckpt.pt",
        "admm.ckpt.pt",
        "admm.pt",
        "decomposed.pt",
        "finetune.ckpt.pt",
        "finetuned.pt",
        "report.md",
        "curves.png",
        "run.lock",
    }
    records = {"config.json", "state.json", "metrics.jsonl", "plan.yaml"}
    assert kept_files({}, every) == records | {"dense.pt", "admm.pt", "decomposed.pt"} | {
        "finetuned.pt",
        "dense.ckpt.pt",
        "admm.ckpt.pt",
        "finetune.ckpt.pt",
    }
    mid = {"train": {}, "plan": {}}  # in the ADMM phase
    got = kept_files(mid, every - {"finetune.ckpt.pt", "decomposed.pt", "finetuned.pt"})
    assert got == records | {"dense.pt", "admm.pt", "admm.ckpt.pt"}
    after_decompose = {"train": {}, "plan": {}, "admm": {}, "decompose": {}}
    got = kept_files(after_decompose, every - {"finetuned.pt", "finetune.ckpt.pt"})
    assert got == records | {"dense.pt", "decomposed.pt"}
    ended = {s: {} for s in ("train", "plan", "admm", "decompose", "finetune", "evaluate")}
    assert kept_files(ended, every) == records | {"finetuned.pt"}
    dense_run = {"train": {}}
    assert kept_files(dense_run, {"config.json", "state.json", "dense.pt", "dense.ckpt.pt"}) == {
        "config.json",
        "state.json",
        "dense.pt",
    }


def test_restore_only_into_an_empty_run_folder(tmp_path) -> None:
    keep, out = tmp_path / "keep", tmp_path / "out"
    assert not restore_run_folder(out, keep)  # nothing kept
    keep.mkdir()
    (keep / "config.json").write_text("{}")
    (keep / "dense.ckpt.pt").write_bytes(b"x")
    assert restore_run_folder(out, keep) and (out / "dense.ckpt.pt").read_bytes() == b"x"
    (keep / "dense.ckpt.pt").write_bytes(b"newer")
    assert not restore_run_folder(out, keep)  # a folder holding a run is left alone
    assert (out / "dense.ckpt.pt").read_bytes() == b"x"


def test_oversized_files_are_not_kept(tmp_path, monkeypatch) -> None:
    import tdcompress.train.keep as keep_mod

    out, keep = tmp_path / "out", tmp_path / "keep"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "dense.ckpt.pt").write_bytes(b"0" * 100)
    monkeypatch.setattr(keep_mod, "MAX_BYTES", 50)
    with pytest.warns(UserWarning, match=r"dense\.ckpt\.pt is .* not kept"):
        mirror_run_folder(out, keep, {})
    assert sorted(p.name for p in keep.iterdir()) == ["config.json"]


def _state_dicts_equal(a: Path, b: Path) -> None:
    sa, sb = torch.load(a)["model"], torch.load(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:  # tensors bit for bit; the layers' records (_extra_state) equal
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
        else:
            assert sa[k] == sb[k], k


def test_run_resumes_from_the_kept_state_on_a_fresh_machine(tmp_path, monkeypatch) -> None:
    """Killed in the ADMM phase, run folder lost, rerun: the same weights as an unbroken
    run; at the end only the final weights and records are kept; evaluate and export work
    from the kept folder alone."""
    straight = tmp_path / "straight"
    cfg = load_config(write_cfg(tmp_path / "a.yaml", straight))
    Pipeline(cfg).run()

    out, keep = tmp_path / "run", tmp_path / "kept"
    cfg = load_config(write_cfg(tmp_path / "b.yaml", out), [f"runtime.keep_dir={keep}"])
    real = phase_mod.train_epoch  # (the training phase's module runs the epochs)
    calls = {"n": 0}

    def dies_in_admm(*a, **k):  # 5 dense epochs, then the 3rd ADMM epoch is killed
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(phase_mod, "train_epoch", dies_in_admm)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run()
    monkeypatch.setattr(phase_mod, "train_epoch", real)
    assert (keep / "admm.ckpt.pt").is_file() and not (keep / "dense.ckpt.pt").exists()
    assert torch.load(keep / "admm.ckpt.pt", weights_only=False)["epoch"] == 2

    shutil.rmtree(out)  # a fresh machine: the run folder is gone
    done = Pipeline(cfg).run()
    _state_dicts_equal(out / "finetuned.pt", straight / "finetuned.pt")
    ref = json.loads((straight / "state.json").read_text())["done"]["evaluate"]
    assert done["evaluate"]["finetuned_acc"] == ref["finetuned_acc"]
    assert done["evaluate"]["evaluated_on"] == "test"
    kept = sorted(p.name for p in keep.iterdir())
    assert kept == ["config.json", "finetuned.pt", "metrics.jsonl", "plan.yaml", "state.json"]

    shutil.rmtree(out)  # again: evaluate and export from the kept files alone
    p = Pipeline(cfg)
    assert p.run(("evaluate",))["evaluate"]["finetuned_acc"] == ref["finetuned_acc"]
    res = p.export(tmp_path / "m.pt2", format="pt2")
    assert Path(res.path).is_file()


def test_mirror_compares_contents_not_time_stamps(tmp_path) -> None:
    """A kept file newer than the run folder's (a checkout of another machine's state)
    with the same size is still replaced when its bytes differ."""
    import os

    out, keep = tmp_path / "out", tmp_path / "keep"
    out.mkdir()
    keep.mkdir()
    (out / "config.json").write_text("{}")
    (out / "admm.ckpt.pt").write_bytes(b"LOCAL-epoch-7")
    (keep / "admm.ckpt.pt").write_bytes(b"OTHER-epoch-3")
    later = os.stat(out / "admm.ckpt.pt").st_mtime_ns + 10**10
    os.utime(keep / "admm.ckpt.pt", ns=(later, later))
    mirror_run_folder(out, keep, {"train": {}, "plan": {}})
    assert (keep / "admm.ckpt.pt").read_bytes() == b"LOCAL-epoch-7"
