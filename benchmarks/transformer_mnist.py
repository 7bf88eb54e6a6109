"""A small transformer on a real task (issue 23's results row): MNIST rows as 28 tokens
through PyTorch's ``nn.TransformerEncoder``, dense against ADMM -> TT and ADMM -> low rank
of its four feed-forward matrices at about 3x and 10x of those matrices.

Every run is one config in ``configs/transformer/`` (the compressed ones start from the
dense run). This script runs what is not finished (``--jobs`` at a time, 1 thread each),
then collects top-1, parameters, MACs and per-image latency at batch 1 and 32 (PyTorch
eager, 1 thread, medians of interleaved repeats) into
``benchmarks/results/quality-transformer_mnist.json`` and
``docs/results/transformer_mnist.md``.

    python benchmarks/transformer_mnist.py --run --jobs 1 --data-root DATA
    python benchmarks/transformer_mnist.py --data-root DATA     # collect (+ latency)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tdcompress.report import command_block
from tdcompress.train.checkpoint import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (  # noqa: E402
    done_stages,
    interleaved_latency,
    machine_load,
    run_model,
    run_queue,
    run_record,
    with_execution_choice,
)
from _runs import finished as run_finished  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality-transformer_mnist.json"
PAGE = REPO / "docs" / "results" / "transformer_mnist.md"
COMMAND = "python benchmarks/transformer_mnist.py --run --jobs 1 --data-root DATA"
KEYS = {
    "dense": "dense",
    "tt_3x": "ADMM -> TT, rank 12",
    "tt_10x": "ADMM -> TT, rank 6",
    "svd_3x": "ADMM -> low rank, rank 16",
    "svd_10x": "ADMM -> low rank, rank 5",
}


def runs() -> list[dict[str, Any]]:
    return [{"id": k, "key": k, "out_dir": f"runs/transformer/mnist_rows_{k}"} for k in KEYS]


def argv(r: dict[str, Any], data_root: str = "DATA") -> list[str]:
    stage = "train" if r["key"] == "dense" else "pipeline"
    return [stage, f"configs/transformer/mnist_rows_{r['key']}.yaml", "--data-root", data_root]


def finished(r: dict[str, Any]) -> bool:
    return run_finished(REPO / r["out_dir"], r["key"] == "dense")


def collect_run(r: dict[str, Any]) -> dict[str, Any] | None:
    from tdcompress.planning import CompressionPlan

    if not finished(r):
        return None
    out = REPO / r["out_dir"]
    done = done_stages(out)
    res: dict[str, Any] = {
        "key": r["key"],
        "label": KEYS[r["key"]],
        "command": "tdcompress " + " ".join(argv(r)),
        **run_record(out),
    }
    if r["key"] == "dense":
        res.update(top1=100 * done["train"]["test_acc"], params=done["train"]["params"])
        return res
    ev = done["evaluate"]
    plan = CompressionPlan.load(out / "plan.yaml")
    dense_ff = sum(lp.dense_params for lp in plan.layers)
    ff = sum(lp.params for lp in plan.layers)
    res.update(
        top1=100 * ev["finetuned_acc"],
        admm_top1=100 * ev["admm_acc"],
        params=ev["compressed_params"],
        ratio=ev["ratio"],
        ff_params=ff,
        ff_dense_params=dense_ff,
        ff_ratio=dense_ff / ff,
        macs=plan.compressed_macs,
        dense_macs=plan.model_macs,
        macs_reduction=ev["macs_reduction"],
        skipped=dict(getattr(plan, "skipped", {}) or {}),
    )
    return res


def latency(data_root: str) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    models = {
        r["key"]: run_model(
            REPO / f"configs/transformer/mnist_rows_{r['key']}.yaml",
            REPO / r["out_dir"],
            data_root,
            r["key"] == "dense",
        )
        for r in runs()
        if finished(r)
    }
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 1, 28, 28, generator=gen) for b in (1, 32)}
    if "dense" not in models:
        return []
    return interleaved_latency(with_execution_choice(models, inputs), inputs)


def _times(reduction: float) -> str:
    """A MAC reduction as "2.44x fewer" or, below 1, "3.9x more"."""
    return f"{reduction:.2f}x fewer" if reduction >= 1 else f"{1 / reduction:.1f}x more"


def write_page(doc: dict[str, Any]) -> None:
    res = {r["key"]: r for r in doc["runs"]}
    lat = {(x["key"], x["batch"]): x for x in doc.get("latency") or []}
    lines = [
        "# A small transformer on MNIST rows: TT and low rank of its feed-forward layers",
        "",
        *command_block(COMMAND),
        "Model: 28 tokens (the image rows, 28 pixels each) embedded to width 64 with a learned",
        "position embedding, `nn.TransformerEncoder` of 2 pre-norm layers (4 heads, feed-forward",
        "256, dropout 0.1), mean over tokens, LayerNorm, linear head: 104,394 parameters, of",
        "which the four feed-forward matrices hold 66,176. Dense: 6 epochs (AdamW, lr 1e-3,",
        "cosine, 1 warm-up epoch); compressed: from the dense model, ADMM 3 + fine-tune 3 epochs",
        "(AdamW, lr 5e-4). Only the feed-forward matrices are compressed: the plan reports the",
        "attention's `in_proj_weight` and `out_proj` as not compressible (nn.MultiheadAttention",
        "reads them as bare tensors). Latency: per image, PyTorch eager, 1 thread, medians of",
        "interleaved repeats; each compressed model factorized, and as deployed after its",
        "per-layer execution choice (`choose_execution(folded=True)`, then `fold_kernels`: a",
        "layer runs its kernel rebuilt from the cores, kept, where that measured faster). "
        + (doc.get("latency_note") or ""),
        "",
        "| model | top-1 % | FF params | FF ratio | whole-model ratio | MACs per image "
        "| batch 1: µs/img (vs dense) | batch 32: µs/img (vs dense) "
        "| after the execution choice: batch 1 | batch 32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, label in KEYS.items():
        r = res.get(k)
        if r is None:
            lines.append(f"| {label} | not run | | | | | | |")
            continue
        cells = []
        for key in (k, f"{k} (chosen)"):
            for b in (1, 32):
                x = lat.get((key, b))
                cells.append(
                    "" if x is None else f"{x['us_per_sample']:.0f} ({x['speedup_vs_dense']:.2f}x)"
                )
        if k == "dense":
            d = next((x for x in res.values() if "dense_macs" in x), None)
            macs = f"{d['dense_macs']:,}" if d else ""
            lines.append(
                f"| {label} | {r['top1']:.2f} | 66,176 | 1x | 1x | {macs} | {cells[0]} "
                f"| {cells[1]} | | |"
            )
        else:
            lines.append(
                f"| {label} | {r['top1']:.2f} | {r['ff_params']:,} | {r['ff_ratio']:.1f}x "
                f"| {r['ratio']:.2f}x | {r['macs']:,} ({_times(r['macs_reduction'])}) "
                f"| {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |"
            )
    lines += ["", "## What it shows", "", doc.get("verdict") or "(runs not finished)", ""]
    atomic_write_text(PAGE, "\n".join(lines))


def main(argv_: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run what is not finished first")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--no-latency", action="store_true")
    a = ap.parse_args(argv_)
    if a.run:
        if not a.data_root:
            ap.error("--run needs --data-root")
        by_key = {r["key"]: r for r in runs()}
        run_queue(
            runs(),
            lambda r: argv(r, a.data_root),
            lambda r: r["key"] == "dense" or finished(by_key["dense"]),
            finished,
            cwd=REPO,
            log_dir=REPO / "runs" / "transformer" / "logs",
            jobs=a.jobs,
            tag="transformer",
        )
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    recorded = {x["key"]: x for x in old.get("runs", [])}
    got = [collect_run(r) or recorded.get(r["key"]) for r in runs()]  # (folders may be gone)
    doc = {
        "command": COMMAND,
        "torch": torch.__version__,
        "runs": [x for x in got if x is not None],
        "latency": old.get("latency"),
        "latency_note": old.get("latency_note"),
        "verdict": old.get("verdict"),
    }
    if a.data_root and not a.no_latency:
        before = machine_load()
        doc["latency"] = latency(a.data_root)
        after = machine_load()
        doc["latency_note"] = (
            f"Timed {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU pressure (share "
            f"of time runnable tasks waited for a core, /proc/pressure/cpu avg10) "
            f"{before['cpu_pressure_avg10']}% before and {after['cpu_pressure_avg10']}% after "
            "(near 0: quiet)."
        )
    atomic_write_text(RESULTS, json.dumps(doc, indent=1) + "\n")
    write_page(doc)
    print(f"collected {len(doc['runs'])} of {len(KEYS)} runs -> {PAGE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
