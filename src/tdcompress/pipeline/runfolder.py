"""The run folder of a pipeline: its finished stages (``state.json``), the lock that keeps a
second process out (``run.lock``), the guard that refuses to resume with other settings
(``config.json``), stages lent by another run folder (``reuse_stages``) and the copy kept in
``runtime.keep_dir``.

:class:`RunFolder` is a part of :class:`~tdcompress.pipeline.Pipeline`, which sets the
attributes it reads: ``cfg``, ``out``, ``keep`` and ``device``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tdcompress.config import Config, read_json
from tdcompress.train.checkpoint import atomic_write_text, copy_atomic
from tdcompress.train.distributed import barrier, is_main, main_says
from tdcompress.train.keep import mirror_run_folder, restore_run_folder
from tdcompress.train.loop import read_metrics

if TYPE_CHECKING:
    import torch

# Config keys each stage's result depends on (a dotted key covers its sub-keys); once the
# stage has started in an out_dir, resuming with other values there is refused.
_STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "train": (
        "seed",
        "data",
        "model",
        "dense",
        "runtime.amp",
        "runtime.channels_last",
        "runtime.dense_checkpoint",
    ),
    "plan": ("compress",),
    "admm": ("admm",),
    "finetune": ("finetune",),
}
_STAGE_PHASE = {"train": "dense"}  # stage -> name of its per-epoch checkpoint
# Stages another run folder can lend (Pipeline.reuse_stages), in order, and their files.
_REUSABLE = ("train", "plan", "admm", "decompose", "finetune")
_STAGE_FILES = {
    "train": ("dense.pt",),
    "plan": ("plan.yaml",),
    "admm": ("admm.pt",),
    "decompose": ("decomposed.pt",),
    "finetune": ("finetuned.pt",),
}
# Where the data lives and how the run is executed do not change its result; nor does an
# extra evaluation on the test set at the end (data.final_test).
_FREE_KEYS = frozenset({"data.root", "data.download", "data.final_test"})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_keys(old: dict[str, Any], cfg: Config, guarded: list[str]) -> list[str]:
    """``"key: was .., now .."`` for each setting under ``guarded`` (dotted prefixes) in
    which the flattened config ``old`` differs from ``cfg``."""
    new = _flatten(cfg.to_dict())
    return [
        f"{k}: was {old.get(k)!r}, now {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if k not in _FREE_KEYS
        and any(k == g or k.startswith(g + ".") for g in guarded)
        and old.get(k) != new.get(k)
    ]


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values put in, section by section."""
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(base.get(k), dict)
        out[k] = _merged(base[k], v) if both else v
    return out


def dense_weights_unused(cfg: Config) -> bool:
    """True when no stage before the evaluation reads the trained dense weights: the
    factorized model from scratch (``compress.init: random``), no ADMM phase and no
    distillation. The dense model is then only the reference accuracy of the report, so a
    missing ``runtime.dense_checkpoint`` is needed only at the evaluate stage, not at train
    (which records the train stage as deferred)."""
    return (
        cfg.compress.init == "random" and cfg.admm.epochs == 0 and not cfg.finetune.distill_weight
    )


class RunFolder:
    """The run folder's state, lock, config guard, reuse and kept copy (a part of
    :class:`~tdcompress.pipeline.Pipeline`)."""

    cfg: Config
    out: Path  # runtime.out_dir
    keep: Path | None  # runtime.keep_dir
    device: torch.device

    def _restore_kept(self) -> None:
        """Start ``out_dir`` from ``runtime.keep_dir`` (if set) when the kept state is newer
        (rank 0)."""
        if self.keep is not None and is_main() and restore_run_folder(self.out, self.keep):
            print(f"[run] {self.out} started from the kept state in {self.keep}", flush=True)

    # ---------------------------------------------------------------- state
    def _started(self) -> list[str]:
        """Stages that finished or left a per-epoch checkpoint in ``out_dir``."""
        done = self.state()["done"] if self._state_path.exists() else {}
        return [
            s
            for s in _STAGE_CONFIG
            if s in done or (self.out / f"{_STAGE_PHASE.get(s, s)}.ckpt.pt").exists()
        ]

    def _check_config_unchanged(self) -> None:
        """Refuse to resume a run folder whose started stages used different settings.

        A resumed stage would otherwise mix two configurations silently (e.g. an ADMM phase
        half at one learning rate, half at another). Settings of stages that have not
        started yet may change freely; so may the data root, device, threads and progress.
        """
        old_path = self.out / "config.json"
        if not old_path.exists():
            return
        # A key missing from an older config.json did not exist when that run was written,
        # which ran as its default does now (settings are added with a neutral default).
        started = self._started()
        guarded = [k for s in started for k in _STAGE_CONFIG[s]]
        changed = _changed_keys(self._config_of(self.out), self.cfg, guarded)
        if changed:
            raise ValueError(
                f"runtime.out_dir {str(self.out)!r} holds a run whose started stages "
                f"({', '.join(started)}) used other settings: "
                + "; ".join(changed)
                + ". Restore those settings to resume, or choose a new runtime.out_dir "
                "(or delete the folder) to start over."
            )

    def _config_of(self, run_dir: Path) -> dict[str, Any]:
        """The flattened config a run folder was written with. A key missing from an older
        config.json did not exist then, and that run ran as its default does now."""
        saved = read_json(run_dir / "config.json", "the settings of that run")
        return _flatten(_merged(type(self.cfg)().to_dict(), saved))

    def reuse_stages(self, src: str | Path) -> list[str]:
        """Take the finished stages of the run folder ``src`` (their files, state records
        and metrics rows) in order for as long as each one's settings, and those of the
        stages before it, equal this config's and its files are there: one ADMM phase, then
        several fine-tunings, say. Needs an ``out_dir`` with no stage started, or one that
        was given the same ``src`` before (then nothing is done, so the command can be
        rerun, even once ``src`` is gone). Returns the stages taken."""
        src_dir = Path(src).resolve()
        key = str(src_dir)
        # rank 0's view throughout: it writes the state, the other ranks may be behind
        if main_says(self.state().get("reused_from") == key, self.device):
            return []
        if not (src_dir / "config.json").is_file() or not (src_dir / "state.json").is_file():
            raise FileNotFoundError(
                f"reuse source {str(src)!r} is not a run folder (it needs config.json and "
                "state.json)"
            )
        if src_dir == self.out.resolve():
            raise ValueError(f"reuse source {str(src)!r} is this run's own out_dir")
        if main_says(bool(self._started()), self.device):
            raise ValueError(
                f"runtime.out_dir {str(self.out)!r} already holds started stages "
                f"({', '.join(self._started())}) and was not given this reuse source "
                "before: stages are reused into a fresh run folder (to resume this one, "
                "drop --reuse-from)"
            )
        old = self._config_of(src_dir)
        done = read_json(src_dir / "state.json", "its finished stages")
        done = done["done"]
        taken: list[str] = []
        guarded: list[str] = []
        for s in _REUSABLE:
            guarded += _STAGE_CONFIG.get(s, ())
            if s not in done or _changed_keys(old, self.cfg, guarded):
                break
            if not all((src_dir / f).is_file() for f in self._files_needed(s, done[s])):
                break  # (a stage recorded as done whose files were removed)
            taken.append(s)
        with self._exclusive():
            if is_main():
                for s in taken:
                    for name in _STAGE_FILES[s]:
                        if (src_dir / name).is_file():
                            copy_atomic(src_dir / name, self.out / name)
                # the folder has no started stage, so any rows there are of an interrupted
                # copy: replaced, not appended to
                phases = {_STAGE_PHASE.get(s, s) for s in taken}
                rows = [
                    r for r in read_metrics(src_dir / "metrics.jsonl") if r.get("phase") in phases
                ]
                text = "".join(json.dumps(r) + "\n" for r in rows)
                atomic_write_text(self.out / "metrics.jsonl", text)
                st = self.state()
                st["done"].update({s: dict(done[s], reused_from=key) for s in taken})
                st["reused_from"] = key  # last: a kill before it leaves a rerunnable copy
                atomic_write_text(self._state_path, json.dumps(st, indent=2))
            barrier()
        return taken

    def _files_needed(self, stage: str, record: dict[str, Any]) -> tuple[str, ...]:
        """The files a finished ``stage`` with state ``record`` must have left to be reused:
        all of :data:`_STAGE_FILES` but a skipped ADMM phase's ``admm.pt`` and a deferred
        train stage's ``dense.pt`` when this config never reads the dense weights."""
        if stage == "admm" and "skipped" in record:
            return ()
        if stage == "train" and "deferred" in record and dense_weights_unused(self.cfg):
            return ()
        return _STAGE_FILES[stage]

    @property
    def _state_path(self) -> Path:
        return self.out / "state.json"

    def state(self) -> dict[str, Any]:
        if self._state_path.exists():
            return read_json(self._state_path, "this run's finished stages")
        return {"done": {}}

    def _mark_done(self, stage: str, result: dict[str, Any]) -> None:
        if is_main():
            st = self.state()
            st["done"][stage] = result
            atomic_write_text(self._state_path, json.dumps(st, indent=2))
            self._mirror()
        barrier()

    def _mirror(self) -> None:
        """Bring ``runtime.keep_dir`` (if set) up to date with the run folder (rank 0
        only: no collective here)."""
        if self.keep is not None:
            mirror_run_folder(self.out, self.keep, self.state()["done"])

    def done(self, stage: str) -> bool:
        return stage in self.state()["done"]

    def _record_config(self) -> None:
        """Check the settings against the folder's ``config.json`` (its started stages may
        have changed since this object was made), then write them there."""
        self._check_config_unchanged()
        atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold an exclusive lock on the run folder (rank 0), so that a second process
        started on the same ``runtime.out_dir`` stops at once instead of interleaving its
        checkpoints with the first one's; then check the settings against the folder's
        ``config.json`` and write it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            fcntl = None
        if fcntl is None or not is_main():
            if is_main():
                self._record_config()
            yield
            return
        path = self.out / "run.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise RuntimeError(
                    f"runtime.out_dir {str(self.out)!r} is in use by another process "
                    f"(pid {holder}); wait for it to finish or choose another out_dir"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                # only the holder of the lock records its settings: a process refused here
                # must not rewrite the config.json of the run it was refused from
                self._record_config()
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
