"""``tdcompress bench CONFIG``: a run's dense and compressed models side by side, as deployed.

For each runtime (PyTorch eager, ``torch.compile``, ONNX Runtime), thread count and batch
size: forward latency (eval, no grad, fp32, CPU) of the dense model and of the compressed
one, the medians of interleaved repeats (the models timed in turn within each runtime,
batch size and thread count, in alternating order, so that load drifts hit them alike;
each sample several calls lasting at least :data:`SAMPLE_SECONDS`; ONNX Runtime's idle
workers do not spin), and the ratio ``dense / compressed`` (above 1: the compressed model
is faster) with a 95% interval of the repeat-by-repeat ratios (:func:`median_ci95`).
Beside them: parameters, planned MACs per sample, the ONNX file size, and the
peak resident memory of a fresh process that loads the model and runs one forward at the
largest batch (eager and ONNX Runtime).

The compressed model first makes its per-layer execution choice for each thread count and
batch size (one deployed model per case; :func:`tdcompress.layers.choose_execution`,
timing a rebuilt layer with its kernel computed once, ``folded=True``; for
``torch.compile`` the whole-model check runs compiled) and, for eager and compiled PyTorch,
is deployed as a user would: the layers (and LSTMs) that run rebuilt become PyTorch's own
layers (:func:`tdcompress.densify` with :func:`tdcompress.layers.rebuilt_everywhere`), as
ONNX Runtime folds their kernels at load; the layers that run rebuilt are listed per
runtime. Timings on a loaded machine are not
results: rerun on a quiet one (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["RUNTIMES", "WEIGHTS", "bench_models", "bench_run", "format_table", "median_ci95"]

#: the runtimes ``tdcompress bench`` times
RUNTIMES = ("eager", "compile", "onnxruntime")
#: seconds one timed sample lasts at least (several calls of a fast forward), within
#: MAX_CALLS calls; a sample's time is per call
SAMPLE_SECONDS = 0.005
MAX_CALLS = 64
#: the run's compressed models bench_run times (file stem -> the stage that writes it)
WEIGHTS = {"finetuned": "finetune", "decomposed": "decompose"}


def _check_args(
    batch_sizes: Sequence[int], threads: Sequence[int], runtimes: Sequence[str], repeats: int
) -> None:
    for name, vals in (("batch_sizes", batch_sizes), ("threads", threads)):
        if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
            raise ValueError(f"{name} must be ints >= 1, got {list(vals)!r}")
    bad = [r for r in runtimes if r not in RUNTIMES]
    if not runtimes or bad:
        raise ValueError(f"runtimes must be some of {list(RUNTIMES)}, got {list(runtimes)!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if "onnxruntime" in runtimes:
        import importlib.util

        for mod in ("onnxruntime", "onnx", "onnxscript"):
            if importlib.util.find_spec(mod) is None:
                raise ImportError(
                    f"the onnxruntime runtime needs the {mod!r} package: "
                    "pip install 'tdcompress[deploy]' (or leave onnxruntime out of --runtimes)"
                )


def bench_models(
    models: dict[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    threads: Sequence[int] = (1,),
    runtimes: Sequence[str] = RUNTIMES,
    repeats: int = 15,
    choose: bool = True,
    choice_repeats: int = 20,
    memory: bool = True,
    macs: dict[str, int | None] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Time ``models`` (label -> model; the first is the reference, e.g. ``"dense"``) on
    inputs of ``(batch, *input_shape[1:])``, on CPU. ``choose``: let the factorized layers
    make their execution choice first. ``memory``: also measure the peak memory of a fresh
    process per model and runtime (eager, ONNX Runtime). ``channels_last``: 4-d inputs and
    the models in that layout for eager and compiled PyTorch (ONNX graphs have one layout).
    Returns the JSON-able document :func:`format_table` prints."""
    batch_sizes = list(dict.fromkeys(batch_sizes))
    threads = list(dict.fromkeys(threads))
    runtimes = list(dict.fromkeys(runtimes))
    _check_args(batch_sizes, threads, runtimes, repeats)
    from tdcompress.export import export_model
    from tdcompress.layers import (
        choose_execution,
        fold_kernels,
        rebuilt_everywhere,
        rebuilt_layers,
    )
    from tdcompress.surgery import densify

    shape = tuple(int(v) for v in input_shape[1:])
    tmp = Path(tempfile.mkdtemp(prefix="tdcompress-bench-", dir=workdir))
    info: dict[str, dict[str, Any]] = {}
    fns: dict[tuple[str, str, int, int], Callable[[], float]] = {}
    old_threads = torch.get_num_threads()
    limits = _compile_limits() if "compile" in runtimes else contextlib.nullcontext()
    try:
        limits.__enter__()
        # one model per runtime, thread count and batch size, each deployed as a user would
        # deploy it there: the execution choice made at that thread count for that input
        # shape (a factorized contraction may win at 1 thread and lose at 2, or win at
        # batch 32 and lose at 1), then PyTorch's own layers for what runs dense
        prepared: dict[tuple[str, str, int, int], nn.Module] = {}
        for label, model in models.items():
            model = copy.deepcopy(model).cpu().float().eval()
            rec: dict[str, Any] = {
                "params": sum(p.numel() for p in model.parameters()),
                "macs_per_sample": None if macs is None else macs.get(label),
                "rebuilt_layers": {},  # (at threads[0], for some batch size; per case below)
                "rebuilt_layers_by_case": {},
                "densified_layers_by_case": {},
            }
            for t in threads:
                torch.set_num_threads(t)
                for rt in runtimes:
                    nhwc = channels_last and len(shape) == 3 and rt != "onnxruntime"
                    for b in batch_sizes:
                        m = copy.deepcopy(model)
                        if nhwc:
                            m = m.to(memory_format=torch.channels_last)
                        if choose:
                            choose_execution(  # (compile: the whole-model check compiled)
                                m,
                                [(b, *shape)],
                                repeats=choice_repeats,
                                folded=True,
                                channels_last=nhwc,
                                compiled=rt == "compile",
                            )
                            case = f"{t} threads, batch {b}"
                            names = rebuilt_layers(m)
                            rec["rebuilt_layers_by_case"].setdefault(case, {})[rt] = names
                            if t == threads[0]:
                                seen = rec["rebuilt_layers"].setdefault(rt, [])
                                seen += [n for n in names if n not in seen]
                            if rt != "onnxruntime":  # (ONNX Runtime folds them at load)
                                dense = rebuilt_everywhere(m)
                                m = densify(m, inplace=True, layers=dense)
                                fold_kernels(m, channels_last=nhwc)  # (the rest, if any)
                                rec["densified_layers_by_case"].setdefault(case, {})[rt] = dense
                        prepared[(label, rt, t, b)] = m
            if "onnxruntime" in runtimes:
                m = prepared[(label, "onnxruntime", threads[0], batch_sizes[0])]
                x1 = torch.randn(1, *shape)
                res = export_model(m, x1, tmp / f"{label}-b1.onnx")
                rec["onnx_bytes"] = res.file_bytes
            info[label] = rec
        built: dict[tuple[Any, ...], Any] = {}  # compiled modules and ONNX files, reused
        for t in threads:
            torch.set_num_threads(t)
            for (label, rt, tm, b), m in prepared.items():
                if tm != t:
                    continue
                nhwc = channels_last and len(shape) == 3 and rt != "onnxruntime"
                fns[(label, rt, t, b)] = _forward(
                    m, rt, (b, *shape), t, tmp / label / f"t{t}b{b}", nhwc, built
                )
        del built
        times: dict[tuple[str, str, int, int], list[float]] = {k: [] for k in fns}
        for t in threads:
            torch.set_num_threads(t)
            # one block per runtime and batch size, the models interleaved within it: with
            # several threads a runtime's idle workers spin for a while after each call and
            # would take the cores from the next runtime's (a pause between blocks)
            for rt in runtimes:
                for b in batch_sizes:
                    keys = [k for k in fns if k[1:] == (rt, t, b)]
                    time.sleep(0.2 if t > 1 else 0.0)
                    for i in range(repeats):  # (the order reversed every other repeat)
                        for k in keys if i % 2 == 0 else keys[::-1]:
                            times[k].append(fns[k]())
        if memory:
            big = (max(batch_sizes), *shape)
            for label in models:
                info[label]["peak_rss_mib"] = {}
                for rt in ("eager", "onnxruntime"):
                    if rt in runtimes:
                        info[label]["peak_rss_mib"][rt] = _peak_rss(
                            prepared[(label, rt, threads[0], max(batch_sizes))],
                            rt,
                            big,
                            threads[0],
                            tmp / f"mem-{label}",
                        )
    finally:
        limits.__exit__(None, None, None)
        torch.set_num_threads(old_threads)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    ref = next(iter(models))
    rows = []
    for (label, rt, t, b), ts in times.items():
        med = statistics.median(ts)
        ref_ts = times[(ref, rt, t, b)]
        rows.append(
            {
                "model": label,
                "runtime": rt,
                "threads": t,
                "batch": b,
                "ms": 1000 * med,
                "speedup_vs_" + ref: statistics.median(ref_ts) / med,
                # the repeat-by-repeat ratios (timed side by side): a 95% interval of their
                # median, how far the speedup may be trusted on this machine now
                "speedup_ci95": median_ci95([r / x for r, x in zip(ref_ts, ts)]),
            }
        )
    return {
        "meta": {
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "repeats": repeats,
            "execution_choice": choose,
            "input_shape": list(shape),
            "reference": ref,
            "date": time.strftime("%Y-%m-%d"),
        },
        "models": info,
        "rows": rows,
    }


def median_ci95(values: Sequence[float]) -> list[float]:
    """A distribution-free 95% confidence interval ``[low, high]`` of the median of
    ``values`` (order statistics ``n/2 -+ 0.98 sqrt(n)``, the normal approximation of the
    binomial; the whole range for fewer than 6 values)."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        raise ValueError("median_ci95 needs at least one value")
    half = 0.98 * math.sqrt(n)
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    return [v[lo], v[hi]] if n >= 6 else [v[0], v[-1]]


@contextlib.contextmanager
def _compile_limits() -> Iterator[None]:
    """Raise dynamo's recompile limits: every (model, batch, threads) case compiles the same
    forward code again, and past the default limit (8) the later cases would run eager."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    limits = {name: 4096}
    for acc in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, acc):
            limits[acc] = 8192
            break
    with cfg.patch(**limits):
        yield


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _forward(
    model: nn.Module,
    runtime: str,
    shape: tuple[int, ...],
    threads: int,
    folder: Path,
    channels_last: bool = False,
    built: dict[tuple[Any, ...], Any] | None = None,
) -> Callable[[], float]:
    """A timed forward (seconds per call) of ``model`` in ``runtime`` at ``shape``, warmed.
    ``built``: a cache shared between calls, so that a model compiles once (its graph per
    batch size serves every thread count) and is exported once per batch size."""
    built = {} if built is None else built
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = 1
    if runtime == "onnxruntime":
        import onnxruntime as ort

        from tdcompress.export import export_model

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"b{shape[0]}.onnx"
        if (id(model), "onnx", shape) not in built:
            export_model(model, x, path)
            built[(id(model), "onnx", shape)] = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle workers sleep instead of spinning (they would compete with the next call's)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}

        def call() -> None:
            sess.run(None, feed)

    else:
        m = model
        if runtime == "compile":
            from tdcompress.layers import warm_plans

            warm_plans(model, [shape], channels_last=channels_last)
            m = built.get((id(model), "compiled"))
            if m is None:
                m = built[(id(model), "compiled")] = torch.compile(model, dynamic=False)

        def call() -> None:
            with torch.no_grad():
                m(x)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - t0) / calls

    run()  # warm-up: plans, allocator, the compile, the session's first run
    # as many calls per sample as take SAMPLE_SECONDS (at most MAX_CALLS): a scheduler tick
    # or a worker thread's late wake-up then weighs little against the sample
    calls = max(1, min(MAX_CALLS, math.ceil(SAMPLE_SECONDS / max(run(), 1e-7))))
    run()
    return run


def _peak_rss(
    model: nn.Module, runtime: str, shape: tuple[int, ...], threads: int, folder: Path
) -> dict[str, float]:
    """Peak resident memory (MiB) of a fresh process: after its imports (``baseline``) and
    after loading the model and running one forward of ``shape`` (``peak``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if runtime == "onnxruntime":
        from tdcompress.export import export_model

        path = folder / "m.onnx"
        export_model(model, torch.randn(shape), path)
    else:
        path = folder / "m.pt"
        torch.save(model, path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        base, peak = pool.apply(_child_rss, (str(path), runtime, shape, threads))
    return {"baseline": base, "peak": peak, "model_and_forward": peak - base}


def _child_rss(
    path: str, runtime: str, shape: tuple[int, ...], threads: int
) -> tuple[float, float]:
    import resource

    import numpy as np

    def rss() -> float:  # ru_maxrss: KiB on Linux, bytes on macOS
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024

    def now() -> float:  # the current RSS, after resetting the peak (Linux >= 4.0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024
        except OSError:
            pass
        return rss()  # (no reset: the peak of the imports may hide the model's)

    def peak() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024
        except OSError:
            pass
        return rss()

    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        base = now()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: x})
        return base, peak()
    torch.set_num_threads(threads)
    base = now()
    model = torch.load(path, weights_only=False)
    with torch.no_grad():
        model(torch.from_numpy(x))
    return base, peak()


def bench_run(
    pipe: Any,
    *,
    weights: str = "finetuned",
    out: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`bench_models` on a pipeline run's dense model (``dense.pt``; the untrained
    architecture when the run deferred it: latency and size do not depend on the weights)
    and its ``weights`` model ("finetuned" or "decomposed"); writes the document to ``out``
    (default ``<out_dir>/bench.json``) and returns it."""
    from tdcompress.train.checkpoint import atomic_write_text, load_checkpoint

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {sorted(WEIGHTS)}, got {weights!r}")
    ckpt = pipe.out / f"{weights}.pt"
    if not ckpt.is_file():
        stage = WEIGHTS[weights]
        raise FileNotFoundError(
            f"{str(ckpt)!r} does not exist: run the {stage} stage of this config first"
        )
    dense = pipe.dense_model()
    dense_note = "dense.pt"
    if (pipe.out / "dense.pt").is_file():
        dense.load_state_dict(load_checkpoint(pipe.out / "dense.pt", "cpu")["model"])
    else:
        dense_note = "architecture only (no dense.pt; timings do not depend on weights)"
    comp = pipe.compressed_model(ckpt.name)
    plan = pipe.load_plan()
    macs = {"dense": plan.model_macs, "compressed": plan.compressed_macs}
    sample = (1, *pipe.input_shape()[1:])
    macs = {k: None if v is None else int(v) for k, v in macs.items()}
    doc = bench_models(
        {"dense": dense, "compressed": comp}, sample, macs=macs, workdir=pipe.out, **kwargs
    )
    doc["meta"].update({"run": str(pipe.out), "weights": weights, "dense_weights": dense_note})
    path = Path(out) if out is not None else pipe.out / "bench.json"
    atomic_write_text(path, json.dumps(doc, indent=2))
    doc["meta"]["written_to"] = str(path)
    return doc


def format_table(doc: dict[str, Any]) -> str:
    """The side-by-side table of a :func:`bench_models` document."""
    ref = doc["meta"]["reference"]
    labels = list(doc["models"])
    other = [x for x in labels if x != ref]
    lines = []
    for label, rec in doc["models"].items():
        m = rec.get("macs_per_sample")
        parts = [f"{label}: {rec['params']:,} params"]
        if m is not None:
            parts.append(f"{m / 1e6:.3g} MMACs/sample")
        if "onnx_bytes" in rec:
            parts.append(f"ONNX {rec['onnx_bytes'] / 1024:.1f} KiB")
        for rt, mem in rec.get("peak_rss_mib", {}).items():
            parts.append(f"peak RSS {rt} +{mem['model_and_forward']:.2f} MiB")
        lines.append(", ".join(parts))
        for rt, names in rec.get("rebuilt_layers", {}).items():
            if names:
                lines.append(f"  runs rebuilt in {rt}: {', '.join(names)}")
    lines.append("")
    head = f"{'runtime':12} {'threads':>7} {'batch':>5} " + " ".join(
        f"{x + ' ms':>14}" for x in labels
    )
    head += "".join(f" {x + ' speedup':>20}" for x in other)
    lines.append(head)
    by = {(r["model"], r["runtime"], r["threads"], r["batch"]): r for r in doc["rows"]}
    cases = sorted(
        {(r["runtime"], r["threads"], r["batch"]) for r in doc["rows"]},
        key=lambda c: (RUNTIMES.index(c[0]), c[1], c[2]),
    )
    for rt, t, b in cases:
        row = f"{rt:12} {t:7d} {b:5d} " + " ".join(
            f"{by[(x, rt, t, b)]['ms']:14.3f}" for x in labels
        )
        for x in other:
            s = by[(x, rt, t, b)]["speedup_vs_" + ref]
            row += f" {s:19.2f}x" if math.isfinite(s) else f" {'n/a':>20}"
        lines.append(row)
    return "\n".join(lines)
