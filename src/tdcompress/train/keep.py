"""A run's resumable state kept in a second folder (``runtime.keep_dir``), e.g. one committed
with the repository, so that a long run survives the loss of its run folder (a fresh
machine): the pipeline mirrors the run folder there after every epoch and stage, and a run
whose folder is empty starts from that copy.

What is kept: the records (``config.json``, ``state.json``, ``metrics.jsonl``,
``plan.yaml``), the weights of each finished stage that a later stage still reads, and the
per-epoch checkpoint of the phase in progress. A finished phase's per-epoch checkpoint is
dropped; once the run has evaluated, only its final weights stay (``finetuned.pt``, or
``dense.pt`` for a dense run). Files over ``MAX_BYTES`` are not copied (a warning says so).
"""

from __future__ import annotations

import filecmp
import warnings
from pathlib import Path
from typing import Any

from tdcompress.train.checkpoint import copy_atomic

__all__ = ["MAX_BYTES", "restore_run_folder", "mirror_run_folder", "kept_files"]

MAX_BYTES = 8 * 1024 * 1024  # (the repository's limit on a committed file)
_RECORDS = ("config.json", "state.json", "metrics.jsonl", "plan.yaml")
_PHASE_OF_STAGE = {"train": "dense", "admm": "admm", "finetune": "finetune"}


def kept_files(done: dict[str, Any], present: set[str]) -> set[str]:
    """The names among ``present`` (files of a run folder) that the keep folder holds for a
    run whose finished stages are ``done`` (``state.json``'s ``done``)."""
    keep = {n for n in _RECORDS if n in present}
    if "evaluate" in done:  # the run has ended: its records and final weights
        final = "finetuned.pt" if "finetuned.pt" in present else "dense.pt"
        return keep | ({final} & present)
    weights = {  # until the stage that reads them has finished
        "dense.pt": True,  # (ADMM, decompose, distillation in fine-tuning, the report)
        "admm.pt": "decompose" not in done,
        "decomposed.pt": "finetune" not in done,
        "finetuned.pt": True,
    }
    keep |= {n for n, needed in weights.items() if needed and n in present}
    for stage, phase in _PHASE_OF_STAGE.items():
        name = f"{phase}.ckpt.pt"
        if stage not in done and name in present:
            keep.add(name)
    return keep


def restore_run_folder(out_dir: str | Path, keep_dir: str | Path) -> bool:
    """Copy ``keep_dir``'s files into ``out_dir`` when ``out_dir`` holds no run (no
    ``config.json`` nor ``state.json``) and ``keep_dir`` does; True if it copied."""
    out, keep = Path(out_dir), Path(keep_dir)
    if (out / "config.json").exists() or (out / "state.json").exists():
        return False
    if not (keep / "config.json").is_file():
        return False
    out.mkdir(parents=True, exist_ok=True)
    names = [p for p in keep.iterdir() if p.is_file() and not p.name.startswith(".")]
    # state.json last: a copy interrupted before it leaves a folder that is restored again
    for p in sorted(names, key=lambda p: p.name == "state.json"):
        copy_atomic(p, out / p.name)
    return True


def mirror_run_folder(out_dir: str | Path, keep_dir: str | Path, done: dict[str, Any]) -> None:
    """Make ``keep_dir`` hold :func:`kept_files` of ``out_dir`` (changed files copied
    atomically, files no longer needed removed)."""
    out, keep = Path(out_dir), Path(keep_dir)
    keep.mkdir(parents=True, exist_ok=True)
    present = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    wanted = kept_files(done, present)
    for name in sorted(wanted, key=lambda n: n == "state.json"):  # state.json last
        src, dst = out / name, keep / name
        size = src.stat().st_size
        if size > MAX_BYTES:
            warnings.warn(
                f"runtime.keep_dir: {src} is {size / 2**20:.1f} MiB, over the "
                f"{MAX_BYTES / 2**20:.0f} MiB limit: not kept in {keep}",
                stacklevel=2,
            )
            continue
        if dst.is_file() and dst.stat().st_size == size and filecmp.cmp(src, dst, shallow=False):
            continue  # the same bytes (compared, not judged by time stamps)
        copy_atomic(src, dst)
    for p in keep.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name not in wanted:
            p.unlink()
