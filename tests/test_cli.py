"""The command line's errors: one line, ``tdcompress: error: ...``, status 2 (tracebacks only
with --debug); and ``tdcompress download``."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tdcompress.cli import main

CFG = {
    "seed": 0,
    "data": {"dataset": "synthetic", "batch_size": 64, "eval_batch_size": 256},
    "model": {"name": "mlp", "kwargs": {"hidden": [32, 32], "num_classes": 4}},
    "dense": {"epochs": 1},
    "compress": {"format": "tt", "ranks": 4},
    "admm": {"epochs": 0},
    "finetune": {"epochs": 1},
    "runtime": {"device": "cpu", "progress": False, "threads": 1},
}


def write_cfg(tmp: Path, **over) -> Path:
    cfg = json.loads(json.dumps(CFG))
    cfg["runtime"]["out_dir"] = str(tmp / "run")
    for k, v in over.items():
        cfg[k].update(v)
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def error_line(capsys, argv: list[str], *parts: str) -> str:
    """Run the CLI: it must fail with status 2 and exactly one stderr line, the error,
    holding every one of ``parts``."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("tdcompress: error: "), err
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


@pytest.fixture
def no_env_root(monkeypatch):
    monkeypatch.delenv("TDCOMPRESS_DATA_ROOT", raising=False)


def test_a_missing_config_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    error_line(capsys, ["plan", missing], "nope.yaml does not exist", "configs/")


def test_a_malformed_yaml_config_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: mnist\nmodel: [\n")
    error_line(capsys, ["pipeline", str(bad)], "bad.yaml is not valid YAML", "line 2", "fix")


def test_an_unknown_key_and_a_bad_value(tmp_path, capsys):
    cfg = write_cfg(tmp_path, admm={"rhoo": 1.0})
    error_line(capsys, ["plan", str(cfg)], "unknown config keys ['rhoo'] in admm; valid keys")
    cfg = write_cfg(tmp_path)
    error_line(capsys, ["plan", str(cfg), "--set", "dense.epochs=1.5"], "dense.epochs")
    error_line(capsys, ["plan", str(cfg), "--set", "dense.epochs"], "--set expects key=value")
    error_line(capsys, ["plan", str(cfg), "--set", "name=["], "--set name=[", "quote it")


def test_a_missing_dataset_names_the_file_and_the_download_command(tmp_path, capsys, no_env_root):
    cfg = write_cfg(tmp_path, data={"dataset": "mnist"})
    root = tmp_path / "data"
    error_line(
        capsys,
        ["train", str(cfg), "--data-root", str(root)],
        f"{root}/mnist/train-images-idx3-ubyte.gz: file not found",
        f"`tdcompress download mnist --data-root {root}`",
    )
    # no data root at all
    error_line(
        capsys, ["train", str(cfg)], "needs a data root", "tdcompress download mnist --data-root"
    )


def test_a_corrupt_dataset_file_names_it_and_how_to_replace_it(tmp_path, capsys):
    cfg = write_cfg(tmp_path, data={"dataset": "mnist"})
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (root / "mnist" / name).write_bytes(b"\x1f\x8b" + b"not gzip at all")
    error_line(
        capsys,
        ["train", str(cfg), "--data-root", str(root)],
        "train-images-idx3-ubyte.gz: corrupt gzip stream",
        f"tdcompress download mnist --data-root {root} --force",
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run with every stage done (a few seconds)."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_cfg(tmp)
    assert main(["pipeline", str(cfg)]) == 0
    return tmp


def _copy_run(src: Path, tmp: Path) -> Path:
    import shutil

    shutil.copytree(src / "run", tmp / "run")
    return write_cfg(tmp)


def test_corrupt_files_of_a_run_folder_are_named(finished_run, tmp_path, capsys):
    cfg = _copy_run(finished_run, tmp_path)
    run = tmp_path / "run"
    good = (run / "finetuned.pt").read_bytes()
    (run / "finetuned.pt").write_bytes(good[: len(good) // 2])  # a truncated archive
    error_line(
        capsys,
        ["export", str(cfg), "--format", "pt2"],
        f"{run / 'finetuned.pt'}: not a readable PyTorch file",
    )
    error_line(capsys, ["evaluate", str(cfg)], "finetuned.pt: not a readable PyTorch file")
    (run / "finetuned.pt").write_bytes(good)
    dense = (run / "dense.pt").read_bytes()
    (run / "dense.pt").write_bytes(dense[:100])
    error_line(
        capsys,
        ["decompose", str(cfg), "--force"],
        f"checkpoint {run / 'dense.pt'} is not a readable PyTorch file",
        "delete it and rerun its stage",
    )
    (run / "dense.pt").write_bytes(dense)
    (run / "plan.yaml").write_text("layers: [\n  {name: x\n")
    error_line(capsys, ["evaluate", str(cfg)], "plan file", "plan.yaml is not valid YAML")
    (run / "state.json").write_text('{"done": ')
    error_line(capsys, ["evaluate", str(cfg)], "state.json: not valid JSON")


def test_a_dense_checkpoint_of_another_model(finished_run, tmp_path, capsys):
    other = write_cfg(tmp_path, model={"kwargs": {"hidden": [16], "num_classes": 4}})
    error_line(
        capsys,
        ["train", str(other), "--set", f"runtime.dense_checkpoint={finished_run / 'run/dense.pt'}"],
        "runtime.dense_checkpoint",
        "does not fit model 'mlp'",
        "size mismatch",
    )


def test_debug_shows_the_traceback_instead(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    for argv in (["--debug", "plan", missing], ["plan", missing, "--debug"]):
        with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):
            main(argv)


def test_usage_errors_stay_argparses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["download", "imagenet", "--data-root", "x"])
    assert e.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes(), mtime=0)


def test_download_fetches_verifies_and_load_dataset_reads_it(
    tmp_path, capsys, monkeypatch, no_env_root
):
    import importlib

    from tdcompress.data import load_dataset

    dl = importlib.import_module("tdcompress.data.download")  # (the package's name: a function)

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 255, (20, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx(rng.integers(0, 10, (20,))),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 255, (8, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx(rng.integers(0, 10, (8,))),
    }
    for name, data in files.items():
        (mirror / name).write_bytes(data)
    md5 = {n: hashlib.md5(d).hexdigest() for n, d in files.items()}
    # a local mirror (file:// URLs, no network) serving files with these checksums
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source("mnist", ("unused",), md5))
    root = tmp_path / "data"
    argv = ["download", "mnist", "--data-root", str(root), "--base-url", mirror.as_uri() + "/"]
    assert main(argv) == 0
    assert f"mnist: {root / 'mnist'} (checksums verified)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (root / "mnist").iterdir()} == files
    x, y = load_dataset("mnist", root, "test")
    assert tuple(x.shape) == (8, 1, 28, 28) and len(y) == 8
    # bytes that are not the official ones are refused and not kept
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    error_line(capsys, argv, "checksum mismatch", "t10k-labels-idx1-ubyte.gz")
    assert not (root / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_download_errors_are_one_line(tmp_path, capsys, no_env_root):
    error_line(capsys, ["download", "mnist"], "pass --data-root DIR")
    gone = (tmp_path / "nowhere").as_uri() + "/"
    error_line(
        capsys,
        ["download", "fashion_mnist", "--data-root", str(tmp_path), "--base-url", gone],
        "could not download train-images-idx3-ubyte.gz of dataset 'fashion_mnist'",
        "check the connection",
    )
