"""Quality benchmark (issue 6): ADMM against the usual ways of getting a compressed LeNet-5.

For one dataset, one dense LeNet-5 per seed is trained once; its ``dense.pt`` is linked into
every method's run folder (train stage marked done). Then, at each target whole-model
parameter ratio, with the same epoch budget after the dense baseline for every method:

- ``admm``: ADMM-regularized training toward TT, decompose, fine-tune (the pipeline as is);
- ``dtf``: decompose-then-fine-tune: TT-SVD of the dense baseline, fine-tuned for
  admm + finetune epochs (finetune optimizer settings);
- ``scratch``: the same TT architecture, every layer randomly initialised
  (``reset_parameters()`` on the factorized layers), trained for dense + admm + finetune
  epochs with the dense optimizer settings;
- ``admm-tr``, ``admm-tucker2``, ``admm-svd``: the same ADMM with tensor ring, Tucker-2 and
  low-rank SVD. Tucker-2 only factorizes convolutions, so for it fc1 (LeNet-5's largest
  layer) is low-rank SVD (``compress.overrides: {fc1: {format: svd}}``); otherwise fc1 would
  stay dense and no ratio above ~1.06x would be reachable.

Every run is a Pipeline run folder (resumable); a run with ``bench_result.json`` is skipped
on rerun. A ratio a format cannot reach (e.g. svd at 60x) is recorded as ``unreachable``.

    python benchmarks/quality.py --dataset mnist --ratios 10 30 60 --seeds 0 --middle-seeds 1 2 \
        --middle-methods admm dtf scratch

Budget: epochs = baselines * D + runs * (A + F) + scratch runs * D (D, A, F: dense, admm,
finetune epochs). A full-data MNIST LeNet-5 epoch took ~60 s at 1 thread on the busy shared
machine (load ~6); cut D/A/F with ``--set`` for the recorded runs, for every method alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tdcompress.config import Config, load_config
from tdcompress.data import make_loaders
from tdcompress.data.loader import TensorLoader
from tdcompress.pipeline import Pipeline
from tdcompress.report import command_block, pyplot, save_figure
from tdcompress.train.checkpoint import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "mnist_lenet5_tt_small.yaml"
DATASETS = ("mnist", "fashion_mnist")
METHODS = ("admm", "dtf", "scratch", "admm-tr", "admm-tucker2", "admm-svd")
LABELS = {
    "dense": "dense baseline",
    "admm": "ADMM -> TT (ours)",
    "dtf": "TT-SVD then fine-tune",
    "scratch": "TT from scratch",
    "admm-tr": "ADMM -> TR",
    "admm-tucker2": "ADMM -> Tucker-2 (fc1: SVD)",
    "admm-svd": "ADMM -> SVD",
}
QUICK_SETS = [
    "data.train_subset=2000",
    "dense.epochs=1",
    "admm.epochs=1",
    "finetune.epochs=1",
    "admm.every_steps=5",
    "dense.optim.lr=0.01",  # the config's 0.05 diverges (NaN) in the first epoch here
]
QUICK_TEST_SUBSET = 1000
STAGES = ("train", "plan", "admm", "decompose", "finetune", "evaluate")

_DATA_CACHE: dict[tuple[Any, ...], tuple[Any, Any, dict[str, Any]]] = {}


class BenchPipeline(Pipeline):
    """A Pipeline with the benchmark's method variants and a data cache shared by runs.

    ``dtf`` and ``scratch`` are plain configs (``admm.epochs=0``; scratch adds
    ``compress.init=random``); ``method`` only labels the run.
    ``test_subset``: evaluate on the first N test images only (quick mode).
    """

    def __init__(self, cfg: Config, method: str = "admm", test_subset: int | None = None) -> None:
        if method not in ("dense", *METHODS):
            raise ValueError(f"method must be one of {['dense', *METHODS]}, got {method!r}")
        self.method = method
        self.test_subset = test_subset
        super().__init__(cfg)

    def data(self):
        if self._data is None:
            d = self.cfg.data
            key = (
                d.dataset,
                d.root,
                d.train_subset,
                d.validation,
                d.batch_size,
                d.eval_batch_size,
                d.normalize,
                d.augment,
                self.cfg.seed,
                str(self.device),
                self.test_subset,
            )
            if key not in _DATA_CACHE:
                train, test, info = make_loaders(d, device=self.device, seed=self.cfg.seed)
                if self.test_subset:
                    n = self.test_subset
                    test = TensorLoader(
                        test.images[:n],
                        test.labels[:n],
                        test.batch_size,
                        device=self.device,
                        shuffle=False,
                        mean=test.mean,
                        std=test.std,
                    )
                _DATA_CACHE[key] = (train, test, info)
            self._data = _DATA_CACHE[key]
        return self._data


# ------------------------------------------------------------------------------ configs
def base_sets(args: argparse.Namespace) -> list[str]:
    """``--set`` strings shared by every run of this invocation."""
    sets = [
        f"data.dataset={args.dataset}",
        f"data.root={json.dumps(str(Path(args.data_root).resolve()))}",
        "runtime.progress=false",
        "runtime.device=cpu" if args.cpu else "runtime.device=auto",
    ]
    if args.threads:
        sets.append(f"runtime.threads={args.threads}")
    if getattr(args, "validation", 0):  # (rho_sensitivity.py's arguments have none)
        sets.append(f"data.validation={args.validation}")
    if args.quick:
        sets += QUICK_SETS
    return sets + list(args.set or [])


def method_sets(method: str, base: Config) -> list[str]:
    """Overrides turning the shared config into ``method`` (same budget after dense)."""
    d, a, f = base.dense.epochs, base.admm.epochs, base.finetune.epochs
    if method == "admm":
        return ["compress.format=tt"]
    if method == "dtf":
        return ["compress.format=tt", "admm.epochs=0", f"finetune.epochs={a + f}"]
    if method == "scratch":
        optim = json.dumps(_asdict(base.dense.optim))
        return [
            "compress.format=tt",
            "compress.init=random",
            "admm.epochs=0",
            f"finetune.epochs={d + a + f}",
            f"finetune.optim={optim}",
        ]
    if method == "admm-tr":
        return ["compress.format=tr"]
    if method == "admm-tucker2":
        return ["compress.format=tucker2", 'compress.overrides={"fc1": {"format": "svd"}}']
    if method == "admm-svd":
        return ["compress.format=svd"]
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def epochs_trained(method: str, cfg: Config, base: Config) -> dict[str, int]:
    """Epochs of each phase this run trains (dense: the shared baseline's)."""
    if method == "dense":
        return {"dense": cfg.dense.epochs, "admm": 0, "finetune": 0, "total": cfg.dense.epochs}
    a = cfg.admm.epochs if method not in ("dtf", "scratch") else 0
    f = cfg.finetune.epochs
    out = {"dense": base.dense.epochs, "admm": a, "finetune": f, "after_dense": a + f}
    if method == "scratch":
        out["after_dense"] = f - base.dense.epochs  # same budget; its 'dense' epochs are in f
        out["dense"] = 0
    out["total"] = out["dense"] + a + f
    return out


# ------------------------------------------------------------------------------ runs
def _wall(out: Path) -> float:
    p = out / "bench_wall.json"
    return json.loads(p.read_text())["seconds"] if p.exists() else 0.0


def _add_wall(out: Path, seconds: float) -> float:
    total = _wall(out) + seconds
    atomic_write_text(out / "bench_wall.json", json.dumps({"seconds": total}))
    return total


def ensure_dense(cfg: Config, test_subset: int | None) -> dict[str, Any]:
    """Train (or resume, or reuse) the dense baseline in ``cfg.runtime.out_dir``."""
    out = Path(cfg.runtime.out_dir)
    res_file = out / "bench_result.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    p = BenchPipeline(cfg, "dense", test_subset)
    t0 = time.time()
    try:
        p.run(("train",))
    finally:
        wall = _add_wall(out, time.time() - t0)
    tr = p.state()["done"]["train"]
    res = {
        "method": "dense",
        "format": None,
        "seed": cfg.seed,
        "target_ratio": 1.0,
        "status": "ok",
        "top1": tr["test_acc"],
        "params": tr["params"],
        "ratio": 1.0,
        "epochs": epochs_trained("dense", cfg, cfg),
        "wall_seconds": wall,
        "run_dir": str(out),
    }
    atomic_write_text(res_file, json.dumps(res, indent=2))
    return res


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def run_method(
    cfg: Config,
    method: str,
    base: Config,
    dense_dir: Path,
    dense_res: dict[str, Any],
    test_subset: int | None,
) -> tuple[dict[str, Any], bool]:
    """Run (or resume) one method; returns (result, was_skipped)."""
    out = Path(cfg.runtime.out_dir)
    res_file = out / "bench_result.json"
    if res_file.exists():
        return json.loads(res_file.read_text()), True
    p = BenchPipeline(cfg, method, test_subset)
    if not p.done("train"):
        _link(dense_dir / "dense.pt", out / "dense.pt")
        p._mark_done(
            "train",
            {
                "test_acc": dense_res["top1"],
                "params": dense_res["params"],
                "source": str(dense_dir / "dense.pt"),
            },
        )
    res: dict[str, Any] = {
        "method": method,
        "format": cfg.compress.format,
        "seed": cfg.seed,
        "target_ratio": cfg.compress.target_ratio,
        "dense_top1": dense_res["top1"],
        "dense_params": dense_res["params"],
        "epochs": epochs_trained(method, cfg, base),
        "run_dir": str(out),
    }
    t0 = time.time()
    try:
        try:
            p.run(STAGES)
        except ValueError as e:
            if "unreachable" not in str(e):
                raise
            res.update(status="unreachable", reason=str(e), top1=None)
    finally:
        res["wall_seconds"] = _add_wall(out, time.time() - t0)
    if "status" not in res:
        st = p.state()["done"]
        ev = st["evaluate"]
        plan = p.load_plan()
        res.update(
            status="ok",
            top1=ev["finetuned_acc"],
            admm_top1=st["admm"].get("test_acc"),
            decomposed_top1=st["decompose"]["test_acc"],
            params=ev["compressed_params"],
            ratio=ev["dense_params"] / ev["compressed_params"],
            planned_ratio=ev["ratio"],
            layers_ratio=ev["layers_ratio"],
            macs=plan.compressed_macs,
            dense_macs=plan.model_macs,
            macs_reduction=ev["macs_reduction"],
            layers={lp.name: lp.spec.to_dict() for lp in plan},
        )
    atomic_write_text(res_file, json.dumps(res, indent=2))
    return res, False


def middle_ratio(ratios: list[float]) -> float:
    """The (upper) median of the target ratios."""
    s = sorted(ratios)
    return s[len(s) // 2]


def build_cfg(config: Path, sets: list[str]) -> Config:
    return load_config(config, sets)


def plan_runs(args: argparse.Namespace) -> list[tuple[int, float | None, str]]:
    """(seed, ratio, method) in run order; ratio None is the seed's dense baseline."""
    mid = middle_ratio(args.ratios)
    seeds = list(dict.fromkeys([*args.seeds, *args.middle_seeds]))
    runs: list[tuple[int, float | None, str]] = []
    for s in seeds:
        runs.append((s, None, "dense"))
        ratios = args.ratios if s in args.seeds else [mid]
        methods = args.methods if s in args.seeds else args.middle_methods or args.methods
        for r in ratios:
            runs += [(s, r, m) for m in methods]
    return runs


def _fmt_ratio(r: float) -> str:
    return f"{r:g}"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run every planned run, rewriting the JSON and markdown after each."""
    t_start = time.time()
    common = base_sets(args)
    root = Path(args.out_dir) / args.dataset
    test_subset = QUICK_TEST_SUBSET if args.quick else None
    results: list[dict[str, Any]] = []
    dense: dict[int, tuple[Path, dict[str, Any]]] = {}
    command = "python benchmarks/quality.py " + shlex.join(args.argv)
    for seed, ratio, method in plan_runs(args):
        seed_dir = root / f"seed{seed}"
        sets = [*common, f"seed={seed}"]
        base = build_cfg(args.config, sets)
        if method == "dense":
            cfg = build_cfg(args.config, [*sets, f"runtime.out_dir={seed_dir / 'dense'}"])
            print(f"== {args.dataset} seed {seed}: dense baseline", flush=True)
            res = ensure_dense(cfg, test_subset)
            dense[seed] = (seed_dir / "dense", res)
        else:
            out = seed_dir / f"r{_fmt_ratio(ratio)}" / method
            cfg = build_cfg(
                args.config,
                [
                    *sets,
                    f"compress.target_ratio={ratio}",
                    *method_sets(method, base),
                    f"runtime.out_dir={out}",
                ],
            )
            print(f"== {args.dataset} seed {seed} ratio {ratio:g}: {method}", flush=True)
            res, _ = run_method(cfg, method, base, *dense[seed], test_subset)
        res["dataset"] = args.dataset
        results.append(res)
        doc = {
            "dataset": args.dataset,
            "command": command,
            "quick": args.quick,
            "config": str(args.config),
            "shared_sets": common,
            "validation": getattr(args, "validation", 0),
            "ratios": args.ratios,
            "middle_ratio": middle_ratio(args.ratios),
            "total_wall_seconds": sum(r["wall_seconds"] for r in results),
            "invocation_seconds": time.time() - t_start,
            "runs": results,
        }
        write_outputs(doc, args)
    return doc


# ------------------------------------------------------------------------------ outputs
def _stats(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target ratio, method) with mean/std over seeds."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["target_ratio"], r["method"]), []).append(r)
    order = {m: i for i, m in enumerate(("dense", *METHODS))}
    rows = []
    for (ratio, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        ok = [r for r in rs if r["status"] == "ok"]
        row: dict[str, Any] = {
            "target_ratio": ratio,
            "method": method,
            "seeds": [r["seed"] for r in rs],
            "status": "ok" if ok else rs[0]["status"],
            "reason": None if ok else rs[0].get("reason"),
        }
        if ok:
            accs = [r["top1"] for r in ok]
            row["top1_mean"], row["top1_std"] = _stats(accs)
            row["top1"] = accs
            row["ratio"] = ok[0]["ratio"]
            row["params"] = ok[0]["params"]
            row["macs_reduction"] = ok[0].get("macs_reduction")
            row["epochs"] = ok[0]["epochs"]["total"]
            row["wall_mean"] = statistics.fmean(r["wall_seconds"] for r in ok)
        rows.append(row)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    rows = summarize(doc["runs"])
    lines = [
        f"# Quality benchmark: LeNet-5 on {doc['dataset']}",
        "",
        *command_block(doc["command"]),
        f"Total wall time of the runs: {doc['total_wall_seconds'] / 60:.1f} min "
        f"(sum over runs, including resumed parts). Quick mode: {doc['quick']}.",
        "",
        (
            "QUICK MODE: smoke budgets, top-1 on the first "
            f"{QUICK_TEST_SUBSET} test images only; these numbers mean nothing. "
            if doc["quick"]
            else ""
        )
        + "Top-1 is on the full test set after the last phase (mean ± sample std over seeds "
        "where there are several; the individual values follow). Ratio = dense parameters / "
        "parameters of the final model; MACs = reduction of multiply-accumulates per image. "
        "Epochs = epochs this run trained in total (the dense methods share one baseline).",
        "",
        "| target | method | top-1 (%) | seeds | per seed | ratio | params | MACs red. "
        "| epochs | wall/run (s) |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = LABELS.get(r["method"], r["method"])
        tgt = "-" if r["method"] == "dense" else f"{r['target_ratio']:g}x"
        if r["status"] != "ok":
            lines.append(f"| {tgt} | {name} | {r['status']} | {len(r['seeds'])} | | | | | | |")
            continue
        acc = f"{100 * r['top1_mean']:.2f}"
        if len(r["top1"]) > 1:
            acc += f" ± {100 * r['top1_std']:.2f}"
        per = ", ".join(f"{100 * a:.2f}" for a in r["top1"])
        macs = "-" if r["macs_reduction"] is None else f"{r['macs_reduction']:.2f}x"
        lines.append(
            f"| {tgt} | {name} | {acc} | {len(r['top1'])} | {per} | {r['ratio']:.1f}x "
            f"| {r['params']:,} | {macs} | {r['epochs']} | {r['wall_mean']:.0f} |"
        )
    notes = [r for r in rows if r["status"] != "ok"]
    lines += [
        "",
        "Notes:",
        "",
        "- Accuracies are measured on "
        + (
            f"a validation split of {doc['validation']} images held out of the training "
            "set (a fixed draw; the test set was not used)."
            if doc.get("validation")
            else "the test set."
        ),
        "- Hyperparameters are shared by all methods (config "
        f"`{Path(doc['config']).name}` plus `{' '.join(doc['shared_sets'])}`). "
        "TT-SVD then fine-tune trains admm + finetune epochs with the finetune optimizer; "
        "TT from scratch trains dense + admm + finetune epochs with the dense optimizer.",
        "- Tucker-2 factorizes convolutions only (LeNet-5: conv2); fc1 uses low-rank SVD in "
        "that run, else fc1 would stay dense and no target above ~1.06x is reachable.",
    ]
    for r in notes:
        lines.append(
            f"- {r['target_ratio']:g}x {LABELS.get(r['method'], r['method'])}: {r['reason']}"
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Accuracy vs compression ratio; returns a note if matplotlib is absent."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: plot skipped"
    rows = summarize(doc["runs"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in METHODS:
        pts = [r for r in rows if r["method"] == m and r["status"] == "ok"]
        if not pts:
            continue
        ax.errorbar(
            [r["ratio"] for r in pts],
            [100 * r["top1_mean"] for r in pts],
            yerr=[100 * r["top1_std"] for r in pts],
            marker="o",
            capsize=3,
            label=LABELS[m],
        )
    dense = [r for r in rows if r["method"] == "dense" and r["status"] == "ok"]
    if dense:
        ax.axhline(100 * dense[0]["top1_mean"], color="k", ls="--", lw=1, label="dense")
    ax.set_xscale("log")
    ticks = sorted({r["target_ratio"] for r in rows if r["method"] != "dense"})
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("whole-model compression ratio (params)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"LeNet-5 on {doc['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return None


def write_outputs(doc: dict[str, Any], args: argparse.Namespace) -> None:
    name = f"quality-{args.dataset}"
    atomic_write_text(Path(args.results_dir) / f"{name}.json", json.dumps(doc, indent=2))
    md = markdown(doc)
    note = plot(doc, Path(args.docs_dir) / f"{name}.png")
    md += f"\n{note}\n" if note else f"\n![accuracy vs compression]({name}.png)\n"
    atomic_write_text(Path(args.docs_dir) / f"{name}.md", md)


# ------------------------------------------------------------------------------ CLI
def _positive(kind: type, arg: str):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            msg = f"{arg} must be a {kind.__name__}, got {s!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if not (v >= 0 if kind is int else v > 1) or (kind is float and not math.isfinite(v)):
            allowed = "an int >= 0" if kind is int else "a finite number > 1"
            raise argparse.ArgumentTypeError(f"{arg} must be {allowed}, got {s!r}")
        return v

    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--ratios", nargs="+", type=_positive(float, "--ratios"), default=[10, 30, 60])
    ap.add_argument(
        "--seeds",
        nargs="+",
        type=_positive(int, "--seeds"),
        default=[0],
        help="seeds run at every ratio",
    )
    ap.add_argument(
        "--middle-seeds",
        nargs="*",
        type=_positive(int, "--middle-seeds"),
        default=[],
        help="extra seeds run at the middle ratio only",
    )
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument(
        "--middle-methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="methods run for the --middle-seeds (default: --methods)",
    )
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out-dir", default="runs/quality")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--docs-dir", default=str(REPO / "docs" / "results"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument(
        "--validation",
        type=int,
        default=0,
        metavar="N",
        help="hold N training images out (a fixed draw) and report accuracy on them instead "
        "of the test set: for choosing hyperparameters (0: the test set)",
    )
    ap.add_argument("--cpu", action="store_true", help="force the CPU even with CUDA")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke budget: 2000 training images, 1 epoch per phase, 1000 test images",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override shared by every run (repeatable)",
    )
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if not (Path(args.data_root) / args.dataset.replace("_", "-")).is_dir():
        raise SystemExit(f"--data-root {args.data_root!r} has no {args.dataset} folder")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    doc = run_all(args)
    print(
        f"wrote {args.results_dir}/quality-{args.dataset}.json and "
        f"{args.docs_dir}/quality-{args.dataset}.md; runs took "
        f"{doc['total_wall_seconds'] / 60:.1f} min",
        flush=True,
    )
    return doc


if __name__ == "__main__":
    main()
