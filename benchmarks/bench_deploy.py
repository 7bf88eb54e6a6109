"""Issue 21's acceptance benchmark: every compressed model of docs/results against its dense
model, as deployed.

Groups of models, each its dense model and the compressed models whose results docs/results
reports, built as their runs build them (random weights, seed 0: latency does not depend on
the weights): the dense model from the config's ``model`` section, the plan from its
``compress`` section (:func:`tdcompress.plan` with ``config=``, MACs counted on one sample)
and :func:`tdcompress.decompose`:

- ``lenet5`` (MNIST): configs/mnist_lenet5_tt_small.yaml, configs/mnist_lenet5_tt.yaml and
  the TT models of benchmarks/quality.py (10x, 30x, 60x; an identical plan is timed once
  and listed under ``aliases``);
- ``lenet5_formats``: quality.py's TR, Tucker-2 (fc1: SVD) and SVD models at the same ratios
  (a ratio a format cannot reach is listed under ``unreachable``);
- ``resnet20``, ``resnet32`` (CIFAR-10): the configs of docs/results/cifar10.md;
- ``lstm_fsdd``: the FSDD LSTM, dense and TT 12x / 117x / 819x, TR 114x, SVD 114x;
- ``transformer``: the MNIST row transformer, dense and TT / SVD at 3x and 10x.

Each group goes through :func:`tdcompress.bench.bench_models`: the compressed models make
their per-layer execution choice per runtime, then forward latency (eval, no grad, fp32,
CPU) in PyTorch eager, ``torch.compile`` and ONNX Runtime at every batch size and thread
count, the medians of interleaved repeats, and the speedup dense ms / compressed ms. Two
checks per row: ``never_slower`` (speedup >= 0.98, inside the noise) and, in ONNX Runtime at
batch >= 8 where the plan cuts MACs 5x or more, ``ort_1.5x`` (speedup >= 1.5). The machine
load (``os.getloadavg()``, /proc/pressure/cpu ``avg10``) is recorded before and after each
group: timings on a loaded machine are not results.

A group whose configs set ``runtime.channels_last`` (the ResNets) runs in channels_last in
eager and compiled PyTorch (``bench_models(channels_last=True)``); ONNX graphs have one
layout.

The output is resumable per group: a group already in ``--out`` is skipped unless
``--force``, and the file is rewritten (atomically) after every group, so a quiet window can
be split. Run on a quiet machine (nothing else running):

    python benchmarks/bench_deploy.py [--groups lenet5 resnet20 ...] [--batch-sizes 1 8 32]
        [--threads 1 2] [--runtimes eager compile onnxruntime] [--repeats 30] [--no-memory]
        [--out benchmarks/results/inference.json] [--force]
    python benchmarks/bench_deploy.py --quick     # smoke: 2 repeats, batch 1, 1 thread, eager
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tdcompress as tdc
from tdcompress.bench import RUNTIMES, bench_models
from tdcompress.config import Config, load_config
from tdcompress.data import DATASETS
from tdcompress.models import build_model
from tdcompress.pipeline import _model_defaults
from tdcompress.planning import CompressionPlan
from tdcompress.train.checkpoint import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import machine_load  # noqa: E402
from quality import DEFAULT_CONFIG as QUALITY_CONFIG  # noqa: E402
from quality import method_sets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "inference.json"
SEED = 0
#: never_slower: a compressed model is at least this fast relative to dense (inside noise)
NEVER_SLOWER = 0.98
#: ort_1.5x: the speedup asked in ONNX Runtime at batch >= ORT_MIN_BATCH where the plan cuts
#: MACs ORT_MIN_MACS_REDUCTION times or more
ORT_SPEEDUP = 1.5
ORT_MIN_BATCH = 8
ORT_MIN_MACS_REDUCTION = 5.0
#: the quality benchmark's target ratios (benchmarks/quality.py --ratios, docs/results)
QUALITY_RATIOS = (10, 30, 60)
#: quality.py methods with their own architecture (dtf and scratch share admm's TT one)
QUALITY_FORMATS = {"admm-tr": "tr", "admm-tucker2": "tucker2", "admm-svd": "svd"}
QUICK = {"batch_sizes": [1], "threads": [1], "runtimes": ["eager"], "repeats": 2}


@dataclass(frozen=True)
class Variant:
    """A compressed model: ``config`` (relative to the repository) with ``--set`` ``sets``."""

    label: str
    config: str
    sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupSpec:
    """A dense model (the ``model`` section of ``dense``) and its compressed ``variants``."""

    dense: str
    variants: tuple[Variant, ...]


@dataclass
class Group:
    """A built group: ``models`` (dense first) with the plan of each compressed one."""

    name: str
    input_shape: tuple[int, ...]
    models: dict[str, nn.Module]
    plans: dict[str, CompressionPlan]
    sources: dict[str, dict[str, Any]]
    aliases: dict[str, str] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    channels_last: bool = False

    def macs(self) -> dict[str, int | None]:
        """MACs per sample by label (the plans' counts)."""
        first = next(iter(self.plans.values()))
        out: dict[str, int | None] = {"dense": first.model_macs}
        out.update({k: p.compressed_macs for k, p in self.plans.items()})
        return out


def _quality(method: str, ratio: int) -> Variant:
    """quality.py's ``method`` at ``ratio``, with the overrides quality.py sets for it."""
    base = load_config(QUALITY_CONFIG)
    sets = (*method_sets(method, base), f"compress.target_ratio={ratio}")
    fmt = "tt" if method == "admm" else QUALITY_FORMATS[method]
    return Variant(f"quality_{fmt}_{ratio}x", str(QUALITY_CONFIG.relative_to(REPO)), sets)


@functools.cache
def group_specs() -> dict[str, GroupSpec]:
    """The groups by name."""
    c10, fsdd, tr = "configs/cifar10", "configs/fsdd", "configs/transformer"
    lenet = "configs/mnist_lenet5_tt_small.yaml"
    return {
        "lenet5": GroupSpec(
            lenet,
            (
                Variant("mnist_lenet5_tt_small", lenet),
                Variant("mnist_lenet5_tt", "configs/mnist_lenet5_tt.yaml"),
                *(_quality("admm", r) for r in QUALITY_RATIOS),
            ),
        ),
        "lenet5_formats": GroupSpec(
            lenet, tuple(_quality(m, r) for m in QUALITY_FORMATS for r in QUALITY_RATIOS)
        ),
        "resnet20": GroupSpec(
            f"{c10}/resnet20_dense.yaml",
            tuple(
                Variant(s, f"{c10}/{s}.yaml")
                for s in ("resnet20_tt_6.8x", "resnet20_tt_6.8x_eqratio", "resnet20_tt_4.5x")
            ),
        ),
        "resnet32": GroupSpec(
            f"{c10}/resnet32_dense.yaml",
            tuple(
                Variant(s, f"{c10}/{s}.yaml")
                for s in ("resnet32_tt_5.8x", "resnet32_tt_4.8x", "resnet32_tucker2_3x")
            ),
        ),
        "lstm_fsdd": GroupSpec(
            f"{fsdd}/dense.yaml",
            tuple(
                Variant(s, f"{fsdd}/{s}.yaml")
                for s in ("tt_12x", "tt_117x", "tt_819x", "tr_114x", "svd_114x")
            ),
        ),
        "transformer": GroupSpec(
            f"{tr}/mnist_rows_dense.yaml",
            tuple(
                Variant(s, f"{tr}/{s}.yaml")
                for s in (
                    "mnist_rows_tt_3x",
                    "mnist_rows_tt_10x",
                    "mnist_rows_svd_3x",
                    "mnist_rows_svd_10x",
                )
            ),
        ),
    }


def dense_model(cfg: Config) -> nn.Module:
    """The config's dense model as the pipeline builds it (dataset defaults), seed 0, eval."""
    info = DATASETS[cfg.data.dataset]
    kwargs = _model_defaults(cfg.model.name, info, dict(cfg.model.kwargs))
    torch.manual_seed(SEED)
    return build_model(cfg.model.name, **kwargs).eval()


def build_group(name: str) -> Group:
    """Group ``name``'s dense model and compressed models (random weights, eval mode)."""
    specs = group_specs()
    if name not in specs:
        raise ValueError(f"unknown group {name!r}; groups are {list(specs)}")
    spec = specs[name]
    base = load_config(REPO / spec.dense)
    dense = dense_model(base)
    shape = (1, *DATASETS[base.data.dataset]["input_shape"])
    group = Group(name, shape, {"dense": dense}, {}, {"dense": {"config": spec.dense}})
    group.channels_last = base.runtime.channels_last
    seen: dict[str, list[Any]] = {}
    for v in spec.variants:
        cfg = load_config(REPO / v.config, list(v.sets))
        if cfg.model != base.model or DATASETS[cfg.data.dataset] != DATASETS[base.data.dataset]:
            raise ValueError(
                f"group {name!r}: {v.config} builds {cfg.model} on {cfg.data.dataset!r}, not the "
                f"dense {base.model} on {base.data.dataset!r} of {spec.dense}"
            )
        group.channels_last |= cfg.runtime.channels_last
        try:
            p = tdc.plan(dense, config=cfg.compress, input_shape=shape)
        except ValueError as e:
            if "unreachable" not in str(e):
                raise
            group.unreachable[v.label] = str(e)
            continue
        layers = p.to_dict()["layers"]
        same = next((k for k, ls in seen.items() if ls == layers), None)
        if same is not None:
            group.aliases[v.label] = same
            continue
        seen[v.label] = layers
        model, _ = tdc.decompose(dense, p)
        group.models[v.label] = model.eval()
        group.plans[v.label] = p
        group.sources[v.label] = {"config": v.config, "sets": list(v.sets)}
    return group


# ------------------------------------------------------------------------------ timing
def add_checks(doc: dict[str, Any], macs_reduction: dict[str, float | None]) -> None:
    """Give each compressed row of a :func:`bench_models` document its MAC reduction and the
    checks ``never_slower`` and ``ort_1.5x`` (None where the check does not apply)."""
    ref = doc["meta"]["reference"]
    for r in doc["rows"]:
        if r["model"] == ref:
            continue
        s = r["speedup_vs_" + ref]
        red = macs_reduction.get(r["model"])
        r["macs_reduction"] = red
        r["never_slower"] = bool(s >= NEVER_SLOWER)
        ci = r.get("speedup_ci95")  # (older records have none)
        # slower beyond the noise: even the interval's upper end is below the bar
        r["slower_beyond_noise"] = None if ci is None else bool(ci[1] < NEVER_SLOWER)
        applies = (
            r["runtime"] == "onnxruntime"
            and r["batch"] >= ORT_MIN_BATCH
            and red is not None
            and red >= ORT_MIN_MACS_REDUCTION
        )
        r["ort_1.5x"] = bool(s >= ORT_SPEEDUP) if applies else None


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Per check: rows that pass, rows it applies to, and the worst row (lowest speedup)."""
    ref = doc["meta"]["reference"]
    key = "speedup_vs_" + ref
    out: dict[str, Any] = {}
    for check in ("never_slower", "ort_1.5x"):
        rows = [r for r in doc["rows"] if r.get(check) is not None]
        worst = min(rows, key=lambda r: r[key], default=None)
        out[check] = {
            "pass": sum(r[check] for r in rows),
            "rows": len(rows),
            "worst": None
            if worst is None
            else {k: worst[k] for k in ("model", "runtime", "threads", "batch", key)},
        }
    beyond = [r for r in doc["rows"] if r.get("slower_beyond_noise") is not None]
    if beyond:
        out["never_slower"]["slower_beyond_noise"] = sum(r["slower_beyond_noise"] for r in beyond)
    return out


def run_group(group: Group, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``group`` with :func:`bench_models`; its JSON record."""
    before = machine_load()
    t0 = time.perf_counter()
    macs = group.macs()
    doc = bench_models(
        group.models,
        group.input_shape,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        runtimes=args.runtimes,
        repeats=args.repeats,
        choice_repeats=args.choice_repeats,
        memory=args.memory,
        macs=macs,
        channels_last=group.channels_last,
    )
    wall = time.perf_counter() - t0
    reduction = {k: p.macs_reduction for k, p in group.plans.items()}
    add_checks(doc, reduction)
    plans = {
        k: {
            **group.sources[k],
            "params": p.compressed_params,
            "ratio": p.ratio,
            "macs_per_sample": p.compressed_macs,
            "macs_reduction": p.macs_reduction,
        }
        for k, p in group.plans.items()
    }
    first = next(iter(group.plans.values()))
    plans = {
        "dense": {
            **group.sources["dense"],
            "params": first.model_params,
            "macs_per_sample": first.model_macs,
        },
        **plans,
    }
    return {
        "command": args.command,
        "settings": {
            k: getattr(args, k)
            for k in ("batch_sizes", "threads", "runtimes", "repeats", "choice_repeats", "memory")
        },
        "input_shape": list(group.input_shape[1:]),
        "layout": "channels_last (eager, compile)" if group.channels_last else "contiguous",
        "config_channels_last": group.channels_last,
        "plans": plans,
        "aliases": group.aliases,
        "unreachable": group.unreachable,
        "load_before": before,
        "load_after": machine_load(),
        "wall_s": wall,
        "summary": summarize(doc),
        "bench": doc,
    }


# ------------------------------------------------------------------------------ output
def markdown(name: str, rec: dict[str, Any]) -> str:
    """A compact table of one group: per model, runtime and thread count, the time of each
    batch size (dense) or the speedup over dense (compressed), failed checks marked."""
    doc = rec["bench"]
    ref = doc["meta"]["reference"]
    key = "speedup_vs_" + ref
    batches = rec["settings"]["batch_sizes"]
    by = {(r["model"], r["runtime"], r["threads"], r["batch"]): r for r in doc["rows"]}
    lines = [
        f"### {name}",
        "",
        f"Input {tuple(rec['input_shape'])}, {rec['settings']['repeats']} repeats, "
        f"{rec['wall_s']:.0f} s; machine load before: {_load(rec['load_before'])}; after: "
        f"{_load(rec['load_after'])}. Cells: dense ms, else speedup over dense.",
        "",
        "| model | params | MACs red. | runtime | threads | "
        + " | ".join(f"batch {b}" for b in batches)
        + " |",
        "|---|---:|---:|---|---:|" + "---:|" * len(batches),
    ]
    for label, plan in rec["plans"].items():
        red = plan.get("macs_reduction")
        red_s = "-" if label == ref else ("?" if red is None else f"{red:.2f}x")
        for rt in rec["settings"]["runtimes"]:
            for t in rec["settings"]["threads"]:
                cells = []
                for b in batches:
                    r = by.get((label, rt, t, b))
                    if r is None:
                        cells.append("")
                    elif label == ref:
                        cells.append(f"{r['ms']:.3g} ms")
                    else:
                        slow = "" if r["never_slower"] else "!"
                        if slow and r.get("slower_beyond_noise") is False:
                            slow = "~"
                        mark = slow + ("*" if r["ort_1.5x"] is False else "")
                        s = r[key]
                        cells.append(f"{s:.2f}x{mark}" if math.isfinite(s) else "n/a")
                row = f"| {label} | {plan['params']:,} | {red_s} | {rt} | {t} | "
                lines.append(row + " | ".join(cells) + " |")
    lines.append("")
    for check, c in rec["summary"].items():
        w = c["worst"]
        if w is None:
            lines.append(f"- {check}: applies to no row")
            continue
        beyond = c.get("slower_beyond_noise")
        lines.append(
            f"- {check}: {c['pass']}/{c['rows']} rows pass"
            + ("" if beyond is None else f" ({beyond} slower beyond the noise)")
            + f"; worst {w['model']} in {w['runtime']}, {w['threads']} thread(s), batch "
            f"{w['batch']}: {w[key]:.2f}x"
        )
    lines.append(
        f"- `!`: slower than dense (speedup < {NEVER_SLOWER}; `~`: but the 95% interval of the "
        f"repeat-by-repeat speedups reaches {NEVER_SLOWER}, inside the noise); `*`: below "
        f"{ORT_SPEEDUP}x in ONNX Runtime at batch >= {ORT_MIN_BATCH} with >= "
        f"{ORT_MIN_MACS_REDUCTION:g}x fewer MACs"
    )
    for alias, same in rec["aliases"].items():
        lines.append(f"- {alias}: the same plan as {same} (timed once)")
    for label, why in rec["unreachable"].items():
        lines.append(f"- {label}: not built, {why}")
    return "\n".join(lines)


def _load(load: dict[str, Any]) -> str:
    la, p = load.get("loadavg"), load.get("cpu_pressure_avg10")
    parts = [] if la is None else [f"loadavg {la[0]:.2f}"]
    if p is not None:
        parts.append(f"CPU pressure avg10 {p:.1f}%")
    return ", ".join(parts) or "unknown"


def read_results(path: Path) -> dict[str, Any]:
    """The document at ``path`` (a new one if absent)."""
    if not path.exists():
        return {"meta": {}, "groups": {}}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"--out {str(path)!r} is not valid JSON ({e}); move it away") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), dict):
        raise SystemExit(
            f"--out {str(path)!r} is not a bench_deploy.py result (no 'groups'): choose another "
            "--out or move the file away"
        )
    return doc


# ------------------------------------------------------------------------------ CLI
def _positive_int(arg: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"{arg} must be an int >= 1, got {s!r}")
        return v

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    groups = list(group_specs())
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", nargs="+", choices=groups, default=groups)
    ap.add_argument(
        "--batch-sizes", nargs="+", type=_positive_int("--batch-sizes"), default=[1, 8, 32]
    )
    ap.add_argument("--threads", nargs="+", type=_positive_int("--threads"), default=[1, 2])
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    ap.add_argument("--repeats", type=_positive_int("--repeats"), default=30)
    ap.add_argument(
        "--choice-repeats",
        type=_positive_int("--choice-repeats"),
        default=20,
        help="repeats of each layer's execution choice (default 20)",
    )
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak RSS")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rerun groups already in --out")
    ap.add_argument(
        "--overview", action="store_true", help="print one row per group of --out and exit"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 repeats, batch 1, 1 thread, eager, 3 choice repeats, no memory, "
        "to a new temporary file unless --out",
    )
    args = ap.parse_args(argv)
    args.command = "python benchmarks/bench_deploy.py " + " ".join(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.choice_repeats, args.memory = 3, False
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="bench_deploy-")) / "inference.json"
    args.out = args.out if args.out is not None else DEFAULT_OUT
    for k in ("groups", "batch_sizes", "threads", "runtimes"):
        setattr(args, k, list(dict.fromkeys(getattr(args, k))))
    if "onnxruntime" in args.runtimes:
        missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if not _installed(m)]
        if missing:
            ap.error(
                f"--runtimes onnxruntime needs {missing}: pip install 'tdcompress[deploy]' "
                "(or leave onnxruntime out of --runtimes)"
            )
    return args


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def overview(doc: dict[str, Any]) -> str:
    """One markdown row per group: rows that pass ``never_slower`` per runtime and thread
    count, the worst speedup, and ``ort_1.5x``."""
    lines = [
        "| group | eager 1 / 2 threads | compile 1 / 2 | ONNX Runtime 1 / 2 | slower beyond "
        "the noise | worst row | ONNX Runtime >= 1.5x (MACs cut >= 5x, batch >= 8) | timed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in doc["groups"].items():
        rows = [r for r in g["bench"]["rows"] if r.get("never_slower") is not None]
        cells = []
        for rt in RUNTIMES:
            per = []
            for t in (1, 2):
                sel = [r for r in rows if r["runtime"] == rt and r["threads"] == t]
                per.append(f"{sum(r['never_slower'] for r in sel)}/{len(sel)}" if sel else "-")
            cells.append(" / ".join(per))
        w = g["summary"]["never_slower"]["worst"]
        key = next(k for k in w if k.startswith("speedup_vs_")) if w else None
        worst = (
            f"{w['model']} {w['runtime']} {w['threads']}t b{w['batch']}: {w[key]:.2f}x"
            if w
            else "-"
        )
        o = g["summary"]["ort_1.5x"]
        ort = f"{o['pass']}/{o['rows']}" if o["rows"] else "-"
        when = (g.get("load_before") or {}).get("time", "")
        beyond = g["summary"]["never_slower"].get("slower_beyond_noise")
        noise = "?" if beyond is None else f"{beyond}/{len(rows)}"
        lines.append(f"| {name} | {' | '.join(cells)} | {noise} | {worst} | {ort} | {when} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.overview:
        print(overview(read_results(args.out)))
        return {}
    doc = read_results(args.out)
    doc["meta"].update(
        {
            "script": "benchmarks/bench_deploy.py",
            "checks": {
                "never_slower": f"speedup (dense ms / compressed ms) >= {NEVER_SLOWER}",
                "ort_1.5x": f"speedup >= {ORT_SPEEDUP} in onnxruntime at batch >= "
                f"{ORT_MIN_BATCH} where the plan's MAC reduction >= {ORT_MIN_MACS_REDUCTION:g}",
            },
            "cpus": os.cpu_count(),
        }
    )
    n = len(args.groups)
    print(f"bench_deploy: {n} group(s) -> {args.out}", flush=True)
    for i, name in enumerate(args.groups, 1):
        if name in doc["groups"] and not args.force:
            print(f"[{i}/{n}] {name}: already in {args.out}, skipped (--force reruns it)")
            continue
        t0 = time.perf_counter()
        group = build_group(name)
        print(
            f"[{i}/{n}] {name}: {len(group.models)} models built in "
            f"{time.perf_counter() - t0:.1f} s; timing (load {_load(machine_load())})",
            flush=True,
        )
        rec = run_group(group, args)
        doc["groups"][name] = rec
        doc["meta"]["updated"] = time.strftime("%Y-%m-%d")
        atomic_write_text(args.out, json.dumps(doc, indent=2))
        s = rec["summary"]
        print(
            f"[{i}/{n}] {name}: {rec['wall_s']:.0f} s, never_slower "
            f"{s['never_slower']['pass']}/{s['never_slower']['rows']}, ort_1.5x "
            f"{s['ort_1.5x']['pass']}/{s['ort_1.5x']['rows']} (load after "
            f"{_load(rec['load_after'])})",
            flush=True,
        )
    for name in args.groups:
        if name in doc["groups"]:
            print("\n" + markdown(name, doc["groups"][name]))
    print(f"\nwrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
