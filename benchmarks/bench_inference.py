"""Whole-model inference latency: dense against compressed CIFAR ResNets, as deployed.

For ResNet-20 (and ResNet-32 with ``--models``): the dense model, TT at the paper's ratio
with its equal ranks (6.8x / 5.8x), TT at the same ratio with ``allocation="equal_ratio"``,
and Tucker-2 at 3x; first convolution and classifier dense, as in the experiments. Forward
latency (eval, no_grad, fp32) at each batch size in NCHW, in channels_last and, with
``--compile``, channels_last under ``torch.compile`` (inductor, plan caches warmed first);
median over repeats, every case interleaved in each repeat so that machine load hits them
alike. Parameters and planned MACs per sample (the plan's count) are listed beside the
times. Random weights: latency does not depend on them.

    python benchmarks/bench_inference.py [--models resnet20 resnet32] [--batches 1 32]
        [--repeats 15] [--compile] [--threads 1] [--out PATH]
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
from collections.abc import Callable
from pathlib import Path

import torch

import tdcompress as tdc
from tdcompress.models import build_model
from tdcompress.train.checkpoint import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
#: model -> the paper's TT ratio for it (configs/cifar10)
TT_RATIO = {"resnet20": 6.8, "resnet32": 5.8}
SHAPE = (3, 32, 32)


def make_variants(name: str) -> dict[str, tuple[torch.nn.Module, int, int]]:
    """label -> (model in eval mode, parameters, MACs per sample): the dense model and its
    compressions (random weights)."""
    torch.manual_seed(0)
    dense = build_model(name, num_classes=10).eval()
    ratio = TT_RATIO[name]
    inp = (1, *SHAPE)
    plans = {
        f"TT {ratio}x equal ranks": tdc.plan(dense, "tt", target_ratio=ratio, input_shape=inp),
        f"TT {ratio}x equal ratio": tdc.plan(
            dense, "tt", target_ratio=ratio, allocation="equal_ratio", input_shape=inp
        ),
        "Tucker-2 3x": tdc.plan(dense, "tucker2", target_ratio=3.0, input_shape=inp),
    }
    first = next(iter(plans.values()))
    out = {"dense": (dense, sum(p.numel() for p in dense.parameters()), first.model_macs)}
    for label, p in plans.items():
        model, _ = tdc.decompose(dense, p)
        out[label] = (model.eval(), p.compressed_params, p.compressed_macs)
    return out


def forward_fn(
    model: torch.nn.Module, batch: int, mode: str
) -> tuple[Callable[[], float], float | None]:
    """A timed forward of a copy of ``model`` in ``mode`` and, for a compiled mode, the
    seconds its first call took (the compile)."""
    nhwc = mode != "NCHW"
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    m = copy.deepcopy(model).to(memory_format=fmt)
    x = torch.randn(batch, *SHAPE).contiguous(memory_format=fmt)
    compile_s = None
    if mode.endswith("compiled"):
        tdc.layers.warm_plans(m, [tuple(x.shape)], channels_last=nhwc)
        m = torch.compile(m, dynamic=False)
    # several calls per sample at small batches, so each sample lasts a few milliseconds
    calls = max(1, 8 // batch)

    def run() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(calls):
                m(x)
        return (time.perf_counter() - t) / calls

    t0 = time.perf_counter()
    run()  # warm-up: plans, allocator (and the compile)
    if mode.endswith("compiled"):
        compile_s = time.perf_counter() - t0
    run()
    return run, compile_s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(TT_RATIO), default=["resnet20"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="add channels_last + torch.compile")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/inference-layouts.json")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if any(b < 1 for b in args.batches):
        raise SystemExit(f"--batches must be >= 1, got {args.batches}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    args.batches = list(dict.fromkeys(args.batches))
    torch.set_num_threads(args.threads)
    if not args.compile:
        return _run(args)
    # every (model, batch) case is its own compile of the same forward code; the default
    # limit (8 per code object) would silently leave the later cases eager
    with torch._dynamo.config.patch(cache_size_limit=1024):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    modes = ["NCHW", "channels_last"] + (["channels_last compiled"] if args.compile else [])
    fns, info, compile_s, times = {}, {}, {}, {}
    for name in args.models:
        for label, (model, params, macs) in make_variants(name).items():
            for batch in args.batches:
                for mode in modes:
                    key = (name, label, batch, mode)
                    fns[key], c = forward_fn(model, batch, mode)
                    info[key] = (params, macs)
                    if c is not None:
                        compile_s[key] = c
                    times[key] = []
    for _ in range(args.repeats):  # interleaved: load drifts hit every case alike
        for key, fn in fns.items():
            times[key].append(fn())
    rows = []
    for key, ts in times.items():
        name, label, batch, mode = key
        med = statistics.median(ts)
        dense = statistics.median(times[(name, "dense", batch, mode)])
        rows.append(
            {
                "model": name,
                "variant": label,
                "batch": batch,
                "mode": mode,
                "params": info[key][0],
                "macs_per_sample": info[key][1],
                "ms": 1000 * med,
                "images_per_s": batch / med,
                "speedup_vs_dense": dense / med,
                **({"compile_s": compile_s[key]} if key in compile_s else {}),
            }
        )
    doc = {
        "meta": {
            "torch": torch.__version__,
            "threads": args.threads,
            "repeats": args.repeats,
            "machine": platform.machine(),
            "loadavg": list(os.getloadavg()),
            "command": "python benchmarks/bench_inference.py " + " ".join(args.argv),
            "date": time.strftime("%Y-%m-%d"),
        },
        "rows": rows,
    }
    head = f"{'model':9} {'variant':24} {'batch':>5} {'mode':23} {'params':>8} {'MMACs':>6}"
    print(f"{head} {'ms':>8} {'vs dense':>8}")
    for r in rows:
        print(
            f"{r['model']:9} {r['variant']:24} {r['batch']:5d} {r['mode']:23} "
            f"{r['params']:8,d} {r['macs_per_sample'] / 1e6:6.1f} {r['ms']:8.2f} "
            f"{r['speedup_vs_dense']:7.2f}x"
        )
    atomic_write_text(args.out, json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
