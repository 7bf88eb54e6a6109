"""Shared by the result scripts that drive many ``tdcompress`` runs (fsdd.py,
transformer_mnist.py): a queue that runs them ``jobs`` at a time, each after the runs it
starts from; what a run folder holds (finished?, its record, its model); interleaved
latency medians of several models."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def run_queue(
    runs: Sequence[dict[str, Any]],
    argv: Callable[[dict[str, Any]], list[str]],
    ready: Callable[[dict[str, Any]], bool],
    finished: Callable[[dict[str, Any]], bool],
    *,
    cwd: Path,
    log_dir: Path,
    jobs: int,
    tag: str,
) -> None:
    """Run each unfinished run of ``runs`` (dicts with an ``id``) as ``python -m tdcompress
    <argv(run)>``, at most ``jobs`` at a time, in order among those whose ``ready(run)``
    holds (e.g. its dense run has finished); one log file per run under ``log_dir``.
    Raises RuntimeError naming the runs that failed (after the others have run)."""
    pending = [r for r in runs if not finished(r)]
    log_dir.mkdir(parents=True, exist_ok=True)
    active: list[tuple[dict[str, Any], subprocess.Popen]] = []
    failed: list[str] = []
    while pending or active:
        for r, p in list(active):
            if p.poll() is not None:
                active.remove((r, p))
                if p.returncode:
                    failed.append(r["id"])
                status = "done" if p.returncode == 0 else f"FAILED (exit {p.returncode})"
                print(f"[{tag}] {r['id']}: {status}", flush=True)
        startable = [r for r in pending if ready(r)]
        while startable and len(active) < jobs:
            r = startable.pop(0)
            pending.remove(r)
            cmd = [sys.executable, "-m", "tdcompress", *argv(r)]
            cmd += ["--set", "runtime.progress=false", "--set", "runtime.threads=1"]
            log = open(log_dir / (r["id"].replace("/", "_") + ".log"), "a")
            print(f"[{tag}] start {r['id']}", flush=True)
            active.append((r, subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=log)))
        if pending and not active and not any(ready(r) for r in pending):
            raise RuntimeError(f"{tag}: runs waiting on failed runs: {failed}")
        time.sleep(2)
    if failed:
        raise RuntimeError(f"{tag}: failed runs (see {log_dir}): {failed}")


def interleaved_latency(
    models: dict[str, nn.Module],
    inputs: dict[int, torch.Tensor],
    repeats: int = 15,
    reference: str = "dense",
) -> list[dict[str, Any]]:
    """Per-batch latency of each model in ``models`` (eval, inference mode, the current
    thread count) on each ``inputs[batch]``: every round times each model once, in turn,
    over a few calls; the median over ``repeats`` rounds. Rows: key, batch, ms per batch,
    microseconds per sample, speed-up over ``models[reference]``."""
    out = []
    for batch, x in inputs.items():
        times: dict[str, list[float]] = {k: [] for k in models}
        inner = 20 if batch == 1 else 3
        with torch.inference_mode():
            for m in models.values():
                for _ in range(3):  # warm-up (plans, allocator)
                    m(x)
            for _ in range(repeats):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        m(x)
                    times[k].append((time.perf_counter() - t0) / inner)
        ref = statistics.median(times[reference]) if reference in times else None
        for k, ts in times.items():
            med = statistics.median(ts)
            out.append(
                {
                    "key": k,
                    "batch": batch,
                    "ms_per_batch": 1e3 * med,
                    "us_per_sample": 1e6 * med / batch,
                    "speedup_vs_dense": None if ref is None else ref / med,
                }
            )
    return out


def with_execution_choice(
    models: dict[str, nn.Module], inputs: dict[int, torch.Tensor], tag: str = "chosen"
) -> dict[str, nn.Module]:
    """``models`` and, after each model with factorized layers, ``"<key> (<tag>)"``: a copy
    that made its per-layer execution choice for the shapes of ``inputs`` as eager inference
    runs it (:func:`tdcompress.layers.choose_execution` with ``folded=True``), then folded
    for deployment (:func:`tdcompress.layers.fold_kernels`: a rebuilt layer's kernel is
    computed once and kept)."""
    import copy

    from tdcompress.layers import choose_execution, fold_kernels

    out: dict[str, nn.Module] = {}
    for k, m in models.items():
        out[k] = m
        if any(True for _ in _factorized(m)):
            c = copy.deepcopy(m).eval()
            choose_execution(c, [tuple(x.shape) for x in inputs.values()], folded=True)
            fold_kernels(c)
            out[f"{k} ({tag})"] = c
    return out


def _factorized(model: nn.Module):
    from tdcompress.layers._base import FactorizedLayer

    return (m for m in model.modules() if isinstance(m, FactorizedLayer))


def machine_load() -> dict[str, Any]:
    """``os.getloadavg()`` and /proc/pressure/cpu's ``some avg10`` (None where unreadable)."""
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_avg10": None,
    }
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                out["cpu_pressure_avg10"] = float(fields["avg10"])
    return out


def done_stages(out_dir: Path) -> dict[str, Any]:
    """``state.json``'s finished stages of a run folder ({} if it has none)."""
    st = Path(out_dir) / "state.json"
    return json.loads(st.read_text())["done"] if st.is_file() else {}


def finished(out_dir: Path, dense: bool) -> bool:
    """A dense run (``tdcompress train``) has trained; any other has evaluated."""
    return ("train" if dense else "evaluate") in done_stages(out_dir)


def run_record(out_dir: Path) -> dict[str, Any]:
    """What every result keeps of a finished run: training wall time (the epochs' own
    seconds) and the per-epoch test accuracy."""
    from tdcompress.train.loop import read_metrics

    rows = read_metrics(Path(out_dir) / "metrics.jsonl", per_epoch=True)
    return {
        "wall_seconds": round(sum(x.get("seconds", 0.0) for x in rows), 1),
        "curve": [
            {"phase": x["phase"], "epoch": x["epoch"], "test_acc": x["test_acc"]} for x in rows
        ],
    }


def run_model(config: Path, out_dir: Path, data_root: str, dense: bool) -> nn.Module:
    """The trained model of a run folder in eval mode: the dense model (``dense.pt``) or
    the fine-tuned compressed one (``finetuned.pt``, rebuilt without decomposing)."""
    from tdcompress.config import load_config
    from tdcompress.pipeline import Pipeline
    from tdcompress.train.checkpoint import load_checkpoint

    recorded = Path(out_dir) / "config.json"  # the settings the run was made with
    cfg = load_config(recorded if recorded.is_file() else config)
    cfg.runtime.out_dir = str(out_dir)
    cfg.data.root = data_root
    p = Pipeline(cfg)
    if not dense:
        return p.compressed_model("finetuned.pt").eval()
    m = p.dense_model()
    m.load_state_dict(load_checkpoint(Path(out_dir) / "dense.pt")["model"])
    return m.eval()
