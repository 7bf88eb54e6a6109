"""Equal tuning for ADMM and its two baselines on LeNet-5 (issue 19): tune, then compare.

The question: at equal compression and budget, does ADMM -> TT-decompose -> fine-tune beat
TT-SVD of a normally trained model + fine-tuning (``dtf``) and the TT model trained from
scratch (``scratch``) once each method has had the same tuning effort? Our earlier records
(docs/results/quality-mnist.md) shared one untuned setting and the test set was the only
held-out split.

Protocol (every run is a ``python -m tdcompress`` command; the JSON keeps each one):

- Settings: ``mnist-30x``, ``mnist-60x``, ``fashion-30x`` (LeNet-5, TT of conv2 and fc1 at
  a whole-model parameter ratio of 30 or 60, as quality.py plans them). Base config:
  configs/mnist_lenet5_tt_small.yaml; every run holds ``data.validation=5000`` training
  images out (one fixed draw) and trains on the other 55,000 (bf16 autocast, channels_last,
  1 thread, as the earlier records).
- Dense model: one per (dataset, seed), 6 epochs (Fashion-MNIST: dense lr 0.02, as 0.05
  diverges there), trained once; every compressed run of that seed starts from it
  (``runtime.dense_checkpoint``). Its epochs are not part of the budget.
- Budget B (``--budgets``, default 6 18 54) = training epochs after the dense model:
  ADMM: admm + finetune epochs (the candidate's ``split`` is the ADMM share); dtf: B
  fine-tuning epochs of the TT-SVD of the dense model; scratch: 6 + B epochs from random
  initialisation, i.e. the same TOTAL number of epochs as the other two including their
  dense model. Why: scratch needs no dense model, and the dense model's 6 epochs are part of
  what ADMM and dtf cost; giving scratch only B would compare it at less compute. This is
  also quality.py's convention, so the numbers stay comparable with the records the issue
  cites. (If the dense model is taken as free, e.g. downloaded, scratch at B epochs is the
  comparison; it is not run here.)
- Tuning: per setting and method the same number K (``--k``, default 4) of candidate
  configurations (the first K rows of ``ADMM_GRID`` and ``TRAINED_GRIDS``: a column per
  knob, turned into ``--set`` overrides), trained at the middle budget with seed 0; the
  winner is the highest validation top-1 (ties: the earlier row). Row 1 of every grid is
  the shared setting of the earlier records, so the winner is at least as good on
  validation. ADMM's row A2 is paper-like (small constant rho, Z/U once per epoch), for
  the budget question; A4 is a variant of our own design ("ours": rho grows geometrically
  from rho to rho_max over the first 3/4 of the ADMM phase's Z/U updates, whatever the
  budget; the driver computes ``admm.rho_growth`` per run).
- Final: each winner at every budget with seeds 0, 1, 2 (``--seeds``), with
  ``data.final_test=true``: the evaluate stage adds one test-set measurement of the dense and
  fine-tuned models; nothing else reads the test set. The final of the middle budget and
  the tuning seed is the winner's tuning run itself (the same settings, so its stages are
  taken with ``--reuse-from`` and only evaluated again; rerunning it would repeat it: the
  runs are deterministic). Its test number carries the selection on seed 0's validation
  score, alike for every method (K candidates each); seeds 1 and 2 do not.

This script runs what is not finished (``--jobs`` at a time, 1 thread each, dense runs
first, every final once its method's tuning has a winner; every run resumes per epoch after
a kill), then collects into ``benchmarks/results/tuning-lenet.json``,
``docs/results/lenet_tuning.md`` and ``docs/results/lenet_tuning.png``. Results recorded in
the JSON are kept when their run folders are gone. A run that diverges (non-finite loss)
is recorded as ``diverged`` and loses the selection.

    python benchmarks/tuning_lenet.py --plan                            # runs, epochs, cost
    python benchmarks/tuning_lenet.py --run --jobs 2 --data-root DATA   # run (resumes), collect
    python benchmarks/tuning_lenet.py --run --phase tuning --data-root DATA
    python benchmarks/tuning_lenet.py                                   # collect only
    python benchmarks/tuning_lenet.py --smoke --out-dir /tmp/tl --data-root DATA  # a tiny one

Design notes. The runs are ``tdcompress`` subprocesses in one queue (benchmarks/_runs.py),
not quality.py's in-process pipelines: two run side by side, each is reproducible from its
recorded command, and a final's candidate is filled in when it starts, so the finals of a
method whose tuning is done start while the other methods still tune. The dense model
reaches a run as ``runtime.dense_checkpoint`` (as fsdd.py does) rather than by a link.
quality.py's ``method_sets`` builds each method (so dtf and scratch get their budgets as
there) and ``epochs_trained`` records the epochs. The test set is read through
``data.final_test`` (the pipeline's evaluate stage) because a run folder's training-data
settings cannot change after training (``data.validation`` is guarded).

Cost (``--plan``): seconds per epoch of the 55,000 training images, 1 thread, bf16 +
channels_last, validation pass included (``EPOCH_SECONDS``), measured here on 2026-12-07 on
5,000- and 20,000-image subsets with both cores busy with other trainings (load ~4 on 2
cores): dense 21, ADMM 22 (30x) / 26 (60x), TT training 24 (30x) / 14 (60x); plus ~15 s per
run (start, data, plan, decomposition, evaluation; the smoke runs took ~11 s each). The
default campaign: 123 runs (6 dense, 36 tuning, 81 final, of which 9 are tuning runs
evaluated again), 2,844 epochs, ~17 h on one core at those rates, ~9 h with ``--jobs 2``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import done_stages, run_queue, run_record  # noqa: E402
from quality import epochs_trained, method_sets, middle_ratio  # noqa: E402
from tdcompress.config import Config, load_config  # noqa: E402
from tdcompress.report import command_block, pyplot, save_figure  # noqa: E402
from tdcompress.train.checkpoint import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/mnist_lenet5_tt_small.yaml"  # (relative to the repository root)
RUNS = "runs/tuning_lenet"
RESULTS = REPO / "benchmarks" / "results" / "tuning-lenet.json"
PAGE = REPO / "docs" / "results" / "lenet_tuning.md"
FIGURE = REPO / "docs" / "results" / "lenet_tuning.png"
COMMAND = "python benchmarks/tuning_lenet.py --run --jobs 2 --data-root DATA"

VALIDATION = 5000
TRAIN_SIZE = 60_000  # MNIST and Fashion-MNIST
DENSE_EPOCHS = 6
BUDGETS = (6, 18, 54)
SEEDS = (0, 1, 2)
TUNING_SEED = 0
K = 4
PHASES = ("tuning", "final", "all")
METHODS = ("admm", "dtf", "scratch")
LABELS = {"admm": "ADMM -> TT", "dtf": "TT-SVD + fine-tune", "scratch": "TT from scratch"}
# every run: the held-out split, the dense length, the earlier records' runtime settings
SHARED_SETS = (
    f"data.validation={VALIDATION}",
    f"dense.epochs={DENSE_EPOCHS}",
    "runtime.channels_last=true",
    "runtime.amp=bf16",
    "runtime.progress=false",
    "runtime.threads=1",
)
DATASET_SETS = {"mnist": (), "fashion_mnist": ("dense.optim.lr=0.02",)}  # 0.05 diverges there
SMOKE_SETS = ("data.train_subset=1000", "dense.epochs=1")


@dataclass(frozen=True)
class Setting:
    dataset: str
    ratio: float


SETTINGS = {
    "mnist-30x": Setting("mnist", 30),
    "mnist-60x": Setting("mnist", 60),
    "fashion-30x": Setting("fashion_mnist", 30),
}


@dataclass(frozen=True)
class Candidate:
    """One configuration tried in the tuning: ``sets`` (``--set`` overrides on top of the
    method's), for ADMM the share ``split`` of the budget in the ADMM phase and, for our
    budget-scaled rho, ``rho_reach``: the fraction of the phase's Z/U updates after which
    rho reaches ``admm.rho_max`` (the driver computes ``admm.rho_growth``)."""

    name: str
    label: str
    sets: tuple[str, ...] = ()
    split: float | None = None
    rho_reach: float | None = None


OURS = "ours"  # rho growth column: computed per run so that rho reaches rho_max at RHO_REACH
RHO_REACH = 0.75  # ... of the ADMM phase's Z/U updates, whatever the budget
DENSE_LR = "dense"  # lr column: the dataset's dense learning rate (0.05; Fashion-MNIST 0.02)

# The candidates, in order: the first K of each grid are tried. Row 1 of each is the shared
# setting of the earlier records. Every knob a method's tuning may move is a column, so a
# row is the whole setting of its trained phases (anything else: the config file).
# fmt: off
ADMM_GRID = (
    # name  ADMM share  ADMM lr  fine-tune lr  rho    rho growth  rho_max  Z/U every (steps)
    ("A1",  2 / 3,      0.01,    0.002,        0.1,   1.05,       5,       50),
    ("A2",  2 / 3,      0.01,    0.002,        1e-3,  1,          1e-3,    None),  # per epoch
    ("A3",  1 / 2,      0.02,    0.01,         0.1,   1.05,       5,       50),
    ("A4",  1 / 2,      0.02,    0.01,         0.05,  OURS,       10,      25),
    ("A5",  1 / 3,      0.01,    0.02,         0.1,   1.1,        5,       25),
    ("A6",  2 / 3,      0.01,    0.002,        0.02,  1,          0.02,    None),  # per epoch
)
# the one trained phase of TT-SVD + fine-tune (B epochs) and TT from scratch (6 + B epochs)
TRAINED_GRIDS = {
    "dtf": (
        # name  optimizer  lr        weight decay  schedule  warm-up epochs
        ("D1",  "sgd",     0.002,    0,            "cosine", 0),
        ("D2",  "sgd",     0.01,     0,            "cosine", 0),
        ("D3",  "sgd",     0.03,     5e-4,         "cosine", 1),
        ("D4",  "sgd",     0.01,     5e-4,         "step",   0),
        ("D5",  "sgd",     0.005,    5e-4,         "cosine", 0),
        ("D6",  "sgd",     0.05,     5e-4,         "cosine", 1),
    ),
    "scratch": (
        ("S1",  "sgd",     DENSE_LR, 5e-4,         "cosine", 0),
        ("S2",  "sgd",     0.01,     5e-4,         "cosine", 0),
        ("S3",  "sgd",     0.05,     1e-4,         "cosine", 1),
        ("S4",  "sgd",     0.1,      5e-4,         "cosine", 2),
        ("S5",  "sgd",     0.02,     5e-4,         "step",   0),
        ("S6",  "adam",    0.001,    0,            "cosine", 0),
    ),
}
# fmt: on
ADMM_COLUMNS = (
    "ADMM share",
    "ADMM lr",
    "fine-tune lr",
    "rho",
    "rho growth",
    "rho_max",
    "Z/U every",
)
TRAINED_COLUMNS = ("optimizer", "lr", "weight decay", "schedule", "warm-up epochs")
NOTES = {
    "A1": "the earlier records' setting (the config file)",
    "A2": "paper-like: small constant rho, Z/U once per epoch",
    "A3": "higher learning rates, half the budget in ADMM",
    "A4": f"ours: rho grows from 0.05 to 10 over the first {RHO_REACH:g} of the ADMM "
    "phase's Z/U updates, whatever the budget (the growth factor is computed per run)",
    "A5": "short ADMM, long fine-tuning at a high rate, faster rho growth",
    "A6": "paper-like with the best constant rho of the rho sensitivity study (0.02)",
    "D1": "the earlier records' setting (the config's fine-tuning optimizer)",
    "D2": "5x the learning rate",
    "D3": "15x the learning rate, warm-up, weight decay",
    "D4": "step schedule (x0.1 at 50% and 75%), weight decay",
    "D5": "2.5x the learning rate, weight decay",
    "D6": "the dense optimizer (lr 0.05) with warm-up",
    "S1": "the earlier records' setting: the dense optimizer (lr 0.05; Fashion-MNIST 0.02)",
    "S2": "a 5x lower learning rate",
    "S3": "less weight decay, warm-up",
    "S4": "2x the learning rate, 2 warm-up epochs",
    "S5": "step schedule (x0.1 at 50% and 75%)",
    "S6": "Adam",
}


def _admm_candidate(row: tuple[Any, ...]) -> Candidate:
    name, split, admm_lr, ft_lr, rho, growth, rho_max, every = row
    sets = (
        f"admm.optim.lr={admm_lr:g}",
        f"finetune.optim.lr={ft_lr:g}",
        f"admm.rho={rho:g}",
        f"admm.rho_max={rho_max:g}",
        f"admm.every_steps={'null' if every is None else every}",
    )
    if growth != OURS:
        sets += (f"admm.rho_growth={growth:g}",)
    reach = RHO_REACH if growth == OURS else None
    return Candidate(name, NOTES[name], sets, split=split, rho_reach=reach)


def _trained_candidate(row: tuple[Any, ...]) -> Candidate:
    name, optimizer, lr, wd, schedule, warmup = row
    sets = (f"finetune.optim.name={optimizer}",)
    if lr != DENSE_LR:  # (scratch's base is already the dense optimizer)
        sets += (f"finetune.optim.lr={lr:g}",)
    sets += (
        f"finetune.optim.weight_decay={wd:g}",
        f"finetune.optim.schedule={schedule}",
        f"finetune.optim.warmup_epochs={warmup}",
    )
    return Candidate(name, NOTES[name], sets)


GRIDS: dict[str, tuple[Candidate, ...]] = {
    "admm": tuple(_admm_candidate(r) for r in ADMM_GRID),
    **{m: tuple(_trained_candidate(r) for r in g) for m, g in TRAINED_GRIDS.items()},
}
K_MAX = min(len(g) for g in GRIDS.values())

# seconds per epoch of 55,000 images (see the module docstring) and per run besides
EPOCH_SECONDS = {"dense": 21.0, "admm": {30: 22.0, 60: 26.0}, "finetune": {30: 24.0, 60: 14.0}}
RUN_SECONDS = 15.0


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class Campaign:
    """The runs of one selection (settings, budgets, seeds, K) under the run root ``root``
    (relative to the repository root, or absolute); ``extra``: ``--set`` overrides added to
    every run after the shared ones (``--smoke``); ``recorded``: results of the JSON by id."""

    settings: tuple[str, ...] = tuple(SETTINGS)
    budgets: tuple[int, ...] = BUDGETS
    seeds: tuple[int, ...] = SEEDS
    k: int = K
    root: str = RUNS
    data_root: str = "DATA"
    extra: tuple[str, ...] = ()
    recorded: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.recorded = dict(self.recorded or {})
        self._winners: dict[tuple[str, str], Candidate] = {}
        self._done: dict[str, dict[str, Any]] = {}  # results of finished run folders, by id

    # ------------------------------------------------------------------ the run list
    @property
    def tuning_budget(self) -> int:
        """The middle budget (the upper median), where the candidates are compared."""
        return int(middle_ratio(list(self.budgets)))

    @property
    def dense_epochs(self) -> int:
        """The dense models' epochs (also the part of TT from scratch's beyond B)."""
        return load_config(REPO / CONFIG, self.run_sets(self.dense_runs()[0])).dense.epochs

    @property
    def log_dir(self) -> Path:
        return REPO / self.root / "logs"

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(SETTINGS[s].dataset for s in self.settings))

    def dense_runs(self) -> list[dict[str, Any]]:
        seeds = list(dict.fromkeys([TUNING_SEED, *self.seeds]))
        return [
            self._run("dense", ds, None, "dense", None, None, s)
            for ds in self.datasets()
            for s in seeds
        ]

    def tuning_runs(self) -> list[dict[str, Any]]:
        b = self.tuning_budget
        return [
            self._run("tuning", SETTINGS[st].dataset, st, m, c.name, b, TUNING_SEED)
            for st in self.settings
            for m in METHODS
            for c in GRIDS[m][: self.k]
        ]

    def final_runs(self) -> list[dict[str, Any]]:
        """The finals, by budget, then setting, seed and method (the short ones first);
        their candidate is filled in once the tuning has a winner (:meth:`resolve`)."""
        out = []
        for b in sorted(self.budgets):
            for st in self.settings:
                for s in self.seeds:
                    for m in METHODS:
                        out.append(self._run("final", SETTINGS[st].dataset, st, m, None, b, s))
        for r in out:
            self.resolve(r)
        return out

    def runs(self, phase: str = "all") -> list[dict[str, Any]]:
        """Dense runs, then the tuning runs, then the finals (``phase``: which of the last two)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")
        out = self.dense_runs()
        if phase in ("tuning", "all"):
            out += self.tuning_runs()
        if phase in ("final", "all"):
            out += self.final_runs()
        return out

    def _run(
        self,
        phase: str,
        dataset: str,
        setting: str | None,
        method: str,
        config: str | None,
        budget: int | None,
        seed: int,
    ) -> dict[str, Any]:
        r = dict(phase=phase, dataset=dataset, setting=setting, method=method, config=config)
        r.update(budget=budget, seed=seed, dense_dir=f"{self.root}/dense/{dataset}/s{seed}")
        if phase == "dense":
            r["id"] = f"dense/{dataset}/s{seed}"
        elif phase == "tuning":
            r["id"] = f"tune/{setting}/{method}/{config}/b{budget}"
        else:
            r["id"] = f"final/{setting}/{method}/?/b{budget}/s{seed}"  # (resolve fills ?)
        r["out_dir"] = f"{self.root}/{r['id']}"
        return r

    def path(self, r: dict[str, Any]) -> Path:
        return REPO / r["out_dir"]

    def candidate(self, r: dict[str, Any]) -> Candidate:
        (c,) = [c for c in GRIDS[r["method"]] if c.name == r["config"]]
        return c

    def tuning_run(self, r: dict[str, Any]) -> dict[str, Any]:
        """The tuning run of final ``r``'s (resolved) candidate."""
        ds = SETTINGS[r["setting"]].dataset
        return self._run(
            "tuning", ds, r["setting"], r["method"], r["config"], self.tuning_budget, TUNING_SEED
        )

    # ------------------------------------------------------------------ commands
    def run_sets(self, r: dict[str, Any]) -> list[str]:
        """Every ``--set`` override of run ``r`` (its config: ``CONFIG`` plus these)."""
        common, own = self._sets(r)
        return common + own

    def overrides(self, r: dict[str, Any]) -> list[str]:
        """The candidate's part of :meth:`run_sets` as run ``r`` runs it (ADMM: with the
        budget's split into epochs and, for our budget-scaled rho, the growth factor)."""
        return self._sets(r)[1]

    def _sets(self, r: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(the setting's and method's overrides, the candidate's)."""
        sets = [f"data.dataset={r['dataset']}", *SHARED_SETS, *DATASET_SETS[r["dataset"]]]
        sets += [f"seed={r['seed']}", *self.extra]
        if r["phase"] == "dense":
            return sets, []
        if r["config"] is None:
            raise ValueError(f"run {r['id']}: its tuning has no winner yet")
        b = r["budget"]
        sets += [
            f"compress.target_ratio={SETTINGS[r['setting']].ratio:g}",
            f"runtime.dense_checkpoint={r['dense_dir']}/dense.pt",
        ]
        if r["phase"] == "final":
            sets.append("data.final_test=true")
        base = load_config(REPO / CONFIG, [*sets, f"admm.epochs={b}", "finetune.epochs=0"])
        sets += method_sets(r["method"], base)  # dtf: B fine-tuning epochs; scratch: 6 + B
        c = self.candidate(r)
        own = list(c.sets)
        if r["method"] == "admm":
            a = min(b - 1, max(1, round(c.split * b)))
            own += [f"admm.epochs={a}", f"finetune.epochs={b - a}"]
            if c.rho_reach is not None:
                cfg = load_config(REPO / CONFIG, sets + own)
                own.append(f"admm.rho_growth={rho_growth(cfg, c.rho_reach):.6g}")
        return sets, own

    def command(
        self, r: dict[str, Any], reuse: bool | None = None, data_root: str | None = None
    ) -> list[str]:
        """The ``tdcompress`` command of run ``r`` (from the repository root; ``data_root``:
        default the campaign's). A final of the tuning budget and seed takes the finished
        stages of its tuning run (``reuse``: None = when that run folder has evaluated)."""
        stage = "train" if r["phase"] == "dense" else "pipeline"
        root = self.data_root if data_root is None else data_root
        cmd = ["tdcompress", stage, CONFIG, "--data-root", root, "--out-dir", r["out_dir"]]
        for s in self.run_sets(r):
            cmd += ["--set", s]
        if self.reused(r):
            src = self.tuning_run(r)
            if reuse is None:
                reuse = "evaluate" in done_stages(self.path(src))
            if reuse:
                cmd += ["--reuse-from", src["out_dir"]]
        return cmd

    # ------------------------------------------------------------------ state
    def _diverged(self, r: dict[str, Any]) -> str | None:
        """The error line of a run that stopped on a non-finite loss (its log), else None."""
        log = self.log_dir / (r["id"].replace("/", "_") + ".log")
        if not log.is_file():
            return None
        errors = [ln for ln in log.read_text().splitlines() if ln.startswith("tdcompress: error:")]
        return errors[-1] if errors and "diverged" in errors[-1] else None

    def collect_run(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """The result of run ``r`` from its run folder (finished or diverged), else None."""
        if r["config"] is None and r["phase"] == "final":
            return None
        if r["id"] in self._done:  # (a finished run folder does not change)
            return self._done[r["id"]]
        out = self.path(r)
        done = done_stages(out)
        stage = "train" if r["phase"] == "dense" else "evaluate"
        ok = stage in done and (r["phase"] != "final" or "test" in done[stage])
        error = None if ok else self._diverged(r)
        if not ok and error is None:
            return None
        cfg = load_config(REPO / CONFIG, self.run_sets(r))
        reused = done.get("finetune", {}).get("reused_from")
        res: dict[str, Any] = {
            "id": r["id"],
            "phase": r["phase"],
            "dataset": r["dataset"],
            "setting": r["setting"],
            "method": r["method"],
            "config": r["config"],
            "overrides": None if r["config"] is None else self.overrides(r),
            "budget": r["budget"],
            "seed": r["seed"],
            "epochs": epochs_trained(r["method"], cfg, cfg),
            "status": "ok" if ok else "diverged",
            "val_top1": None,
            "test_top1": None,
            "command": shlex.join(self.command(r, reuse=reused is not None, data_root="DATA")),
        }
        if reused:
            res["reused_from"] = (
                str(Path(reused).relative_to(REPO)) if REPO in Path(reused).parents else reused
            )
        self._done[r["id"]] = res
        if error:
            res["error"] = error
            return res
        rec = run_record(out)
        res["wall_seconds"] = rec["wall_seconds"]
        if r["phase"] == "dense":
            res["val_top1"] = _pct(done["train"]["test_acc"])
            return res
        ev = done["evaluate"]
        if not ev["evaluated_on"].startswith("validation"):
            raise ValueError(
                f"run {r['id']} was evaluated on {ev['evaluated_on']!r}, not validation"
            )
        res.update(
            val_top1=_pct(ev["finetuned_acc"]),
            val_admm_top1=_pct(ev["admm_acc"]),
            val_decomposed_top1=_pct(ev["decomposed_acc"]),
            params=ev["compressed_params"],
            ratio=ev["dense_params"] / ev["compressed_params"],
        )
        if r["phase"] == "final":
            res["test_top1"] = _pct(ev["test"]["finetuned_acc"])
            res["dense_test_top1"] = _pct(ev["test"]["dense_acc"])
        return res

    def result(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """Run ``r``'s result: from its run folder, else as recorded in the JSON."""
        if r["phase"] == "final" and not self.resolve(r):
            return None
        return self.collect_run(r) or self.recorded.get(r["id"])

    def finished(self, r: dict[str, Any]) -> bool:
        return self.result(r) is not None

    def winner(self, setting: str, method: str) -> Candidate | None:
        """The candidate with the highest validation top-1 once all K tuning runs of
        (setting, method) have a result (diverged runs lose; ties: the earlier one)."""
        key = (setting, method)
        if key in self._winners:
            return self._winners[key]
        runs = [r for r in self.tuning_runs() if (r["setting"], r["method"]) == key]
        got = [self.result(r) for r in runs]
        if any(g is None for g in got):
            return None
        best = select([(r["config"], g["val_top1"]) for r, g in zip(runs, got)])
        if best is None:
            return None
        self._winners[key] = next(c for c in GRIDS[method] if c.name == best)
        return self._winners[key]

    def resolve(self, r: dict[str, Any]) -> bool:
        """Fill in final ``r``'s candidate (id and run folder) once its tuning has a winner."""
        if r["phase"] != "final" or r["config"] is not None:
            return True
        w = self.winner(r["setting"], r["method"])
        if w is None:
            return False
        r["config"] = w.name
        r["id"] = f"final/{r['setting']}/{r['method']}/{w.name}/b{r['budget']}/s{r['seed']}"
        r["out_dir"] = f"{self.root}/{r['id']}"
        return True

    def ready(self, r: dict[str, Any]) -> bool:
        """A dense run at once; the others once their dense model is trained; a final once
        its method's tuning has a winner."""
        if r["phase"] == "dense":
            return True
        if "train" not in done_stages(REPO / r["dense_dir"]):
            return False
        return self.resolve(r)

    # ------------------------------------------------------------------ running
    def run(self, phase: str, jobs: int) -> None:
        """Run every unfinished run of ``phase`` (dense runs first; a final once its
        method's winner is known), ``jobs`` at a time. Runs that diverge are results
        (``diverged``), not failures; any other failure raises after the rest have run."""
        if phase == "final":
            missing = [
                f"{st}/{m}" for st in self.settings for m in METHODS if self.winner(st, m) is None
            ]
            if missing:
                raise SystemExit(
                    f"--phase final: no tuning winner yet for {missing}: run --phase tuning "
                    "(or --phase all) first"
                )
        todo = [r for r in self.runs(phase) if r["phase"] != "dense" and not self.finished(r)]
        # a dense model is needed as a file (not as a record) while a run starts from it
        needed = {r["dense_dir"] for r in todo}
        dense = [r for r in self.dense_runs() if r["out_dir"] in needed]
        todo = [r for r in dense if self.collect_run(r) is None] + todo
        try:
            run_queue(
                todo,
                lambda r: self.command(r)[1:],
                self.ready,
                lambda r: self.collect_run(r) is not None,
                cwd=REPO,
                log_dir=self.log_dir,
                jobs=jobs,
                tag="tuning_lenet",
            )
        except RuntimeError as e:
            bad = [r["id"] for r in todo if self.collect_run(r) is None]
            if bad:
                raise RuntimeError(f"{e}; unfinished: {bad}") from None
        diverged = [r["id"] for r in todo if (self.result(r) or {}).get("status") == "diverged"]
        if diverged:
            print(f"[tuning_lenet] diverged (recorded as such): {diverged}", flush=True)

    # ------------------------------------------------------------------ cost
    def reused(self, r: dict[str, Any]) -> bool:
        """Whether final ``r`` is its candidate's tuning run (the tuning budget and seed)."""
        return r["phase"] == "final" and (r["budget"], r["seed"]) == (
            self.tuning_budget,
            TUNING_SEED,
        )

    def estimate(self, r: dict[str, Any]) -> tuple[dict[str, int], float]:
        """(epochs this run trains per phase, estimated seconds) of run ``r``; a final
        whose winner is not known yet is costed as the costliest of its K candidates, the
        final that is a tuning run as an evaluation."""
        if r["phase"] == "final" and r["config"] is None:
            options = [self.estimate({**r, "config": c.name}) for c in GRIDS[r["method"]][: self.k]]
            return max(options, key=lambda x: x[1])
        cfg = load_config(REPO / CONFIG, self.run_sets(r))
        ep = epochs_trained(r["method"], cfg, cfg)
        if r["phase"] == "dense":
            return {"dense": ep["dense"], "admm": 0, "finetune": 0}, (
                RUN_SECONDS + ep["dense"] * EPOCH_SECONDS["dense"]
            )
        own = {"dense": 0, "admm": ep["admm"], "finetune": ep["finetune"]}
        if self.reused(r):
            return own, RUN_SECONDS
        ratio = int(SETTINGS[r["setting"]].ratio)
        secs = sum(own[ph] * EPOCH_SECONDS[ph][ratio] for ph in ("admm", "finetune"))
        return own, RUN_SECONDS + secs

    def plan_text(self, phase: str, jobs: int) -> str:
        """Every run of ``phase`` with the epochs it trains, its estimated seconds and state;
        totals per phase and the wall time left at ``jobs`` runs side by side."""
        rows = [f"{'run':<44} {'epochs: dense/admm/finetune':<28} {'est. s':>7}  state"]
        total: dict[str, list[float]] = {}
        for r in self.runs(phase):
            ep, secs = self.estimate(r)
            res = self.result(r)
            state = "todo" if res is None else res["status"]
            if self.reused(r):
                state += " (the winner's tuning run, evaluated on test)"
            elif r["phase"] == "final" and r["config"] is None:
                state += " (winner not known yet: its costliest candidate)"
            eps = f"{ep['dense']}/{ep['admm']}/{ep['finetune']}"
            rows.append(f"{r['id']:<44} {eps:<28} {secs:>7.0f}  {state}")
            t = total.setdefault(r["phase"], [0, 0, 0.0, 0.0])
            t[0] += 1
            t[1] += 0 if self.reused(r) else sum(ep.values())
            t[2] += secs
            t[3] += secs if res is None else 0.0
        rows.append("")
        for ph, (n, e, s, left) in total.items():
            rows.append(
                f"{ph:<7} {n:>4} runs {e:>6.0f} epochs  {s / 3600:6.1f} h on one core"
                f"  (left: {left / 3600:.1f} h)"
            )
        n, e, s, left = (sum(t[i] for t in total.values()) for i in range(4))
        rows.append(
            f"all     {n:>4} runs {e:>6.0f} epochs  {s / 3600:6.1f} h on one core; left "
            f"{left / 3600:.1f} h, about {left / 3600 / jobs:.1f} h with --jobs {jobs} (per-epoch "
            "costs measured with both cores busy: see the module docstring)"
        )
        return "\n".join(rows)


def rho_growth(cfg: Config, reach: float) -> float:
    """The factor per Z/U update that takes rho from ``admm.rho`` to ``admm.rho_max`` after
    ``reach`` of the ADMM phase's updates (one every ``admm.every_steps`` optimizer steps)."""
    if not cfg.admm.every_steps:
        raise ValueError("a budget-scaled rho needs admm.every_steps (an int), got null")
    n = TRAIN_SIZE - cfg.data.validation
    if cfg.data.train_subset:
        n = min(n, cfg.data.train_subset)
    steps = math.ceil(n / cfg.data.batch_size) * cfg.admm.epochs
    updates = max(1.0, reach * (steps // cfg.admm.every_steps))
    return (cfg.admm.rho_max / cfg.admm.rho) ** (1 / updates)


def select(scores: Sequence[tuple[str, float | None]]) -> str | None:
    """The name with the highest score (None: diverged, never chosen); ties go to the
    earliest; None when every candidate diverged."""
    best = None
    for name, score in scores:
        if score is not None and (best is None or score > best[1]):
            best = (name, score)
    return None if best is None else best[0]


# ---------------------------------------------------------------------- summaries
def tuning_table(results: Sequence[dict[str, Any]], camp: Campaign) -> list[dict[str, Any]]:
    """One row per tuning run of the selection: setting, method, candidate, validation
    top-1, status, wall seconds and whether it won."""
    by_id = {r["id"]: r for r in results}
    rows = []
    for r in camp.tuning_runs():
        got = by_id.get(r["id"])
        w = camp.winner(r["setting"], r["method"])
        rows.append(
            {
                "setting": r["setting"],
                "method": r["method"],
                "config": r["config"],
                "status": "not run" if got is None else got["status"],
                "val_top1": None if got is None else got["val_top1"],
                "wall_seconds": None if got is None else got.get("wall_seconds"),
                "chosen": w is not None and w.name == r["config"],
            }
        )
    return rows


def summarise(results: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Test top-1 of the finals: mean and standard deviation over seeds per (setting,
    method, budget) (``finals``), the dense models' per dataset (``dense``), and ADMM
    minus each baseline paired by seed (``paired``)."""
    finals: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["phase"] != "final":
            continue
        key = f"{r['setting']}/{r['method']}/b{r['budget']}"
        row = finals.setdefault(
            key,
            {
                "setting": r["setting"],
                "method": r["method"],
                "budget": r["budget"],
                "config": r["config"],
                "test": {},
                "val": {},
                "wall": {},
                "diverged": [],
                "epochs": r["epochs"],
            },
        )
        if r["status"] != "ok":  # (diverged: no accuracy, left out of the mean and pairs)
            row["diverged"].append(r["seed"])
            continue
        row["test"][str(r["seed"])] = r["test_top1"]
        row["val"][str(r["seed"])] = r["val_top1"]
        row["wall"][str(r["seed"])] = r.get("wall_seconds")
    for row in finals.values():
        values = list(row["test"].values())
        row["mean"], row["std"] = _mean_std(values) if values else (None, None)
        row["n"], row["of"] = len(values), len(seeds)
    dense: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["phase"] == "final" and r["status"] == "ok" and r.get("dense_test_top1") is not None:
            dense.setdefault(r["dataset"], {})[str(r["seed"])] = r["dense_test_top1"]
    dense_rows = {
        ds: dict(zip(("mean", "std"), _mean_std(list(v.values()))), values=v, n=len(v))
        for ds, v in dense.items()
    }
    return {"finals": finals, "dense": dense_rows, "paired": paired(finals)}


def paired(finals: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """ADMM minus each baseline (points), paired by seed, per setting and budget: mean and
    standard deviation of the differences, ADMM's wins / ties / losses and ``beyond_noise``:
    ADMM wins on every seed and the mean difference exceeds twice its standard error
    (sd / sqrt(n), n >= 2)."""
    out = {}
    for key, a in finals.items():
        if a["method"] != "admm":
            continue
        for base in ("dtf", "scratch"):
            b = finals.get(key.replace("/admm/", f"/{base}/"))
            if b is None:
                continue
            common = sorted(set(a["test"]) & set(b["test"]), key=int)
            if not common:
                continue
            d = [a["test"][s] - b["test"][s] for s in common]
            m, sd = _mean_std(d)
            wins = sum(x > 0 for x in d)
            out[f"{a['setting']}/b{a['budget']}/admm-{base}"] = {
                "setting": a["setting"],
                "budget": a["budget"],
                "baseline": base,
                "mean": m,
                "std": sd,
                "n": len(d),
                "wins": wins,
                "ties": sum(x == 0 for x in d),
                "losses": sum(x < 0 for x in d),
                "beyond_noise": len(d) >= 2 and wins == len(d) and m > 2 * sd / math.sqrt(len(d)),
            }
    return out


def admm_wins(pairs: dict[str, dict[str, Any]]) -> list[str]:
    """The "setting at budget B" cells where ADMM beats both baselines beyond seed noise."""
    cells: dict[tuple[str, int], list[bool]] = {}
    for p in pairs.values():
        cells.setdefault((p["setting"], p["budget"]), []).append(p["beyond_noise"])
    return [f"{st} at {b} epochs" for (st, b), v in cells.items() if len(v) == 2 and all(v)]


# ---------------------------------------------------------------------- outputs
def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def grid_lines(k: int) -> list[str]:
    """The candidates (``tried``: the first ``k`` of each grid) as markdown tables."""

    def cell(v: Any) -> str:
        if v is None:
            return "once per epoch"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["ADMM (Z/U every: optimizer steps; cosine schedules, the config's momentum):", ""]
    rows = [
        [r[0], *(cell(v) for v in r[1:]), NOTES[r[0]], "yes" if i < k else "no"]
        for i, r in enumerate(ADMM_GRID)
    ]
    lines += _table(["config", *ADMM_COLUMNS, "what", "tried"], rows, "lrrrrrrrll")
    for m, grid in TRAINED_GRIDS.items():
        lines += ["", f"{LABELS[m]} (its one trained phase; momentum 0.9 for SGD):", ""]
        rows = [
            [r[0], *(cell(v) for v in r[1:]), NOTES[r[0]], "yes" if i < k else "no"]
            for i, r in enumerate(grid)
        ]
        lines += _table(["config", *TRAINED_COLUMNS, "what", "tried"], rows, "llrrlrll")
    return lines


def write_page(doc: dict[str, Any], camp: Campaign, page: Path, figure: Path) -> None:
    summ = doc["summary"]
    n_runs = {
        ph: sum(1 for r in doc["selection_runs"] if r["phase"] == ph)
        for ph in ("dense", "tuning", "final")
    }
    lines = [
        "# Tuned ADMM against tuned baselines: LeNet-5, MNIST and Fashion-MNIST (issue 19)",
        "",
        *command_block(doc["command"]),
        "DATA holds `mnist/` and `fashion-mnist/` (official IDX files). Every run's own "
        "`tdcompress` command is in `benchmarks/results/tuning-lenet.json` (`command`); the "
        "protocol is in the docstring of `benchmarks/tuning_lenet.py`.",
        "",
        f"- Validation: {VALIDATION:,} training images held out by one fixed draw; every "
        "choice below is made on them; each final run is measured on the test set once.",
        f"- Dense LeNet-5: one per dataset and seed, {camp.dense_epochs} epochs (not part of the "
        "budget).",
        "- Budget B = epochs after the dense model: ADMM: ADMM + fine-tuning epochs; TT-SVD + "
        f"fine-tune: B fine-tuning epochs; TT from scratch: {camp.dense_epochs} + B epochs from "
        "random initialisation (the same total as the others including their dense model).",
        f"- Tuning: K = {camp.k} configurations per setting and method at B = "
        f"{camp.tuning_budget}, seed {TUNING_SEED}; the highest validation top-1 wins (ties: "
        "the earlier). Finals: the winner at B = "
        + ", ".join(map(str, camp.budgets))
        + f", seeds {', '.join(map(str, camp.seeds))} (the B = {camp.tuning_budget}, seed "
        f"{TUNING_SEED} final is the winner's tuning run, evaluated on test).",
        f"- Runs: {n_runs['dense']} dense, {n_runs['tuning']} tuning, {n_runs['final']} final; "
        f"{doc['done_runs']} have results. Wall time (training epochs, summed over runs): "
        + ", ".join(f"{ph} {h:.1f} h" for ph, h in doc["wall_hours"].items())
        + "; 1 thread per run, 2 runs side by side.",
        "",
        "## The configurations tried",
        "",
        *grid_lines(camp.k),
        "",
        "## Tuning (validation top-1 %, B = " + f"{camp.tuning_budget}, seed {TUNING_SEED})",
        "",
    ]
    rows = []
    for t in doc["tuning"]:
        mark = "**chosen**" if t["chosen"] else ""
        val = _fmt(t["val_top1"]) if t["status"] == "ok" else t["status"]
        wall = _fmt(t["wall_seconds"], ".0f")
        rows.append([t["setting"], LABELS[t["method"]], t["config"], val, wall, mark])
    lines += _table(
        ["setting", "method", "config", "validation top-1", "wall (s)", ""], rows, "lllrrl"
    )
    lines += ["", "## Final runs (test top-1 %, mean ± std over seeds)", ""]
    dense = summ["dense"]
    if dense:
        lines += [
            "Dense models (test): "
            + "; ".join(
                f"{ds} {d['mean']:.2f} ± {d['std']:.2f} ({d['n']} seeds)" for ds, d in dense.items()
            )
            + ".",
            "",
        ]
    rows = []
    for st in camp.settings:
        for b in camp.budgets:
            for m in METHODS:
                f = summ["finals"].get(f"{st}/{m}/b{b}")
                if f is None:
                    rows.append([st, str(b), LABELS[m], "-", "not run", "", "", "", ""])
                    continue
                acc = "-" if f["mean"] is None else f"{f['mean']:.2f} ± {f['std']:.2f}"
                if f["n"] != f["of"]:
                    acc += f" ({f['n']} of {f['of']})"
                if f["diverged"]:
                    acc += f"; diverged: seed {', '.join(map(str, f['diverged']))}"
                per = ", ".join(f"{v:.2f}" for v in f["test"].values())
                val = _fmt(statistics.fmean(f["val"].values()) if f["val"] else None)
                ep = f["epochs"]
                eps = f"{ep['admm']} + {ep['finetune']}" if m == "admm" else str(ep["finetune"])
                walls = [w for w in f["wall"].values() if w is not None]
                wall = _fmt(statistics.fmean(walls), ".0f") if walls else "-"
                rows.append([st, str(b), LABELS[m], f["config"], acc, per, val, eps, wall])
    header = [
        "setting",
        "B",
        "method",
        "config",
        "test top-1",
        "per seed",
        "val top-1",
        "epochs",
        "wall/run (s)",
    ]
    lines += _table(header, rows, "lrlllrrrr")
    lines += [
        "",
        "Epochs: ADMM + fine-tuning for ADMM; fine-tuning for TT-SVD + fine-tune; all of them "
        f"for TT from scratch ({camp.dense_epochs} + B).",
        "",
        "## ADMM minus each baseline, paired by seed (test top-1, points)",
        "",
        "Beyond noise: ADMM wins on every seed and the mean difference is more than twice its "
        "standard error (sd / sqrt(n)).",
        "",
    ]
    rows = [
        [
            p["setting"],
            str(p["budget"]),
            LABELS[p["baseline"]],
            f"{p['mean']:+.2f} ± {p['std']:.2f}",
            str(p["n"]),
            f"{p['wins']} / {p['ties']} / {p['losses']}",
            "yes" if p["beyond_noise"] else "no",
        ]
        for p in summ["paired"].values()
    ]
    lines += _table(
        [
            "setting",
            "B",
            "ADMM minus",
            "mean ± std",
            "seeds",
            "ADMM wins / ties / losses",
            "beyond noise",
        ],
        rows,
        "lrlrrrl",
    )
    wins = admm_wins(summ["paired"])
    lines += [
        "",
        "## Verdict",
        "",
        "Where ADMM beats both baselines beyond seed noise (automatic, from the table above): "
        + (", ".join(wins) if wins else "nowhere" if summ["paired"] else "(no finals yet)")
        + ".",
        "",
        doc.get("verdict") or "(to be written when the runs have finished)",
        "",
        f"![test top-1 against budget]({figure.name})",
        "",
    ]
    atomic_write_text(page, "\n".join(lines))


def plot(doc: dict[str, Any], camp: Campaign, path: Path) -> None:
    """Test top-1 against the budget, one panel per setting, error bars = std over seeds."""
    plt = pyplot()
    if plt is None:
        return
    summ = doc["summary"]
    fig, axes = plt.subplots(
        1, len(camp.settings), figsize=(4.6 * len(camp.settings), 4), squeeze=False
    )
    for ax, st in zip(axes[0], camp.settings):
        for m, marker in zip(METHODS, "os^"):
            rows = [
                f
                for b in camp.budgets
                if (f := summ["finals"].get(f"{st}/{m}/b{b}")) and f["mean"] is not None
            ]
            if not rows:
                continue
            ax.errorbar(
                [r["budget"] for r in rows],
                [r["mean"] for r in rows],
                yerr=[r["std"] for r in rows],
                marker=marker,
                capsize=3,
                label=f"{LABELS[m]} ({rows[0]['config']})",
            )
        d = summ["dense"].get(SETTINGS[st].dataset)
        if d:
            ax.axhline(d["mean"], color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log")
        ax.set_xticks(list(camp.budgets), [str(b) for b in camp.budgets])
        ax.minorticks_off()
        ax.set(title=st, xlabel="epochs after the dense model (B)", ylabel="test top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def collect(
    camp: Campaign,
    command: str = COMMAND,
    results: Path = RESULTS,
    page: Path = PAGE,
    figure: Path = FIGURE,
    ran: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect every run of ``camp`` (its folder's result, else the recorded one) into
    ``results``, ``page`` and ``figure``; recorded runs outside the selection are kept.
    ``ran``: this invocation's command and wall time, added to the recorded ones."""
    old = json.loads(results.read_text()) if results.is_file() else {}
    camp.recorded = {r["id"]: r for r in old.get("runs", [])}
    camp._winners.clear()
    got = []
    selection = camp.runs("all")
    for r in selection:
        res = camp.result(r)
        if res is not None:
            got.append(res)
    ids = {r["id"] for r in got}
    wall: dict[str, float] = {}
    for r in got:
        wall[r["phase"]] = wall.get(r["phase"], 0.0) + (r.get("wall_seconds") or 0.0)
    doc = {
        "issue": 19,
        "command": command,
        "torch": torch.__version__,
        "config": CONFIG,
        "shared_sets": list(SHARED_SETS),
        "dataset_sets": {k: list(v) for k, v in DATASET_SETS.items()},
        "extra_sets": list(camp.extra),
        "settings": {k: vars(SETTINGS[k]) for k in camp.settings},
        "budgets": list(camp.budgets),
        "tuning_budget": camp.tuning_budget,
        "seeds": list(camp.seeds),
        "k": camp.k,
        "grids": {m: [vars(c) for c in GRIDS[m]] for m in METHODS},
        "winners": {
            f"{st}/{m}": (w.name if (w := camp.winner(st, m)) else None)
            for st in camp.settings
            for m in METHODS
        },
        "done_runs": len(got),
        "wall_hours": {ph: s / 3600 for ph, s in wall.items()},
        "tuning": tuning_table(got, camp),
        "summary": summarise(got, camp.seeds),
        "verdict": old.get("verdict"),
        "invocations": old.get("invocations", []) + ([ran] if ran else []),
        "runs": got + [r for r in old.get("runs", []) if r["id"] not in ids],
    }
    doc["wall_hours"] = {ph: round(s, 2) for ph, s in doc["wall_hours"].items()}
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(doc, indent=1) + "\n")
    write_page({**doc, "selection_runs": selection}, camp, page, figure)
    plot(doc, camp, figure)
    return doc


# ---------------------------------------------------------------------- CLI
def _int_at_least(low: int, arg: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{arg} must be an int >= {low}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{arg} must be an int >= {low}, got {s!r}")
        return v

    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run what is not finished, then collect")
    ap.add_argument(
        "--plan", action="store_true", help="print every run, its epochs and cost; exit"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny runs ({' '.join(SMOKE_SETS)}) into --out-dir, results there too",
    )
    ap.add_argument("--jobs", type=_int_at_least(1, "--jobs"), default=2)
    ap.add_argument("--data-root", default=None, help="folder holding mnist/ and fashion-mnist/")
    ap.add_argument(
        "--phase", choices=PHASES, default="all", help="which runs --run runs (dense runs always)"
    )
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument(
        "--budgets",
        nargs="+",
        type=_int_at_least(2, "--budgets"),
        default=list(BUDGETS),
        help="epochs after the dense model (ADMM needs >= 1 + 1)",
    )
    ap.add_argument("--seeds", nargs="+", type=_int_at_least(0, "--seeds"), default=list(SEEDS))
    ap.add_argument(
        "--k",
        type=int,
        default=K,
        help=f"configurations tried per setting and method (2 to {K_MAX})",
    )
    ap.add_argument("--out-dir", default=RUNS, help="run folders (relative to the repository root)")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    a = ap.parse_args(argv)
    if not 2 <= a.k <= K_MAX:
        ap.error(
            f"--k must be an int in [2, {K_MAX}] (A2, the paper-like ADMM configuration, "
            f"is the 2nd of its grid), got {a.k}"
        )
    if len(set(a.budgets)) != len(a.budgets) or len(set(a.seeds)) != len(a.seeds):
        ap.error(f"--budgets and --seeds must not repeat a value, got {a.budgets} and {a.seeds}")
    if (a.run or a.smoke) and not a.data_root:
        ap.error("--run and --smoke need --data-root")
    if a.smoke and a.out_dir == RUNS:
        ap.error(f"--smoke needs its own --out-dir (not {RUNS}): its runs are tiny")
    if a.data_root:
        for ds in dict.fromkeys(SETTINGS[s].dataset for s in a.settings):
            if not (Path(a.data_root) / ds.replace("_", "-")).is_dir():
                ap.error(f"--data-root {a.data_root!r} has no {ds.replace('_', '-')}/ folder")
    camp = Campaign(
        settings=tuple(a.settings),
        budgets=tuple(sorted(a.budgets)),
        seeds=tuple(a.seeds),
        k=a.k,
        root=a.out_dir,
        data_root=a.data_root or "DATA",
        extra=SMOKE_SETS if a.smoke else (),
    )
    paths: dict[str, Path] = {}
    if a.smoke:  # (its results stay with its runs)
        out = REPO / a.out_dir
        names = ("tuning-lenet.json", "lenet_tuning.md", "lenet_tuning.png")
        paths = {k: out / n for k, n in zip(("results", "page", "figure"), names)}
    results = paths.get("results", RESULTS)
    if results.is_file():
        camp.recorded = {r["id"]: r for r in json.loads(results.read_text())["runs"]}
    if a.plan:
        print(camp.plan_text(a.phase, a.jobs))
        return None
    words = ["DATA" if w == a.data_root else w for w in argv]  # (the page names no local path)
    command = "python benchmarks/tuning_lenet.py " + shlex.join(words) if argv else COMMAND
    ran, error = None, None
    if a.run or a.smoke:
        t0 = time.time()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            camp.run(a.phase, a.jobs)
        except RuntimeError as e:  # (failed runs: collect what finished, then say so)
            error = e
        hours = (time.time() - t0) / 3600
        ran = {"command": command, "started": started, "wall_hours": round(hours, 3)}
        print(f"[tuning_lenet] ran for {hours:.2f} h", flush=True)
    doc = collect(camp, command, **paths, ran=ran)
    where = paths.get("page", PAGE)
    print(f"collected {doc['done_runs']} of {len(camp.runs('all'))} runs -> {where}")
    if error is not None:
        raise error
    return doc


if __name__ == "__main__":
    main()
