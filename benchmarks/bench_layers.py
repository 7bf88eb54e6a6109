"""Latency of the factorized layers against the dense layer and tensorly-torch (issue 3).

Forward (no_grad) and forward+backward medians at batch 1, 32 and 256 for:
ResNet-20's 3x3 convs (16, 32, 64 channels on 32x32, 16x16, 8x8) at the largest uniform
rank giving >= 6.8x fewer parameters per layer, a 4096x4096 TT/TR matrix ([8,8,8,8]^2) at
ranks 8 and 16, and the UCF11 TT-LSTM input layer (57,600 -> 4 x 256 as 8x20x20x18 ->
4x4x4x16, rank 4). Every registered format that supports the layer kind is timed; MACs
(the layer's planned contraction at that batch, and the dense op's) are reported beside
the times. tensorly-torch: ``FactorizedLinear(factorization="blocktt")`` is the same
TT-matrix; for convs its TT of the 4-way kernel [O, I, kh, kw] at the same rank is the
closest layer it has (not the same layout as ours).

Tucker-2 ("tucker2", convs only) and low rank ("svd", convs and matrices) run on the same
cases at the largest uniform rank whose layer has no more parameters than that case's TT
layer (rank 1 at least). tensorly-torch: ``FactorizedConv(factorization="tucker",
rank=(r, r, kh, kw))`` is the same Tucker-2 layer (full rank on the spatial modes);
``FactorizedLinear(factorization="cp")`` on the untensorized (M, N) matrix is the same
rank-r matrix; it has no low-rank (O, I kh kw) conv, so those rows have no tltorch column.

    python benchmarks/bench_layers.py [--quick] [--threads 2] [--channels-last] [--out PATH]
        [--formats tt,tr,tucker2,svd] [--budget SECONDS]

The machine is shared; set MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ high for the
allocator effect described in docs/performance.md; both settings are recorded.
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
from torch import nn

import tdcompress.formats.lowrank  # noqa: F401
import tdcompress.formats.tr  # noqa: F401
import tdcompress.formats.tt  # noqa: F401
import tdcompress.formats.tucker2  # noqa: F401
from tdcompress.formats.base import FactorSpec, Format, LayerGeometry, available_formats, get_format
from tdcompress.formats.lowrank import lowrank_plans
from tdcompress.formats.tucker2 import tucker2_plans
from tdcompress.layers import build

#: formats timed at the parameter count of the case's TT layer instead of at a given rank
PARAM_MATCHED = ("tucker2", "svd")

try:  # optional competitor
    import tltorch
except Exception:  # pragma: no cover - optional
    tltorch = None


def median_ms(fn: Callable[[], object], min_runs: int = 5, budget_s: float = 2.0) -> float:
    fn()
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        module(x).sum().backward()

    return run


def fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def rank_for_ratio(fmt: Format, geo: LayerGeometry, ratio: float, **kw) -> FactorSpec:
    """The largest uniform rank whose layer has >= ``ratio`` times fewer parameters."""
    best = fmt.resolve(geo, 1, **kw)
    r = 1
    while r < 4096:
        spec = fmt.resolve(geo, r + 1, **kw)
        if geo.dense_params / fmt.num_params(geo, spec) < ratio or spec == best:
            break
        best, r = spec, r + 1
    return best


def tt_spec(case: dict) -> FactorSpec:
    """The TT spec the ``"tt"`` rows of ``case`` use."""
    tt = get_format("tt")
    kw = case.get("kw", {})
    if "rank" in case:
        return tt.resolve(case["geo"], case["rank"], **kw)
    return rank_for_ratio(tt, case["geo"], 6.8, **kw)


def resolve_spec(case: dict, fmt: Format) -> FactorSpec:
    """TT/TR: the case's rank or the 6.8x rule; Tucker-2/low rank: the largest uniform rank
    with no more parameters than the case's TT layer."""
    geo, kw = case["geo"], case.get("kw", {})
    if fmt.name in PARAM_MATCHED:
        target = get_format("tt").num_params(geo, tt_spec(case))
        return rank_for_ratio(fmt, geo, geo.dense_params / target)
    if "rank" in case:
        return fmt.resolve(geo, case["rank"], **kw)
    return rank_for_ratio(fmt, geo, 6.8, **kw)


def cases(quick: bool) -> list[dict]:
    out = []
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        geo = LayerGeometry("conv2d", c, c, kernel_size=(3, 3), padding=(1, 1))
        out.append({"name": f"resnet20-conv{c}-{hw}x{hw}", "geo": geo, "hw": (hw, hw)})
    for r in (8, 16):
        geo = LayerGeometry.linear(4096, 4096)
        f = {"out_factors": (8, 8, 8, 8), "in_factors": (8, 8, 8, 8)}
        out.append({"name": f"fc4096-r{r}", "geo": geo, "hw": None, "rank": r, "kw": f})
    if not quick:
        geo = LayerGeometry.linear(57600, 1024)
        f = {"out_factors": (4, 4, 4, 16), "in_factors": (8, 20, 20, 18)}
        out.append({"name": "ucf11-input", "geo": geo, "hw": None, "rank": 4, "kw": f})
    return out


def tltorch_layer(case: dict, spec: FactorSpec, fmt_name: str) -> nn.Module | None:
    geo = case["geo"]
    if tltorch is None or fmt_name not in ("tt", "tucker2", "svd"):
        return None
    if fmt_name == "tucker2":
        ro, ri = spec.ranks
        return tltorch.FactorizedConv(
            geo.in_features,
            geo.out_features,
            3,
            order=2,
            padding=1,
            factorization="tucker",
            rank=(ro, ri, 3, 3),
            implementation="factorized",
        )
    if fmt_name == "svd":
        if geo.kind != "linear":
            return None  # no low-rank (O, I kh kw) conv in tensorly-torch
        return tltorch.FactorizedLinear(
            (geo.in_features,), (geo.out_features,), factorization="cp", rank=spec.ranks[0]
        )
    r = max(spec.ranks)
    if geo.kind == "linear":
        ranks = (1, *spec.ranks, 1)
        return tltorch.FactorizedLinear(
            spec.in_factors, spec.out_factors, factorization="blocktt", rank=ranks
        )
    return tltorch.FactorizedConv(
        geo.in_features, geo.out_features, 3, order=2, padding=1, factorization="tt", rank=r
    )


def dense_layer(geo: LayerGeometry, weight: torch.Tensor) -> nn.Module:
    if geo.kind == "linear":
        m: nn.Module = nn.Linear(geo.in_features, geo.out_features)
    else:
        m = nn.Conv2d(geo.in_features, geo.out_features, geo.kernel_size, padding=geo.padding)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip UCF11 and batch 256")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/bench_layers.json")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--channels-last", action="store_true", help="conv inputs in NHWC")
    ap.add_argument(
        "--formats",
        default=",".join(available_formats()),
        help="comma-separated formats to time (default: all registered)",
    )
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(available_formats()))
    if unknown or not formats:
        ap.error(f"--formats {args.formats!r}: unknown {unknown}; allowed: {available_formats()}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = (1, 32) if args.quick else (1, 32, 256)
    rows = []
    for case in cases(args.quick):
        geo, hw = case["geo"], case["hw"]
        w = torch.randn(geo.weight_shape) * (geo.weight_shape[1] * (9 if hw else 1)) ** -0.5
        dense = dense_layer(geo, w)
        for name in formats:
            fmt = get_format(name)
            if geo.kind not in fmt.kinds:
                continue
            try:
                spec = resolve_spec(case, fmt)
                layer = build(fmt, geo, fmt.decompose(w, spec), spec, dense.bias.detach())
            except (ValueError, TypeError) as e:
                print(f"skip {case['name']} {name}: {e}")
                continue
            tl = tltorch_layer(case, spec, name)
            for b in batches:
                shape = (b, geo.in_features, *hw) if hw else (b, geo.in_features)
                x = torch.randn(shape)
                if hw and args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                macs = _planned_macs(fmt, layer, geo, spec, hw, b)
                row = {
                    "case": case["name"],
                    "format": name,
                    "ranks": list(spec.ranks),
                    "out_factors": list(spec.out_factors or ()),
                    "in_factors": list(spec.in_factors or ()),
                    "batch": b,
                    "params": fmt.num_params(geo, spec),
                    "dense_params": geo.dense_params,
                    "macs": macs,
                    "dense_macs": b * geo.dense_macs(hw),
                    "fwd_ms": median_ms(fwd(layer, x), budget_s=args.budget),
                    "fwd_bwd_ms": median_ms(fwd_bwd(layer, x), budget_s=args.budget),
                    "dense_fwd_ms": median_ms(fwd(dense, x), budget_s=args.budget),
                    "dense_fwd_bwd_ms": median_ms(fwd_bwd(dense, x), budget_s=args.budget),
                }
                if tl is not None:
                    row["tltorch_fwd_ms"] = median_ms(fwd(tl, x), budget_s=args.budget)
                    row["tltorch_fwd_bwd_ms"] = median_ms(fwd_bwd(tl, x), budget_s=args.budget)
                rows.append(row)
                print(_fmt_row(row), flush=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "channels_last": args.channels_last,
        "machine": platform.machine(),
        "loadavg": os.getloadavg(),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "tltorch": getattr(tltorch, "__version__", None),
        "formats": formats,
        "budget_s": args.budget,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def _planned_macs(fmt, layer, geo, spec, hw, batch) -> int:
    st = getattr(layer, "structure", None)
    if st is not None:  # TT/TR layers plan per batch size
        return st.count_macs(geo, hw, batch)
    if fmt.name == "tucker2":  # the layer runs the cheapest plan for the batch
        return min(tucker2_plans(geo, tuple(spec.ranks), batch, hw).values())
    if fmt.name == "svd":
        return min(lowrank_plans(geo, spec.ranks[0], batch, hw).values())
    return batch * fmt.macs(geo, spec, hw)


def _fmt_row(r: dict) -> str:
    tl = r.get("tltorch_fwd_ms")
    tl_s = f" tltorch {tl:8.3f}/{r['tltorch_fwd_bwd_ms']:8.3f}" if tl is not None else ""
    return (
        f"{r['case']:22s} {r['format']:7s} b={r['batch']:<4d} ranks={r['ranks']} "
        f"MACs {r['macs'] / r['dense_macs']:.3f}x dense | fwd/fwd+bwd ms: "
        f"ours {r['fwd_ms']:8.3f}/{r['fwd_bwd_ms']:8.3f} dense {r['dense_fwd_ms']:8.3f}/"
        f"{r['dense_fwd_bwd_ms']:8.3f}{tl_s}"
    )


if __name__ == "__main__":
    main()
