"""Training step of a compressed model: factorized layers run factorized or rebuilt.

``runtime.execution: rebuilt`` (``tdcompress.layers.set_model_execution``) trains the
factorized layers through the dense kernel rebuilt from their cores in every step (the same
function and gradients; the rebuild is a small product of the cores). This times one
optimizer step (forward, cross-entropy, backward, update) of the dense model and of the
compressed one in each mode, medians of interleaved repeats, 1 thread, fp32, for the models
of the experiments at their training batch:

- ``lstm``: the FSDD LSTM (configs/fsdd), input matrix TT rank 7 (117x), batch 64 x 16 steps;
- ``lenet5``: LeNet-5, TT 20x (MNIST), batch 128;
- ``resnet20``: ResNet-20, TT 6.8x (CIFAR-10), batch 128, channels_last.

    python benchmarks/bench_train_execution.py [--cases lstm lenet5 resnet20] [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import tdcompress as tdc
from tdcompress.layers import set_model_execution
from tdcompress.models import build_model
from tdcompress.train.checkpoint import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import step_fn  # noqa: E402  (one timed SGD step, shared)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "train_execution.json"


def make_case(name: str) -> tuple[dict[str, torch.nn.Module], torch.Tensor, str]:
    """label -> model (dense, factorized, rebuilt), the batch, and the plan's description."""
    torch.manual_seed(0)
    if name == "lstm":
        dense = build_model("lstm_speech", hidden_size=128, dropout=0.2)
        p = tdc.plan(dense, "tt", ranks=7, lstm=True)
        x = torch.randn(64, 16, 1025)
    elif name == "lenet5":
        dense = build_model("lenet5", num_classes=10)
        p = tdc.plan(dense, "tt", target_ratio=20.0, input_shape=(1, 1, 28, 28))
        x = torch.randn(128, 1, 28, 28)
    elif name == "resnet20":
        dense = build_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
        p = tdc.plan(dense, "tt", target_ratio=6.8, input_shape=(1, 3, 32, 32))
        x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    else:
        raise ValueError(f"cases must be some of ['lstm', 'lenet5', 'resnet20'], got {name!r}")
    factorized, _ = tdc.decompose(dense, p)
    rebuilt = copy.deepcopy(factorized)
    set_model_execution(rebuilt, "rebuilt")
    models = {"dense": dense, "factorized": factorized, "rebuilt": rebuilt}
    return models, x, f"TT {p.layers_ratio:.1f}x of its layers ({p.compressed_params:,} params)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["lstm", "lenet5", "resnet20"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {a.repeats}")
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    rows = []
    for name in a.cases:
        models, x, desc = make_case(name)
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        steps = {
            label: step_fn(m, tuple(x.shape[1:]), False, nhwc, int(x.shape[0]))
            for label, m in models.items()
        }
        for fn in steps.values():  # warm-up (plans, allocator)
            fn()
            fn()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(a.repeats):  # interleaved, the order turning each repeat
            order = list(steps)
            k = r % len(order)
            for label in order[k:] + order[:k]:
                times[label].append(steps[label]())
        med = {k: statistics.median(v) for k, v in times.items()}
        for label, t in med.items():
            rows.append(
                {
                    "case": name,
                    "plan": desc,
                    "batch": int(x.shape[0]),
                    "model": label,
                    "ms": 1000 * t,
                    "vs_dense": med["dense"] / t,
                    "vs_factorized": med["factorized"] / t,
                }
            )
    doc = {
        "meta": {
            "command": " ".join(["python benchmarks/bench_train_execution.py", *sys.argv[1:]]),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": a.threads,
            "repeats": a.repeats,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "rows": rows,
    }
    print("| case | plan | batch | model | ms / step | speed vs dense | speed vs factorized |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['plan']} | {r['batch']} | {r['model']} | {r['ms']:.1f} | "
            f"{r['vs_dense']:.2f}x | {r['vs_factorized']:.2f}x |"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
