"""Training-step throughput by precision and memory format, dense and compressed.

For LeNet-5 (MNIST-sized input) and ResNet-20 (CIFAR-sized input), dense and compressed by
the plan the experiments use (TT at 20x for LeNet-5, TT at 6.8x for ResNet-20): images/s of
one SGD step (forward, cross-entropy, backward, momentum update) at batch 128 in fp32 NCHW,
fp32 channels_last and bf16 autocast channels_last, and with ``--compile`` the last under
``torch.compile`` (inductor; plan caches warmed first), once with static shapes (what
``runtime.compile`` does) and once with ``dynamic=True``; for both the time of the first step
(the compile) and of the first step at the epoch's last, smaller batch (``--last-batch``; a
static graph compiles again there) are reported; median over repeats, all cases interleaved
in one run so that machine load hits them alike.

    python benchmarks/bench_train_step.py [--threads 1] [--repeats 15] [--compile] [--out PATH]
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
import torch.nn.functional as F

import tdcompress as tdc
from tdcompress.models import build_model
from tdcompress.train.checkpoint import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "lenet5": ((1, 28, 28), "tt", 20.0),
    "resnet20": ((3, 32, 32), "tt", 6.8),
}
TRAIN_IMAGES = {"lenet5": 60_000, "resnet20": 50_000}  # MNIST, CIFAR-10: the last batch
MODES = (("fp32", False, False), ("fp32 NHWC", False, True), ("bf16 NHWC", True, True))
COMPILED = (("bf16 NHWC compiled", True, True), ("bf16 NHWC compiled dynamic", True, True))
DYNAMIC = {"bf16 NHWC compiled": False, "bf16 NHWC compiled dynamic": True}


def last_batch(name: str, batch: int, given: int | None) -> int:
    """``given``, or the size of an epoch's last batch of ``name``'s training set."""
    return given or TRAIN_IMAGES[name] % batch or batch


def make_models(name: str) -> dict[str, torch.nn.Module]:
    shape, fmt, ratio = CASES[name]
    torch.manual_seed(0)
    dense = build_model(name, num_classes=10)
    p = tdc.plan(dense, fmt, target_ratio=ratio, input_shape=(1, *shape))
    compressed, _ = tdc.decompose(dense, p)
    return {"dense": dense, f"{fmt} {p.ratio:.1f}x": compressed}


def step_fn(
    model: torch.nn.Module,
    shape,
    bf16: bool,
    nhwc: bool,
    batch: int,
    dynamic: bool | None = None,
    last_batch: int | None = None,
):
    """One timed SGD step at ``batch`` (``step()``; ``step(last=True)`` at ``last_batch``).
    ``dynamic``: None eager, else torch.compile with that ``dynamic=`` (plans warmed first,
    as runtime.compile does, for both batch sizes)."""
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    model = copy.deepcopy(model).to(memory_format=fmt)  # .to() converts in place
    sizes = {batch} if last_batch is None else {batch, last_batch}
    xs = {b: torch.randn(b, *shape).contiguous(memory_format=fmt) for b in sizes}
    ys = {b: torch.randint(0, 10, (b,)) for b in xs}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if dynamic is not None:
        tdc.layers.warm_plans(model, [tuple(x.shape) for x in xs.values()], channels_last=nhwc)
        model = torch.compile(model, dynamic=dynamic)

    def step(last: bool = False) -> float:
        b = last_batch if last else batch
        x, y = xs[b], ys[b]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument(
        "--compile",
        action="store_true",
        help="add bf16 NHWC under torch.compile, static and dynamic shapes",
    )
    ap.add_argument(
        "--last-batch",
        type=int,
        default=None,
        help="batch size stepped once after the compile (default: the epoch's last batch, "
        "training images mod --batch: 80 for CIFAR-10 at 128, 96 for MNIST)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/train_step.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, times, compile_s = {}, {}, {}
    modes = MODES + (COMPILED if args.compile else ())
    lasts = {name: last_batch(name, args.batch, args.last_batch) for name in args.models}
    for name in args.models:
        for variant, model in make_models(name).items():
            for mode, bf16, nhwc in modes:
                key = (name, variant, mode)
                dyn = DYNAMIC.get(mode)
                last = lasts[name]
                steps[key] = step_fn(model, CASES[name][0], bf16, nhwc, args.batch, dyn, last)
                t0 = time.perf_counter()
                steps[key]()  # warm-up (and the compile)
                if dyn is not None:
                    t1 = time.perf_counter()
                    steps[key](last=True)  # the last batch: a static graph compiles again
                    t2 = time.perf_counter()
                    compile_s[key] = {"first_step_s": t1 - t0, "first_last_batch_step_s": t2 - t1}
                steps[key]()
                times[key] = []
    for _ in range(args.repeats):  # interleaved: load drifts hit every case alike
        for key, step in steps.items():
            times[key].append(step())
    rows = []
    for key, ts in times.items():
        name, variant, mode = key
        med = statistics.median(ts)
        base = statistics.median(times[(name, variant, "fp32")])
        rows.append(
            {
                "model": name,
                "variant": variant,
                "mode": mode,
                "ms_per_step": 1000 * med,
                "images_per_s": args.batch / med,
                "speedup_vs_fp32": base / med,
                **(compile_s.get(key, {})),
            }
        )
    doc = {
        "meta": {
            "torch": torch.__version__,
            "threads": args.threads,
            "batch": args.batch,
            "repeats": args.repeats,
            "last_batch": lasts,
            "machine": platform.machine(),
            "loadavg": list(os.getloadavg()),
            "command": "python benchmarks/bench_train_step.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "rows": rows,
    }
    print(f"{'model':9} {'variant':10} {'mode':18} {'ms/step':>8} {'img/s':>7} {'vs fp32':>7}")
    for r in rows:
        extra = (
            f"  (first step {r['first_step_s']:.0f} s, first last-batch step "
            f"{r['first_last_batch_step_s']:.0f} s)"
            if "first_step_s" in r
            else ""
        )
        print(
            f"{r['model']:9} {r['variant']:10} {r['mode']:18} {r['ms_per_step']:8.1f} "
            f"{r['images_per_s']:7.0f} {r['speedup_vs_fp32']:6.2f}x{extra}"
        )
    atomic_write_text(args.out, json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
