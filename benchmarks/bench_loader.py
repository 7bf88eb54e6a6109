"""Throughput of ``tdcompress.data.TensorLoader`` next to a ResNet-20 training step.

CIFAR-10-sized uint8 data (the real training set when found under the data root, random
bytes otherwise) at batch 128: images/s of one loader pass without augmentation, with
augmentation (random crop with 4-pixel padding + flip, normalisation) and with
augmentation in channels_last; images/s of a ResNet-20 training step (forward, backward,
SGD with momentum) in fp32 and bf16 autocast, both channels_last (and fp32 contiguous for
reference); and a short real training loop fed by the augmenting loader, so the share of
time spent in data loading shows directly.

    python benchmarks/bench_loader.py [--quick] [--threads 2] [--device cpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tdcompress.data import Augment, TensorLoader, load_dataset
from tdcompress.models.resnet_cifar import resnet20

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cifar_like(root: Path, n: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The CIFAR-10 training set if readable under ``root``, else random uint8 data."""
    try:
        x, y = load_dataset("cifar10", root, "train")
        src = f"cifar10 train ({root})"
    except (OSError, ValueError):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (50_000,), generator=g)
        src = "random uint8 (50000, 3, 32, 32)"
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y, src


def loader_pass(loader: TensorLoader, device: torch.device, repeats: int) -> dict[str, float]:
    """Median images/s over ``repeats`` full passes (each epoch reshuffled)."""
    times = []
    for e in range(repeats + 1):
        loader.set_epoch(e)
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        _sync(device)
        if e:  # the first pass warms up the allocator
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"images_per_s": n / med, "ms_per_batch": 1e3 * med / len(loader)}


def train_step_fn(
    device: torch.device, batch: int, channels_last: bool, dtype: torch.dtype | None
) -> Callable[[], None]:
    """One ResNet-20 training step on a fixed random batch (autocast to ``dtype`` if set)."""
    torch.manual_seed(0)
    model = resnet20().to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def median_ms(fn: Callable[[], None], device: torch.device, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def fed_training(loader: TensorLoader, device: torch.device, steps: int) -> dict[str, float]:
    """ResNet-20 fp32 channels_last trained from ``loader`` for ``steps`` batches."""
    torch.manual_seed(0)
    model = resnet20().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    load_s, n, it = 0.0, 0, iter(loader)
    _sync(device)
    t_start = time.perf_counter()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            _sync(device)
            t_start, load_s, n = time.perf_counter(), 0.0, 0
        _sync(device)  # the previous step's queued kernels are not loading time
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        _sync(device)
        load_s += time.perf_counter() - t0
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    _sync(device)
    total = time.perf_counter() - t_start
    return {"images_per_s": n / total, "loading_share": load_s / total}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000 images, few steps (smoke run)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per case")
    ap.add_argument("--data-root", default=os.environ.get("TDCOMPRESS_DATA_ROOT"))
    ap.add_argument("--out", default="benchmarks/results/loader.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = Path(args.data_root or Path(__file__).resolve().parents[2] / "shared" / "data")
    x, y, src = cifar_like(root, 5_000 if args.quick else None)
    steps = args.steps or (3 if args.quick else 20)
    repeats = 1 if args.quick else 3
    print(f"data: {src}; device {device}; {args.threads} threads; batch {args.batch}")

    def loader(aug: bool, cl: bool) -> TensorLoader:
        return TensorLoader(
            x, y, args.batch, device=device, shuffle=True, seed=0,
            augment=Augment(4, True) if aug else None, mean=CIFAR_MEAN, std=CIFAR_STD,
            drop_last=True, channels_last=cl,
        )  # fmt: skip

    rows = []
    for name, aug, cl in [
        ("loader, no augmentation", False, False),
        ("loader, crop+flip+normalize", True, False),
        ("loader, crop+flip+normalize, NHWC", True, True),
    ]:
        r = loader_pass(loader(aug, cl), device, repeats)
        rows.append({"case": name, **r})
    for name, cl, dtype in [
        ("ResNet-20 train step fp32 NCHW", False, None),
        ("ResNet-20 train step fp32 NHWC", True, None),
        ("ResNet-20 train step bf16 autocast NHWC", True, torch.bfloat16),
    ]:
        ms = median_ms(train_step_fn(device, args.batch, cl, dtype), device, steps)
        rows.append({"case": name, "images_per_s": args.batch * 1e3 / ms, "ms_per_batch": ms})
    fed = fed_training(loader(True, True), device, steps)
    rows.append(
        {
            "case": "ResNet-20 fp32 NHWC fed by the augmenting loader",
            "images_per_s": fed["images_per_s"],
            "ms_per_batch": args.batch * 1e3 / fed["images_per_s"],
            "loading_share": fed["loading_share"],
        }
    )
    print(f"{'case':50s} {'images/s':>10s} {'ms/batch':>9s}")
    for r in rows:
        share = (
            f"  ({100 * r['loading_share']:.1f}% of the time in loading)"
            if ("loading_share" in r)
            else ""
        )
        print(f"{r['case']:50s} {r['images_per_s']:10.0f} {r['ms_per_batch']:9.2f}{share}")
    meta = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": args.threads,
        "batch": args.batch,
        "data": src,
        "images": len(x),
        "quick": args.quick,
        "machine": platform.machine(),
        "loadavg": os.getloadavg(),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
    }
    result = {"meta": meta, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
