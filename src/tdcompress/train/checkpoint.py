"""Atomic checkpoints and RNG state capture, so an interrupted run resumes exactly."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "atomic_write_text",
    "copy_atomic",
]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename: a crash
    leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` of a checkpoint; a missing file raises FileNotFoundError, an unreadable
    one (truncated, corrupt) a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        bad: Exception = e
    except RuntimeError as e:  # (torch's reader: "PytorchStreamReader failed ...")
        if "PytorchStreamReader" not in str(e) and "zip archive" not in str(e):
            raise
        bad = e
    first = (str(bad).strip().splitlines() or [type(bad).__name__])[0]
    raise ValueError(
        f"checkpoint {path} is not a readable PyTorch file ({first}); it is truncated or "
        "corrupt: delete it and rerun its stage (with --force once that stage is done)"
    ) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` written to a temporary file in the same folder, fsynced, then renamed over
    ``path``: after a crash or power loss, the old text or the new, never an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """``src`` copied to ``dst`` through a synced temporary file in ``dst``'s folder and a
    rename: ``dst`` is the old file or the whole new one, never a torn copy."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CPU and every CUDA device) RNG states."""
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
