"""rho sensitivity of ADMM (the paper's Figure 3) on MNIST LeNet-5 at the middle ratio.

For each rho, an ADMM -> TT run (the pipeline as is, rho held constant: ``rho_growth`` 1 by
default, so the curves show rho itself) starting from one shared dense baseline: per-epoch
training loss, ||W - Z|| / ||W|| and test accuracy of the ADMM phase (from the run's
metrics.jsonl), and the accuracy after decompose + fine-tune. Writes
``benchmarks/results/rho_sensitivity.json``, ``docs/results/rho_sensitivity.png`` (three
panels) and ``docs/results/rho_sensitivity.md``. Runs are resumable and skipped when done;
the dense baseline is shared with ``quality.py`` when ``--out-dir`` is the same.

    python benchmarks/rho_sensitivity.py --ratio 30
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality as q  # noqa: E402
from tdcompress.report import command_block, pyplot, save_figure  # noqa: E402
from tdcompress.train.checkpoint import atomic_write_text  # noqa: E402
from tdcompress.train.loop import read_metrics  # noqa: E402

RHOS = (1e-4, 1e-3, 5e-3, 2e-2)


def curves(run_dir: Path) -> dict[str, list[float]]:
    """Per-epoch ADMM-phase curves from ``metrics.jsonl`` (the last record of each epoch,
    so resumed epochs count once)."""
    recs = read_metrics(run_dir / "metrics.jsonl", per_epoch=True)
    rows = {int(r["epoch"]): r for r in recs if r.get("phase") == "admm"}
    eps = sorted(rows)
    return {
        "epoch": eps,
        "train_loss": [rows[e]["train_loss"] for e in eps],
        "primal": [rows[e].get("admm/primal") for e in eps],
        "test_acc": [rows[e]["test_acc"] for e in eps],
        "rho": [rows[e].get("rho") for e in eps],
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    common = [*q.base_sets(args), f"seed={args.seed}"]
    if args.rho_growth is not None:
        common.append(f"admm.rho_growth={args.rho_growth}")
    seed_dir = Path(args.out_dir) / "mnist" / f"seed{args.seed}"
    test_subset = q.QUICK_TEST_SUBSET if args.quick else None
    base = q.build_cfg(args.config, common)
    dcfg = q.build_cfg(args.config, [*common, f"runtime.out_dir={seed_dir / 'dense'}"])
    print(f"== mnist seed {args.seed}: dense baseline", flush=True)
    dense = q.ensure_dense(dcfg, test_subset)
    runs: list[dict[str, Any]] = []
    command = "python benchmarks/rho_sensitivity.py " + shlex.join(args.argv)
    for rho in args.rhos:
        out = seed_dir / f"r{args.ratio:g}" / f"rho{rho:g}"
        cfg = q.build_cfg(
            args.config,
            [
                *common,
                f"compress.target_ratio={args.ratio}",
                "compress.format=tt",
                f"admm.rho={rho}",
                f"runtime.out_dir={out}",
            ],
        )
        print(f"== rho {rho:g}", flush=True)
        res, _ = q.run_method(cfg, "admm", base, seed_dir / "dense", dense, test_subset)
        res.update(rho=rho, rho_growth=cfg.admm.rho_growth, curves=curves(out))
        runs.append(res)
        doc = {
            "dataset": "mnist",
            "command": command,
            "quick": args.quick,
            "ratio": args.ratio,
            "shared_sets": common,
            "dense_top1": dense["top1"],
            "total_wall_seconds": dense["wall_seconds"] + sum(r["wall_seconds"] for r in runs),
            "invocation_seconds": time.time() - t_start,
            "runs": runs,
        }
        write_outputs(doc, args)
    return doc


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Three panels: training loss, ||W - Z||/||W||, test accuracy per ADMM epoch."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: plot skipped"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in doc["runs"]:
        c = r["curves"]
        fin = "n/a" if r.get("top1") is None else f"{100 * r['top1']:.2f}%"
        label = f"rho={r['rho']:g} (fine-tuned {fin})"
        axes[0].plot(c["epoch"], c["train_loss"], marker="o", label=label)
        axes[1].plot(c["epoch"], c["primal"], marker="o", label=label)
        axes[2].plot(c["epoch"], [100 * a for a in c["test_acc"]], marker="o", label=label)
    axes[0].set_ylabel("training loss (cross-entropy)")
    axes[1].set_ylabel("||W - Z|| / ||W||")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("test top-1 (%)")
    for ax in axes:
        ax.set_xlabel("ADMM epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"ADMM rho sensitivity, LeNet-5 MNIST, TT at {doc['ratio']:g}x")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return None


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# rho sensitivity: ADMM -> TT, LeNet-5 MNIST at {doc['ratio']:g}x",
        "",
        *command_block(doc["command"]),
        f"Total wall time: {doc['total_wall_seconds'] / 60:.1f} min (dense baseline "
        f"included). Dense top-1: {100 * doc['dense_top1']:.2f}%. Quick mode: {doc['quick']}. "
        f"Shared settings: `{' '.join(doc['shared_sets'])}`.",
        "",
        "| rho | last ADMM loss | last ‖W−Z‖/‖W‖ | ADMM top-1 (%) | after decompose (%) "
        "| after fine-tune (%) | wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["runs"]:
        c = r["curves"]

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.2f}"

        loss = f"{c['train_loss'][-1]:.4f}" if c["train_loss"] else "-"
        prim = f"{c['primal'][-1]:.4f}" if c["primal"] and c["primal"][-1] is not None else "-"
        lines.append(
            f"| {r['rho']:g} | {loss} | {prim} | {pct(r.get('admm_top1'))} "
            f"| {pct(r.get('decomposed_top1'))} | {pct(r.get('top1'))} "
            f"| {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict[str, Any], args: argparse.Namespace) -> None:
    atomic_write_text(Path(args.results_dir) / "rho_sensitivity.json", json.dumps(doc, indent=2))
    md = markdown(doc)
    note = plot(doc, Path(args.docs_dir) / "rho_sensitivity.png")
    md += f"\n{note}\n" if note else "\n![rho sensitivity](rho_sensitivity.png)\n"
    atomic_write_text(Path(args.docs_dir) / "rho_sensitivity.md", md)


def _rho(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rhos must be numbers, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"--rhos must be > 0, got {s!r}")
    return v


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rhos", nargs="+", type=_rho, default=list(RHOS))
    ap.add_argument("--ratio", type=q._positive(float, "--ratio"), default=30.0)
    ap.add_argument("--seed", type=q._positive(int, "--seed"), default=0)
    ap.add_argument(
        "--rho-growth",
        type=float,
        default=1.0,
        help="admm.rho_growth for every run (default 1: rho constant, as in the paper)",
    )
    ap.add_argument("--data-root", default=str(q.REPO.parent / "shared" / "data"))
    ap.add_argument("--out-dir", default="runs/quality")
    ap.add_argument("--config", type=Path, default=q.DEFAULT_CONFIG)
    ap.add_argument("--results-dir", default=str(q.REPO / "benchmarks" / "results"))
    ap.add_argument("--docs-dir", default=str(q.REPO / "docs" / "results"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--cpu", action="store_true", help="force the CPU even with CUDA")
    ap.add_argument("--quick", action="store_true", help="smoke budget (see quality.py)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    args.dataset = "mnist"
    if not (Path(args.data_root) / "mnist").is_dir():
        raise SystemExit(f"--data-root {args.data_root!r} has no mnist folder")
    doc = run_all(args)
    print(
        f"wrote {args.results_dir}/rho_sensitivity.json and {args.docs_dir}/rho_sensitivity.md",
        flush=True,
    )
    return doc


if __name__ == "__main__":
    main()
