"""CIFAR-10 ResNet-20/32 at the paper's compression ratios (issue 8): run, collect, report.

Every run is one config in ``configs/cifar10/`` (a plain ``tdcompress`` pipeline, resumable
per epoch). This script runs them in dependency order (a compressed run after the dense
run it starts from), ``--jobs`` at a time, skipping finished stages, and collects whatever
has finished into

- ``benchmarks/results/quality-cifar10.json`` (per run: top-1, parameters, whole-model
  ratio, MAC reduction, epochs per phase, wall time, the paper's figure, per-epoch curves),
- ``docs/results/cifar10.md`` (the table) and ``docs/results/cifar10-curves.png``.

Runs not finished yet are listed with the epochs they have done, so the table can be
committed as results arrive and the command rerun in a later working stretch. Finished
results are kept from the recorded JSON (run folders are scratch space; a fresh checkout has
none), and a later run of a recorded config is shown beside its result, not in its place.

    python benchmarks/cifar10.py --run all --jobs 2 --data-root ../shared/data  # run (resumes)
    python benchmarks/cifar10.py                                        # collect only
    python benchmarks/cifar10.py --resume-proof --data-root ../shared/data

``--resume-proof`` runs ``resnet20_tt_6.8x`` on a 2,560-image subset twice, once straight
through and once SIGKILLed mid-epoch (ADMM phase) and restarted with the same command, and
compares the final metrics and weights (``benchmarks/results/cifar10-resume-proof.json``).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tdcompress.config import Config, load_config
from tdcompress.pipeline import dense_weights_unused
from tdcompress.report import command_block, pyplot, save_figure
from tdcompress.train.checkpoint import atomic_write_text
from tdcompress.train.loop import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "cifar10"

# key: (label, method, paper top-1 at the paper's ratio or None)
RUNS: dict[str, tuple[str, str, float | None]] = {
    "resnet20_dense": ("ResNet-20 dense", "dense", 91.25),
    "resnet20_dense_fp32": ("ResNet-20 dense, fp32 (bf16 check)", "dense", 91.25),
    "resnet20_tt_6.8x": ("ResNet-20 ADMM -> TT 6.8x", "admm", 91.03),
    "resnet20_tt_6.8x_ftlr": ("ResNet-20 ADMM -> TT 6.8x, fine-tune lr 0.002", "admm", 91.03),
    "resnet20_tt_6.8x_eqratio": (
        "ResNet-20 ADMM -> TT 6.8x, equal_ratio rank allocation",
        "admm",
        91.03,
    ),
    "resnet20_tt_6.8x_admmlr": ("ResNet-20 ADMM -> TT 6.8x, ADMM lr 0.1", "admm", 91.03),
    "resnet20_tt_6.8x_wd": (
        "ResNet-20 ADMM -> TT 6.8x, fine-tune weight decay 1e-4",
        "admm",
        91.03,
    ),
    "resnet20_tt_6.8x_dtf": ("ResNet-20 TT-SVD + fine-tune 6.8x", "dtf", None),
    "resnet20_tt_6.8x_scratch": ("ResNet-20 TT from scratch 6.8x", "scratch", None),
    "resnet20_tt_4.5x": ("ResNet-20 ADMM -> TT 4.5x", "admm", 91.47),
    "resnet32_dense": ("ResNet-32 dense", "dense", 92.49),
    "resnet32_tt_5.8x": ("ResNet-32 ADMM -> TT 5.8x", "admm", 91.96),
    "resnet32_tt_4.8x": ("ResNet-32 ADMM -> TT 4.8x", "admm", 92.87),
    "resnet32_tucker2_3x": ("ResNet-32 ADMM -> Tucker-2 3x", "admm", None),
    # issue 8's full budget: 90 epochs of dense training and of ADMM + fine-tuning
    "resnet20_dense_e90": ("ResNet-20 dense, 90 epochs", "dense", 91.25),
    "resnet20_tt_6.8x_e90": ("ResNet-20 ADMM -> TT 6.8x, 90-epoch budget", "admm", 91.03),
    "resnet20_tt_6.8x_kd_e90": (
        "ResNet-20 ADMM -> TT 6.8x, distillation in fine-tuning, 90-epoch budget",
        "admm",
        91.03,
    ),
    "resnet20_tt_6.8x_wd_e90": (
        "ResNet-20 ADMM -> TT 6.8x, fine-tune weight decay 1e-4, 90-epoch budget",
        "admm",
        91.03,
    ),
    "resnet20_tt_6.8x_dtf_e90": ("ResNet-20 TT-SVD + fine-tune 6.8x, 90-epoch budget", "dtf", None),
    "resnet20_tt_6.8x_scratch_e90": (
        "ResNet-20 TT from scratch 6.8x, 90-epoch budget",
        "scratch",
        None,
    ),
}
# runs that take the finished stages of another run (tdcompress pipeline --reuse-from) instead
# of repeating them: key -> (source run, the stage it must have finished first)
REUSE: dict[str, tuple[str, str]] = {
    "resnet20_tt_6.8x_wd": ("resnet20_tt_6.8x", "decompose"),
    "resnet20_tt_6.8x_kd_e90": ("resnet20_tt_6.8x_e90", "decompose"),
    "resnet20_tt_6.8x_wd_e90": ("resnet20_tt_6.8x_e90", "decompose"),
}
# runs whose folder was seeded by hand with a copy of another run's ADMM stage (before
# --reuse-from existed): key -> source run
SEEDED: dict[str, str] = {"resnet20_tt_6.8x_ftlr": "resnet20_tt_6.8x"}


def shares_admm(key: str) -> bool:
    """Whether ``key``'s ADMM rows are another run's (REUSE of its ADMM phase, or SEEDED)."""
    return key in SEEDED or (key in REUSE and REUSE[key][1] in ("admm", "decompose"))


PAPER_NOTE = (
    "Paper figures: Yin et al. 2021, Table 2 (200 dense epochs before ADMM; the paper's "
    "standard TT baseline: 86.7% at 5.4x for ResNet-20, 88.3% at 4.8x for ResNet-32)."
)


def run_config(key: str, sets: list[str] | None = None) -> Config:
    return load_config(CONFIGS / f"{key}.yaml", list(sets or []))


def out_dir(cfg: Config) -> Path:
    p = Path(cfg.runtime.out_dir)
    return p if p.is_absolute() else REPO / p


# ------------------------------------------------------------------------------ running
def budget(key: str) -> int:
    """Epochs of the run's budget: its dense baseline's epochs, which are also those of ADMM +
    fine-tuning (twice that from scratch: the dense epochs plus the same again)."""
    return 90 if key.endswith("_e90") else 30


def dense_run(key: str, sets: list[str] | None = None) -> str | None:
    """The dense run that ``key`` is compared with: for a compressed run, the one whose model
    it starts from; for a dense variant (fp32), the bf16 baseline of the same model and
    budget; None for those baselines."""
    cfg = run_config(key, sets)
    if RUNS[key][1] == "dense":
        base = f"{cfg.model.name}_dense" + ("_e90" if budget(key) == 90 else "")
        return base if base != key and base in RUNS else None
    dc = cfg.runtime.dense_checkpoint
    name = Path(dc).parent.name if dc else None
    return name if name in RUNS and RUNS[name][1] == "dense" else None


def dependencies(key: str, sets: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The dense runs ``key`` needs (its ``runtime.dense_checkpoint``): ``(before it starts,
    before its evaluate stage)``. A from-scratch run (``pipeline.dense_weights_unused``) needs
    the dense model only at its evaluate stage, so it may start at once."""
    if RUNS[key][1] == "dense":  # a dense variant is compared with, not started from, a run
        return [], []
    d = dense_run(key, sets)
    need = [d] if d else []
    return ([], need) if dense_weights_unused(run_config(key, sets)) else (need, [])


def _argv(key: str, data_root: str, sets: list[str]) -> list[str]:
    cmd = "train" if RUNS[key][1] == "dense" else "pipeline"
    argv = [cmd, str(CONFIGS / f"{key}.yaml"), "--data-root", data_root]
    for s in sets:
        argv += ["--set", s]
    if key in REUSE:
        argv += ["--reuse-from", str(out_dir(run_config(REUSE[key][0], sets)))]
    return argv


def reuse_ready(key: str, sets: list[str] | None = None) -> bool:
    """Whether ``key``'s reuse source (if any) has finished the stage it lends."""
    if key not in REUSE:
        return True
    src, stage = REUSE[key]
    path = out_dir(run_config(src, sets)) / "state.json"
    return path.exists() and stage in json.loads(path.read_text())["done"]


def _launch(key: str, argv: list[str], log: Path | None) -> subprocess.Popen:
    out = None
    if log is not None:  # parallel runs: one log per run instead of interleaved progress bars
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "a")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdcompress", *argv], cwd=REPO, stdout=out, stderr=out
    )
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def run(keys: list[str], data_root: str, sets: list[str], jobs: int = 1) -> None:
    """Run the configs, resuming each, at most ``jobs`` at a time, in the given order except
    that a compressed run starts only after the dense run it loads
    (``runtime.dense_checkpoint``) has finished, if that run is among ``keys`` (a
    from-scratch run starts at once and, should it reach its evaluate stage first, is rerun
    after it), and a run of :data:`REUSE` once its source has finished the stage it lends.
    With ``jobs > 1`` each run's output goes to ``runs/cifar10/<key>.log``."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    order = list(dict.fromkeys(keys))
    deps, late = {}, {}
    for k in order:
        start, evaluate = dependencies(k, sets)
        deps[k] = [d for d in start if d in order]
        late[k] = [d for d in evaluate if d in order]
    pending, running = list(order), {}
    finished: set[str] = set()
    failed: dict[str, str] = {}
    while pending or running:
        for k in [k for k in pending if any(d in failed for d in deps[k])]:
            pending.remove(k)
            failed[k] = f"skipped: {', '.join(d for d in deps[k] if d in failed)} failed"
        # (the reuse check reads a state file: only when a slot is free)
        free = len(running) < jobs
        ready = [
            k
            for k in pending
            if all(d in finished for d in deps[k]) and free and reuse_ready(k, sets)
        ]
        while ready and len(running) < jobs:
            k = ready.pop(0)
            pending.remove(k)
            argv = _argv(k, data_root, sets)
            log = REPO / "runs" / "cifar10" / f"{k}.log" if jobs > 1 else None
            where = f" > {log}" if log else ""
            print(f"== {k}: tdcompress {' '.join(argv)}{where}", flush=True)
            running[k] = _launch(k, argv, log)
        if not running:
            for k in pending:  # nothing runnable is left: waiting for a reuse source
                if k in REUSE:
                    src, stage = REUSE[k]
                    failed[k] = f"not started: {src} has not finished its {stage} stage"
                else:
                    failed[k] = f"not started: waiting for {', '.join(deps[k])}"
            break
        time.sleep(0.05 if jobs == 1 else 5.0)
        for k, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[k]
            if getattr(proc, "log_file", None) is not None:
                proc.log_file.close()
            if rc == 0:
                finished.add(k)
                print(f"== {k}: finished", flush=True)
            elif late[k] and not all(d in finished for d in late[k]):
                # a from-scratch run outran its dense run and stopped at its evaluate stage:
                # rerun it (every trained stage is kept) once that run has finished
                deps[k], late[k] = late[k], []
                pending.append(k)
                print(f"== {k}: exit code {rc}; reruns after {', '.join(deps[k])}", flush=True)
            else:
                failed[k] = f"exit code {rc}"
                print(f"== {k}: FAILED with exit code {rc}", flush=True)
    if failed:
        raise SystemExit(
            "runs that did not finish: " + "; ".join(f"{k} ({why})" for k, why in failed.items())
        )


# ------------------------------------------------------------------------------ collecting
def collect_run(key: str) -> dict[str, Any]:
    label, method, paper = RUNS[key]
    cfg = run_config(key)
    config = f"configs/cifar10/{key}.yaml"
    return run_row(key, label, method, paper, cfg, out_dir(cfg), config, shares_admm(key))


def run_row(
    key: str,
    label: str,
    method: str,
    paper: float | None,
    cfg: Config,
    run: Path,
    config: str,
    shared_admm: bool = False,
) -> dict[str, Any]:
    """The row of one run (``method``: dense, admm, dtf or scratch) from its folder ``run``
    (a run folder or its keep folder): status, epochs per phase, top-1, parameters, ratio,
    MACs, wall time and the per-epoch curve. ``shared_admm``: the folder's ADMM rows are
    another run's (not counted in the wall time)."""
    state = (
        json.loads((run / "state.json").read_text())["done"]
        if (run / "state.json").exists()
        else {}
    )
    recs = read_metrics(run / "metrics.jsonl", per_epoch=True)
    planned = (
        {"dense": cfg.dense.epochs}
        if method == "dense"
        else {"admm": cfg.admm.epochs, "finetune": cfg.finetune.epochs}
    )
    done_epochs = {ph: sum(1 for r in recs if r["phase"] == ph) for ph in planned}
    row: dict[str, Any] = {
        "key": key,
        "label": label,
        "method": method,
        "model": cfg.model.name,
        "format": None if method == "dense" else cfg.compress.format,
        "target_ratio": None if method == "dense" else cfg.compress.target_ratio,
        "config": config,
        "epochs": planned,
        "epochs_done": done_epochs,
        "paper_top1": paper,
        # (a run that took another's ADMM phase: its own epochs only, not the copied rows)
        "wall_seconds": sum(
            r.get("seconds", 0.0) for r in recs if not (shared_admm and r["phase"] == "admm")
        ),
        "curve": [
            {
                "phase": r["phase"],
                "epoch": r["epoch"],
                "test_acc": r["test_acc"],
                "train_loss": r["train_loss"],
                **({"primal": r["admm/primal"]} if "admm/primal" in r else {}),
            }
            for r in recs
        ],
    }
    if method == "dense":
        row["status"] = "done" if "train" in state else "running" if recs else "not started"
        if "train" in state:
            row.update(
                top1=state["train"]["test_acc"],
                params=state["train"]["params"],
                ratio=1.0,
                macs_reduction=1.0,
            )
        return row
    ev = state.get("evaluate")
    row["status"] = (
        "done"
        if ev and ev.get("finetuned_acc") is not None
        else ("running" if recs or state else "not started")
    )
    if "admm" in state and "residuals" in state["admm"]:
        row["admm_top1"] = state["admm"]["test_acc"]
        row["admm_primal"] = state["admm"]["residuals"].get("primal")
    if "decompose" in state:
        row["decomposed_top1"] = state["decompose"]["test_acc"]
    if "plan" in state:
        row["planned_ratio"] = state["plan"]["ratio"]
        row["macs_reduction"] = state["plan"]["macs_reduction"]
    if row["status"] == "done":
        row.update(
            top1=ev["finetuned_acc"],
            params=ev["compressed_params"],
            ratio=ev["dense_params"] / ev["compressed_params"],
            dense_params=ev["dense_params"],
            macs_reduction=ev["macs_reduction"],
        )
    return row


def _status(row: dict[str, Any]) -> str:
    """'done', or e.g. 'running (admm 3/20, finetune 0/10)'."""
    if row["status"] == "done":
        return "done"
    ep, done = row["epochs"], row["epochs_done"]
    phases = ", ".join(f"{k} {done[k]}/{ep[k]}" for k in ep if ep[k])
    return row["status"] + " (" + phases + ")"


def collect(recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows from the run folders; a finished recorded run keeps its row.

    Run folders are scratch space (a new machine or checkout starts without them), so a row in
    ``recorded`` (the previous ``quality-cifar10.json``) with status "done" is kept, marked
    ``"source": "recorded"``, with its recorded comparison with dense (or, recorded before
    its dense run finished, one with the dense run's recorded result). A different run of
    the same config found in its folder (other per-epoch curve) is a rerun: it is reported
    beside the recorded result (``"rerun"``: its status, and top-1 and the comparison with
    the dense run it started from once done), never in its place, so that a result changes
    only by editing the record. An unfinished recorded row is not kept (its epochs are gone
    with the folder).
    """
    kept = {
        r["key"]: {**{k: v for k, v in r.items() if k != "rerun"}, "source": "recorded"}
        for r in (recorded or {}).get("runs", [])
        if r.get("status") == "done" and r.get("key") in RUNS
    }
    rows = []
    for k in RUNS:
        fresh = collect_run(k)
        found = fresh["status"] != "not started"  # anything in its folder
        if k not in kept or (found and fresh["curve"] == kept[k].get("curve")):
            rows.append(fresh)  # new, or the recorded run itself still in its folder
            continue
        row = dict(kept[k])
        if found:
            row["rerun"] = {
                "status": _status(fresh),
                **{f: fresh[f] for f in ("top1", "params", "wall_seconds") if f in fresh},
            }
        rows.append(row)
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        d = by_key.get(dense_run(r["key"]) or "")
        if d is None or "top1" not in r:
            continue
        # a recorded row against the recorded dense result (kept if it has one); runs in
        # the folders against the dense model they started from (the dense rerun's, if any)
        started_from = d.get("rerun", {}).get("top1", d.get("top1"))
        if r.get("source") != "recorded" and started_from is not None:
            r["delta_vs_dense"] = r["top1"] - started_from
        elif "delta_vs_dense" not in r and "top1" in d:
            r["delta_vs_dense"] = r["top1"] - d["top1"]
        if "top1" in r.get("rerun", {}) and started_from is not None:
            r["rerun"]["delta_vs_dense"] = r["rerun"]["top1"] - started_from
    return {
        "dataset": "cifar10",
        "command": "python benchmarks/cifar10.py --run all --jobs 2 --data-root ../shared/data",
        "torch": torch.__version__,
        "paper_note": PAPER_NOTE,
        "speed": _loader_rows(),
        "runs": rows,
    }


def _loader_rows() -> list[dict[str, Any]] | None:
    p = REPO / "benchmarks" / "results" / "loader.json"
    return json.loads(p.read_text())["rows"] if p.exists() else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def result_cells(r: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """A row's table cells: vs dense (points), the paper's top-1, parameters, ratio (or the
    planned one) and MAC reduction; "-" where unknown."""
    delta = "-" if "delta_vs_dense" not in r else f"{100 * r['delta_vs_dense']:+.2f}"
    paper = "-" if r["paper_top1"] is None else f"{r['paper_top1']:.2f}"
    params = f"{r['params']:,}" if "params" in r else "-"
    ratio = (
        f"{r['ratio']:.2f}x"
        if "ratio" in r
        else (f"({r['planned_ratio']:.2f}x planned)" if "planned_ratio" in r else "-")
    )
    macs = f"{r['macs_reduction']:.2f}x" if r.get("macs_reduction") else "-"
    return delta, paper, params, ratio, macs


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# CIFAR-10: ResNet-20 and ResNet-32 at the paper's ratios (30- and 90-epoch budgets)",
        "",
        *command_block(
            doc["command"],
            "Each row is one config in `configs/cifar10/`; run them all (resumable; each "
            "compressed run after the dense run it loads) and rebuild this page with:",
        ),
        "| run | status | top-1 (%) | vs our dense | paper (%) | params | ratio | MACs red. "
        "| epochs (ADMM + ft) | wall (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in doc["runs"]:
        ep = r["epochs"]
        if r["method"] == "dense":
            epochs = f"{ep['dense']} dense"
        else:
            epochs = f"{ep['admm']} + {ep['finetune']}"
        status = _status(r)
        if "rerun" in r:
            rr = r["rerun"]
            status += f"; rerun {rr['status']}"
            if "top1" in rr:
                status += f" {100 * rr['top1']:.2f}"
            if "delta_vs_dense" in rr:
                status += f" ({100 * rr['delta_vs_dense']:+.2f})"
        delta, paper, params, ratio, macs = result_cells(r)
        lines.append(
            f"| {r['label']} | {status} | {_pct(r.get('top1'))} | {delta} | {paper} | {params} "
            f"| {ratio} | {macs} | {epochs} | {r['wall_seconds'] / 60:.0f} |"
        )
    lines += [
        "",
        doc["paper_note"],
        "",
        "Schedule (short CPU budget, the same for every run of a model; the configs hold every "
        "setting): dense baselines 30 epochs, SGD + Nesterov, lr 0.1 with one warm-up epoch "
        "and cosine decay, weight decay 5e-4, batch 128, random crop (4-pixel padding) + flip. "
        "ADMM runs start from that baseline: 20 ADMM epochs (lr 0.02 cosine; Z/U every 98 "
        "steps, rho 0.02 growing 1.05x per update up to 1), decompose, 10 fine-tuning epochs "
        "(lr 0.01 cosine; the 'fine-tune lr 0.002' row shares that ADMM phase and fine-tunes "
        "at 10x below the ADMM lr, the paper's convention; its run folder was seeded with a "
        "copy of that run's ADMM stage, which its config recomputes identically): 30 "
        "epochs after the dense "
        "model. The paper's dense references had 200 epochs; its text does not state the "
        "length of its ADMM and fine-tuning phases. TT-SVD + fine-tune: 30 fine-tuning "
        "epochs from "
        "the same baseline (lr 0.01 cosine). TT from scratch: the same TT architecture at "
        "random initialisation, 60 epochs with the dense optimizer (the baseline's 30 plus the "
        "same 30). The 'equal_ratio' row is the ADMM run with "
        "`compress.allocation: equal_ratio` (every convolution shrunk by about the same factor) "
        "instead of the paper's equal ranks; the 'ADMM lr 0.1' row runs its ADMM phase at the "
        "baseline's peak lr, as the authors' public code does (with `runtime.compile`). "
        "Rows marked '90-epoch budget' (issue 8's full "
        "budget) are the same "
        "configs with every phase 3x longer (and ADMM's rho ramp stretched to match, x1.0164 "
        "per update): dense 90, ADMM 60 + fine-tune 30, TT-SVD + "
        "fine-tune 90, from scratch 180; their compressed runs set `runtime.compile` "
        "(torch.compile of the training forward; speed only, 1.1-1.2x per step), the dense "
        "run is eager. The 'distillation in fine-tuning' row (not the paper's method) takes "
        "the train, plan, ADMM and decompose stages of the 90-epoch ADMM run "
        "(`--reuse-from`, identical settings) and fine-tunes for the same 30 epochs on "
        "0.3 CE + 0.7 T^2 KL(dense || TT) at T = 4; the 'fine-tune weight decay 1e-4' rows "
        "(30- and 90-epoch budgets) take the ADMM run's stages the same way and fine-tune with "
        "plain cross-entropy and weight decay 1e-4 instead of 5e-4 (the 6.8x TT model "
        "underfits: 92% training accuracy against the dense model's 98.8% at 90 epochs); the "
        "wall time of these and of the 'fine-tune lr 0.002' row counts their fine-tuning only "
        "(their curves too). A status with 'rerun' gives the recorded result in the row and "
        "a later run of the same config beside it, with its own comparison with dense (run "
        "folders are scratch space; the 2026-12-05 reruns of the 30-epoch ResNet-20 dense "
        "and ADMM runs, 2 threads one at a time, check that the configs reproduce on a fresh "
        "machine; runs started after them, such as the 30-epoch 'fine-tune weight decay "
        "1e-4' row, are compared with the rerun dense model). "
        "'vs our dense' compares each run with the dense run "
        "it starts from. First convolution and classifier stay dense (the paper's choice). "
        "bf16 autocast and channels_last throughout, 1 thread per run with runs side by side "
        "(the 90-epoch runs partly one at a time with 2 threads, `--set runtime.threads=2`: "
        "speed only) (the table's top-1 is "
        "the evaluate stage's, in fp32; the per-epoch curves are evaluated under bf16 and "
        "differ from it by up to ~0.1 point); wall times are sums of "
        "epoch times on the shared 2-core machine, often with 2-3 runs side by side.",
    ]
    lines += _speed_lines(doc.get("speed"))
    lines += ["", "![test accuracy per epoch](cifar10-curves.png)"]
    return "\n".join(lines) + "\n"


def _speed_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    out = [
        "",
        "Data loading against the training step (`python benchmarks/bench_loader.py`, "
        "1 thread, batch 128; `benchmarks/results/loader.json`):",
        "",
        "| case | images/s |",
        "|---|---:|",
    ]
    out += [f"| {r['case']} | {r['images_per_s']:,.0f} |" for r in rows]
    return out


def plot(doc: dict[str, Any], path: Path) -> str | None:
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: plot skipped"
    # one panel per model and budget that has curves
    panels = [
        (m, b)
        for m, b in (("resnet20", 30), ("resnet32", 30), ("resnet20", 90))
        if any(r["model"] == m and budget(r["key"]) == b and r["curve"] for r in doc["runs"])
    ] or [("resnet20", 30)]
    # one row per panel, the legend to the right of its panel (long run labels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4.0 * len(panels)), squeeze=False)
    axes = [a for row in axes for a in row]
    for ax, (model, b) in zip(axes, panels):
        runs = [
            r for r in doc["runs"] if r["model"] == model and budget(r["key"]) == b and r["curve"]
        ]
        for r in runs:
            # a run that took another's ADMM phase (REUSE) has that run's ADMM rows: draw
            # only its own fine-tuning, at the same epochs of the run
            shared = shares_admm(r["key"])
            pts = [
                (i, 100 * c["test_acc"])
                for i, c in enumerate(r["curve"], 1)
                if not (shared and c["phase"] == "admm")
            ]
            label = r["label"] + (" (fine-tuning only; ADMM phase as above)" if shared else "")
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                label=label,
                lw=1.4,
                ls="--" if r["method"] == "dense" else "-",
            )
        cuts = sorted({r["epochs"]["admm"] for r in runs if r["method"] == "admm"})
        for c in cuts:  # where ADMM runs decompose and start fine-tuning
            ax.axvline(c + 0.5, color="grey", lw=0.8, ls=":")
        where = f" (ADMM: decompose after {', '.join(map(str, cuts))})" if cuts else ""
        ax.set_title(f"{model}, {b}-epoch budget: test top-1 per epoch{where}", fontsize=9)
        ax.set_xlabel("epoch of the run (ADMM then fine-tune; dense: dense training)")
        ax.set_ylim(60, 95)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_ylabel("top-1 (%)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return None


def write(doc: dict[str, Any], results_dir: Path, docs_dir: Path) -> None:
    atomic_write_text(results_dir / "quality-cifar10.json", json.dumps(doc, indent=2))
    note = plot(doc, docs_dir / "cifar10-curves.png")
    md = markdown(doc) + (f"\n{note}\n" if note else "")
    atomic_write_text(docs_dir / "cifar10.md", md)


# ------------------------------------------------------------------------------ resume proof
def resume_proof(data_root: str, results_dir: Path, work: Path) -> dict[str, Any]:
    """Kill a real CIFAR-10 run mid-epoch, restart it, compare with an uninterrupted run."""
    import shutil

    key = "resnet20_tt_6.8x"
    small = [
        "data.train_subset=2560",
        "admm.epochs=3",
        "admm.every_steps=5",
        "finetune.epochs=1",
        "runtime.progress=false",
        "runtime.dense_checkpoint=null",
        "dense.epochs=1",
        "dense.optim.lr=0.05",
    ]

    def cmd(name: str) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "tdcompress",
            "pipeline",
            str(CONFIGS / f"{key}.yaml"),
            "--data-root",
            data_root,
            "--set",
            f"runtime.out_dir={work / name}",
        ]
        for s in small:
            argv += ["--set", s]
        return argv

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    subprocess.run(cmd("straight"), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    straight_s = time.time() - t0
    p = subprocess.Popen(cmd("killed"), cwd=REPO, stdout=subprocess.DEVNULL)
    ckpt = work / "killed" / "admm.ckpt.pt"
    while not ckpt.exists() and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.4 * straight_s / 8)  # into the next ADMM epoch
    killed_at = None
    if p.poll() is None:
        killed_at = torch.load(ckpt, weights_only=False)["epoch"]
        p.send_signal(signal.SIGKILL)
        p.wait()
    if killed_at is None:
        raise SystemExit("the run finished before it could be killed; rerun")
    state = json.loads((work / "killed" / "state.json").read_text())["done"]
    subprocess.run(cmd("killed"), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    a = json.loads((work / "straight" / "state.json").read_text())["done"]["evaluate"]
    b = json.loads((work / "killed" / "state.json").read_text())["done"]["evaluate"]
    wa = torch.load(work / "straight" / "finetuned.pt", weights_only=False)["model"]
    wb = torch.load(work / "killed" / "finetuned.pt", weights_only=False)["model"]
    res = {
        "config": f"configs/cifar10/{key}.yaml",
        "overrides": small,
        "killed_during": "admm" if "admm" not in state else "later stage",
        "killed_after_finished_admm_epochs": killed_at,
        "straight": a,
        "resumed": b,
        "metrics_identical": a == b,
        "weights_identical": all(  # (the factorized layers' records are dicts)
            torch.equal(wa[k], wb[k]) if isinstance(wa[k], torch.Tensor) else wa[k] == wb[k]
            for k in wa
        ),
    }
    atomic_write_text(results_dir / "cifar10-resume-proof.json", json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", metavar="KEY", help=f"'all' or some of {list(RUNS)}")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs side by side (each config uses 1 thread; 2 suits a 2-core machine)",
    )
    ap.add_argument("--resume-proof", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--docs-dir", type=Path, default=REPO / "docs" / "results")
    args = ap.parse_args(argv)
    if args.run:
        keys = list(RUNS) if args.run == ["all"] else args.run
        bad = [k for k in keys if k not in RUNS]
        if bad:
            raise SystemExit(f"--run: unknown runs {bad}; known: {list(RUNS)} or 'all'")
        run(keys, args.data_root, args.set, jobs=args.jobs)
    if args.resume_proof:
        res = resume_proof(args.data_root, args.results_dir, REPO / "runs" / "cifar10-resume-proof")
        print(json.dumps({k: res[k] for k in ("metrics_identical", "weights_identical")}))
    previous = args.results_dir / "quality-cifar10.json"
    doc = collect(json.loads(previous.read_text()) if previous.exists() else None)
    write(doc, args.results_dir, args.docs_dir)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
