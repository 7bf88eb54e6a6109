"""Benchmark of the TT projection (ADMM's Z-step): ``tdcompress.tensor.tt_project`` vs peers.

Times the full projection P(x) = reconstruct(TT-SVD(x, rank)) of the same float32 input
tensors with:

- ours: ``tt_project(x, r)`` (method "gram") and ``tt_project(x, r, method="svd")`` (the
  plain-LAPACK reference, not a peer);
- tensorly 0.10 ``tensor_train`` + ``tt_to_tensor`` on the numpy and pytorch backends, with
  its ``svd=`` choices "truncated_svd" (default), "randomized_svd" and (pytorch only)
  "symeig_svd";
- torchtt ``TT(x, eps=0, rmax=r).full()``;
- tntorch ``Tensor(x, ranks_tt=r, algorithm="svd" | "eig").torch()``.

Inputs are random Gaussian layer weights (Kaiming-scaled), tensorized as the layers would be
(conv kernels in the (O, kh*kw, I) layout, matrices as TT-matrices with paired modes); the
tensorization is done once, outside the timed region, and is the same for every library.
Every library's resulting TT ranks are checked against ``tt_clip_ranks`` and its relative
error ``||x - P(x)|| / ||x||`` is computed in float64.

``--input powerlaw`` replaces them by tensors with power-law spectra (closer to trained
weights). Each library is warmed up once, then the timed repeats go round-robin over the
libraries; the median is reported with its ratio to the fastest peer (any non-ours library)
and with the energy kept relative to ours (the "equal error" test).

Run ``python benchmarks/bench_projection.py`` (``--quick`` for a smoke run, ``--cases`` and
``--libraries`` to filter, ``--repeats`` to override, ``--quiet-below`` to wait for a quiet
shared machine, ``--merge`` to combine reruns, ``--from-json`` to reprint a table).
Writes ``benchmarks/results/projection.json``. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdcompress.tensor import (
    tt_clip_ranks,
    tt_max_ranks,
    tt_project,
    tt_ranks,
    tt_svd,
    tt_to_tensor,
)

RESULTS = Path(__file__).resolve().parent / "results" / "projection.json"
#: a peer whose single call takes longer than this is timed once and marked
SLOW_CALL_S = 30.0
#: a run slower than this counts as "slow" (>= 3 repeats instead of >= 5)
SLOW_CASE_S = 0.5


# ----------------------------------------------------------------------------- inputs


def conv_tensor(
    out_ch: int,
    in_ch: int,
    k: int,
    out_f: Sequence[int],
    in_f: Sequence[int],
    gen: torch.Generator,
) -> torch.Tensor:
    """A Kaiming-scaled Gaussian (O, I, k, k) kernel as [o_1..o_a, k*k, i_1..i_b]."""
    if math.prod(out_f) != out_ch or math.prod(in_f) != in_ch:
        raise ValueError(f"factors {out_f}/{in_f} do not multiply to {out_ch}/{in_ch}")
    w = torch.randn(out_ch, in_ch, k, k, generator=gen) * math.sqrt(2.0 / (in_ch * k * k))
    w = w.reshape(out_ch, in_ch, k * k).permute(0, 2, 1)
    return w.reshape(*out_f, k * k, *in_f).contiguous()


def tt_matrix_tensor(m_f: Sequence[int], n_f: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """A Gaussian (M, N) matrix as a TT-matrix tensor with paired modes (m_k * n_k)."""
    if len(m_f) != len(n_f):
        raise ValueError(f"m_f and n_f must have the same length, got {m_f} and {n_f}")
    rows, cols, d = math.prod(m_f), math.prod(n_f), len(m_f)
    w = torch.randn(rows, cols, generator=gen) * math.sqrt(1.0 / cols)
    order = [i for k in range(d) for i in (k, d + k)]
    paired = [m * n for m, n in zip(m_f, n_f)]
    return w.reshape(*m_f, *n_f).permute(order).reshape(paired).contiguous()


def powerlaw_tt_tensor(shape: Sequence[int], alpha: float, gen: torch.Generator) -> torch.Tensor:
    """A tensor whose unfoldings have roughly power-law spectra (s_j ~ j^-alpha).

    Built from Gaussian TT cores at the largest useful ranks, the j-th slice of every bond
    scaled by j^-alpha: a synthetic stand-in for trained weights, whose spectra decay
    instead of being flat like a Gaussian tensor's.
    """
    ranks = [1, *tt_max_ranks(shape), 1]
    cores = []
    for k, n in enumerate(shape):
        c = torch.randn(ranks[k], n, ranks[k + 1], generator=gen)
        w = torch.arange(1, ranks[k + 1] + 1, dtype=torch.float32).pow(-alpha)
        cores.append(c * w / math.sqrt(ranks[k] * n))
    x = tt_to_tensor(cores)
    return x / torch.linalg.vector_norm(x)


@dataclass(frozen=True)
class Case:
    """One benchmark case: a tensorized layer weight and the TT rank of every bond."""

    name: str
    layer: str
    rank: int
    make: Callable[[torch.Generator], torch.Tensor]
    shape: tuple[int, ...]


def _conv64(g: torch.Generator) -> torch.Tensor:
    return conv_tensor(64, 64, 3, [8, 8], [8, 8], g)


def _conv512(g: torch.Generator) -> torch.Tensor:
    return conv_tensor(512, 512, 3, [8, 8, 8], [8, 8, 8], g)


def _fc4096(g: torch.Generator) -> torch.Tensor:
    return tt_matrix_tensor([8, 8, 8, 8], [8, 8, 8, 8], g)


def _ucf11(g: torch.Generator) -> torch.Tensor:
    return tt_matrix_tensor([8, 20, 20, 18], [4, 4, 4, 16], g)


_CONV64 = "conv 64x64x3x3, (O,kh*kw,I) layout"
_CONV512 = "conv 512x512x3x3, (O,kh*kw,I) layout"
_FC4096 = "4096x4096 matrix, TT-matrix (8*8)x4"
_UCF11 = "UCF11 LSTM input 57600x1024, TT-matrix (8x4)(20x4)(20x4)(18x16)"

CASES: list[Case] = [
    *[Case(f"conv64-r{r}", _CONV64, r, _conv64, (8, 8, 9, 8, 8)) for r in (8, 16, 32)],
    Case("conv512-r32", _CONV512, 32, _conv512, (8, 8, 8, 9, 8, 8, 8)),
    *[Case(f"fc4096-r{r}", _FC4096, r, _fc4096, (64, 64, 64, 64)) for r in (8, 16, 32)],
    Case("ucf11-r4", _UCF11, 4, _ucf11, (32, 80, 80, 288)),
]
QUICK = ("conv64-r8", "conv64-r16")


# -------------------------------------------------------------------------- libraries


@dataclass
class Library:
    """A projection implementation: ``prepare(x)`` (untimed), then ``run(prepared, rank)``.

    ``run`` returns ``(full, ranks)``: the reconstruction (torch tensor or numpy array) and
    the d+1 TT ranks it used (or None). Only ``run`` is timed; the untimed warm-up call uses
    ``check`` when given (same computation, ranks exposed), else ``run``.
    """

    name: str
    ours: bool
    module: str | None
    note: str
    prepare: Callable[[torch.Tensor], Any]
    run: Callable[[Any, int], tuple[Any, list[int]]]
    setup: Callable[[], None] = field(default=lambda: None)
    check: Callable[[Any, int], tuple[Any, list[int]]] | None = None
    #: ``feasible(shape, rank)``: None, or why this case cannot run (e.g. memory)
    feasible: Callable[[tuple[int, ...], int], str | None] = field(default=lambda s, r: None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _ours(method: str, note: str) -> Library:
    def run(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, None]:
        return tt_project(x, rank, method=method), None

    def check(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, list[int]]:
        # tt_project is exactly tt_to_tensor(tt_svd(...)); split here to see the ranks
        cores = tt_svd(x, rank, method=method)
        return tt_to_tensor(cores), tt_ranks(cores)

    return Library(f"ours[{method}]", True, None, note, _identity, run, check=check)


def _tensorly(backend: str, svd: str) -> Library:
    def setup() -> None:
        import tensorly as tl

        tl.set_backend(backend)

    def prepare(x: torch.Tensor) -> Any:
        return x.numpy() if backend == "numpy" else x

    def run(x: Any, rank: int) -> tuple[Any, list[int]]:
        import tensorly as tl
        from tensorly.decomposition import tensor_train

        tt = tensor_train(x, rank, svd=svd, random_state=0)
        return tl.tt_to_tensor(tt), list(tt.rank)

    label = {"truncated_svd": "", "randomized_svd": ",rand", "symeig_svd": ",symeig"}[svd]
    return Library(
        f"tensorly[{'np' if backend == 'numpy' else 'torch'}{label}]",
        False,
        "tensorly",
        f"tensorly tensor_train(svd={svd!r}) + tt_to_tensor, {backend} backend",
        prepare,
        run,
        setup,
        feasible=_larger_gram_fits if svd == "symeig_svd" else (lambda s, r: None),
    )


#: memory allowed for one Gram matrix of tensorly's symeig_svd
GRAM_BUDGET_BYTES = 2 * 1024**3


def _larger_gram_fits(shape: tuple[int, ...], rank: int) -> str | None:
    """tensorly 0.10's ``symeig_svd`` forms the Gram matrix of the *larger* side of each
    unfolding (m > n: M M^T; else M^T M); report when that cannot fit in memory."""
    ranks = [1, *tt_clip_ranks(shape, rank)]
    worst = max(max(ranks[k] * shape[k], math.prod(shape[k + 1 :])) for k in range(len(shape) - 1))
    need = worst * worst * 4
    if need > GRAM_BUDGET_BYTES:
        return (
            f"symeig_svd forms a {worst}x{worst} Gram matrix ({need / 1024**3:.0f} GiB "
            f"float32) > {GRAM_BUDGET_BYTES / 1024**3:.0f} GiB budget"
        )
    return None


def _torchtt_run(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, list[int]]:
    import torchtt

    t = torchtt.TT(x, eps=0.0, rmax=rank)  # eps=0: the rank cap alone decides
    return t.full(), list(t.R)


def _tntorch(algorithm: str) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, list[int]]]:
    def run(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, list[int]]:
        import tntorch

        t = tntorch.Tensor(x, ranks_tt=rank, algorithm=algorithm)
        return t.torch(), [int(r) for r in t.ranks_tt]

    return run


LIBRARIES: list[Library] = [
    _ours("gram", "tt_project(x, r) (method='gram', the default)"),
    _ours("svd", "tt_project(x, r, method='svd') (plain-LAPACK reference, not a peer)"),
    _tensorly("numpy", "truncated_svd"),
    _tensorly("numpy", "randomized_svd"),
    _tensorly("pytorch", "truncated_svd"),
    _tensorly("pytorch", "randomized_svd"),
    _tensorly("pytorch", "symeig_svd"),
    Library(
        "torchtt", False, "torchtt", "torchtt.TT(x, eps=0, rmax=r).full()", _identity, _torchtt_run
    ),
    Library(
        "tntorch[svd]",
        False,
        "tntorch",
        "tntorch.Tensor(x, ranks_tt=r).torch()",
        _identity,
        _tntorch("svd"),
    ),
    Library(
        "tntorch[eig]",
        False,
        "tntorch",
        "tntorch.Tensor(x, ranks_tt=r, algorithm='eig').torch()",
        _identity,
        _tntorch("eig"),
    ),
]


def available(lib: Library) -> str | None:
    """None if ``lib`` can run, else the reason it is skipped."""
    if lib.module is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(lib.module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
        return f"{lib.module} not importable: {type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------------------- running


def rel_error(x: torch.Tensor, full: Any) -> float:
    """||x - full|| / ||x|| in float64."""
    f = torch.from_numpy(np.asarray(full)) if not isinstance(full, torch.Tensor) else full
    if tuple(f.shape) != tuple(x.shape):
        raise ValueError(f"reconstruction shape {tuple(f.shape)} != input {tuple(x.shape)}")
    xd = x.double()
    return float(torch.linalg.vector_norm(xd - f.double()) / torch.linalg.vector_norm(xd))


def warm_up(lib: Library, x: torch.Tensor, rank: int) -> tuple[Any, dict[str, Any], float]:
    """The untimed, checked first call: returns (prepared input, row, seconds it took)."""
    lib.setup()
    prepared = lib.prepare(x)
    t0 = time.perf_counter()
    full, ranks = (lib.check or lib.run)(prepared, rank)
    first = time.perf_counter() - t0
    row = {"ranks": [int(r) for r in ranks], "rel_error": rel_error(x, full)}
    return prepared, row, first


def make_input(case: Case, kind: str, seed: int, alpha: float = 1.0) -> torch.Tensor:
    """The case's input: ``"gaussian"`` (a Kaiming-scaled Gaussian layer weight in the
    layer's tensorization) or ``"powerlaw"`` (:func:`powerlaw_tt_tensor` of that shape)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return case.make(gen)
    if kind == "powerlaw":
        return powerlaw_tt_tensor(case.shape, alpha, gen)
    raise ValueError(f"input kind must be one of {list(INPUTS)}, got {kind!r}")


INPUTS = ("gaussian", "powerlaw")


def run_case(
    case: Case,
    libraries: Sequence[Library],
    repeats: int | None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    kind: str = "gaussian",
    alpha: float = 1.0,
) -> dict[str, Any]:
    """All libraries on one case; adds the ratio to the fastest peer to every row.

    Every library is warmed up (and checked) first; the timed repeats then go round-robin
    over the libraries, the same number for each (the smallest any warm-up asked for), so
    that a burst of load from other users of the machine hits all of them alike instead of
    one library's whole series.
    """
    x = make_input(case, kind, seed, alpha)
    if tuple(x.shape) != case.shape:
        raise AssertionError(f"{case.name}: built shape {tuple(x.shape)} != {case.shape}")
    expected = [1, *tt_clip_ranks(case.shape, case.rank), 1]
    rows: dict[str, Any] = {}
    todo: list[tuple[Library, Any, int]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lib in libraries:
            why = available(lib) or lib.feasible(case.shape, case.rank)
            if why is not None:
                rows[lib.name] = {"skipped": why}
                log(f"  {case.name:12s} {lib.name:22s} skipped: {why}")
                continue
            prepared, row, first = warm_up(lib, x, case.rank)
            row["ranks_ok"] = row["ranks"] == expected
            row["warmup_ms"] = first * 1e3
            row["times_ms"] = []
            rows[lib.name] = row
            if first > SLOW_CALL_S:
                row["times_ms"] = [first * 1e3]
                row["note"] = "one call > 30 s: timed once (the warm-up), not repeated"
                n = 0
            else:
                n = repeats if repeats is not None else (3 if first > SLOW_CASE_S else 7)
            todo.append((lib, prepared, n))
            log(
                f"  {case.name:12s} {lib.name:22s} warm-up {first * 1e3:10.2f} ms  "
                f"err {row['rel_error']:.6f}  ranks {row['ranks']}"
                + ("" if row["ranks_ok"] else f" (expected {expected})")
            )
        # one repeat count for the whole case (the smallest any library asked for), so that
        # every median is taken over the same round-robin rounds, under the same load
        common = min((n for _, _, n in todo if n > 0), default=0)
        todo = [(lib, prepared, min(n, common)) for lib, prepared, n in todo]
        for i in range(common):
            for lib, prepared, n in todo:
                if i >= n:
                    continue
                lib.setup()
                t0 = time.perf_counter()
                out = lib.run(prepared, case.rank)
                rows[lib.name]["times_ms"].append((time.perf_counter() - t0) * 1e3)
                del out
    for r in rows.values():
        if "times_ms" in r:
            r["median_ms"] = statistics.median(r["times_ms"])
            r["min_ms"] = min(r["times_ms"])
    result = {
        "case": case.name,
        "layer": case.layer,
        "shape": list(case.shape),
        "rank": case.rank,
        "expected_ranks": expected,
        "input": (
            f"Kaiming-scaled Gaussian weight, float32, seed {seed}"
            if kind == "gaussian"
            else f"power-law TT tensor, alpha {alpha}, float32, seed {seed}"
        ),
        "results": rows,
    }
    summarize(result, {lib.name for lib in libraries if lib.ours})
    log(f"  {case.name:12s} {summary_line(result)}")
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One line: ours[gram] vs the fastest peer and the fastest peer at equal error."""
    s = result["summary"]
    if s["speedup_vs_fastest_peer"] is None:
        return "no peer or no ours[gram] timing"
    line = (
        f"ours[gram] {s['ours_ms']:.2f} ms: {s['speedup_vs_fastest_peer']:.2f}x faster than "
        f"the fastest peer ({result['fastest_peer']})"
    )
    if s["speedup_vs_fastest_equal_error_peer"] is not None:
        line += (
            f", {s['speedup_vs_fastest_equal_error_peer']:.2f}x than the fastest at "
            f"equal error ({s['fastest_equal_error_peer']})"
        )
    return line + (
        f"; 2x goal at equal error {'met' if s['goal_2x_met'] else 'NOT met'}"
        f", vs every peer {'met' if s['2x_vs_every_peer'] else 'NOT met'}"
    )


#: a peer is "at equal error" when it keeps at least this fraction of the energy
#: ||x||^2 - ||x - P(x)||^2 that ours keeps (Gaussian inputs keep little, so compare that)
EQUAL_ENERGY = 0.99


def captured_energy(rel_err: float) -> float:
    """Fraction of ||x||^2 kept by an orthogonal projection with this relative error."""
    return 1.0 - rel_err * rel_err


def summarize(result: dict[str, Any], ours: set[str], ref: str = "ours[gram]") -> None:
    """Adds ratios to the fastest peer, energy relative to ``ref`` and a per-case summary."""
    rows = result["results"]
    timed = {n: r for n, r in rows.items() if "median_ms" in r}
    peers = {n: r for n, r in timed.items() if n not in ours}
    best = min(peers, key=lambda n: peers[n]["median_ms"]) if peers else None
    result["fastest_peer"] = best
    ref_row = timed.get(ref)
    ref_energy = captured_energy(ref_row["rel_error"]) if ref_row else None
    for r in timed.values():
        r["ratio_to_fastest_peer"] = r["median_ms"] / peers[best]["median_ms"] if best else None
        r["energy_vs_ours"] = captured_energy(r["rel_error"]) / ref_energy if ref_energy else None
    equal = {
        n: r
        for n, r in peers.items()
        if r["energy_vs_ours"] is not None and r["energy_vs_ours"] >= EQUAL_ENERGY
    }
    best_eq = min(equal, key=lambda n: equal[n]["median_ms"]) if equal else None
    summary: dict[str, Any] = {
        "ours_ms": ref_row["median_ms"] if ref_row else None,
        "fastest_peer_ms": peers[best]["median_ms"] if best else None,
        "fastest_equal_error_peer": best_eq,
    }
    for key, name in (
        ("speedup_vs_fastest_peer", best),
        ("speedup_vs_fastest_equal_error_peer", best_eq),
    ):
        summary[key] = rows[name]["median_ms"] / ref_row["median_ms"] if name and ref_row else None
    summary["goal_2x_met"] = (summary["speedup_vs_fastest_equal_error_peer"] or 0.0) >= 2.0
    summary["2x_vs_every_peer"] = (summary["speedup_vs_fastest_peer"] or 0.0) >= 2.0
    result["summary"] = summary


def cpu_pressure() -> str | None:
    """The kernel's CPU pressure line ("some avg10=..."): how much other load was competing."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def pressure_avg10() -> float | None:
    """The 10-second CPU pressure average in percent (None where the kernel lacks PSI)."""
    line = cpu_pressure()
    if line is None:
        return None
    fields = dict(f.split("=") for f in line.split()[1:])
    return float(fields["avg10"])


def wait_quiet(limit: float, max_wait_s: float, log: Callable[[str], None] = print) -> float:
    """Waits (up to ``max_wait_s``) until other load is below ``limit`` percent CPU pressure;
    returns the seconds waited. Timings on a shared 2-core machine are meaningless while
    another job holds a core: 2-thread LAPACK calls then run 10-500x slower."""
    t0 = time.perf_counter()
    while (p := pressure_avg10()) is not None and p > limit:
        if time.perf_counter() - t0 > max_wait_s:
            log(f"  cpu pressure still {p:.0f}% after {max_wait_s:.0f} s: running anyway")
            break
        time.sleep(5)
    return time.perf_counter() - t0


def environment() -> dict[str, Any]:
    """Versions, threads, allocator settings and the date of this run."""
    versions: dict[str, str | None] = {"torch": torch.__version__, "numpy": np.__version__}
    for mod in ("tensorly", "torchtt", "tntorch"):
        try:
            from importlib.metadata import version

            versions[mod] = version("torchTT" if mod == "torchtt" else mod)
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "thread_env": {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")},
        "dtype": "float32",
        "device": "cpu",
        "cpu_pressure_start": cpu_pressure(),
    }


def format_table(cases: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: case, rank, library, median ms, ratio to fastest peer, error."""
    head = (
        f"{'case':13s} {'rank':>4s} {'library':22s} {'median ms':>11s} "
        f"{'x fastest peer':>14s} {'rel. error':>10s} {'energy/ours':>11s}"
    )
    lines = [head, "-" * len(head)]
    for c in cases:
        for name, r in c["results"].items():
            if "skipped" in r:
                lines.append(f"{c['case']:13s} {c['rank']:4d} {name:22s} skipped")
                continue
            mark = "" if r["ranks_ok"] else "  ranks differ!"
            mark += "  (timed once)" if "note" in r else ""
            mark += "  <- fastest peer" if name == c["fastest_peer"] else ""
            ratio = r.get("ratio_to_fastest_peer") or float("nan")
            energy = r.get("energy_vs_ours") or float("nan")
            lines.append(
                f"{c['case']:13s} {c['rank']:4d} {name:22s} {r['median_ms']:11.2f} "
                f"{ratio:14.3f} {r['rel_error']:10.6f} {energy:11.3f}{mark}"
            )
        lines.append(f"  => {summary_line(c)}")
        lines.append("")
    return "\n".join(lines)


def format_markdown(cases: Sequence[dict[str, Any]]) -> str:
    """The same table as :func:`format_table`, as Markdown (for docs/performance.md)."""
    lines = [
        "| case | rank | library | median ms | x fastest peer | rel. error | energy/ours |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for c in cases:
        for name, r in c["results"].items():
            if "skipped" in r:
                lines.append(f"| {c['case']} | {c['rank']} | {name} | skipped | | | |")
                continue
            star = "**" if name == "ours[gram]" else ""
            note = " (fastest peer)" if name == c["fastest_peer"] else ""
            note += "" if r["ranks_ok"] else " (ranks differ!)"
            note += " (timed once)" if "note" in r else ""
            lines.append(
                f"| {c['case']} | {c['rank']} | {star}{name}{star}{note} | "
                f"{r['median_ms']:.1f} | {r['ratio_to_fastest_peer']:.2f} | "
                f"{r['rel_error']:.6f} | {r['energy_vs_ours']:.3f} |"
            )
    return "\n".join(lines)


def select_cases(names: Sequence[str] | None, quick: bool) -> list[Case]:
    """Cases by exact name or substring (``--cases conv64,ucf11``); ``quick``: QUICK only."""
    chosen = [c for c in CASES if c.name in QUICK] if quick else list(CASES)
    if names:
        chosen = [c for c in chosen if any(n == c.name or n in c.name for n in names)]
        if not chosen:
            raise ValueError(f"--cases {list(names)} matches none of {[c.name for c in CASES]}")
    return chosen


def merge_runs(runs: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Cases of several saved runs in CASES order, later runs winning; keeps every run's
    environment and records which run each case came from."""
    by_case: dict[str, dict[str, Any]] = {}
    libs: dict[str, str] = {}
    for i, run in enumerate(runs):
        libs.update(run["libraries"])
        for c in run["cases"]:
            by_case[c["case"]] = {**c, "from_run": i}
    order = [c.name for c in CASES]
    cases = sorted(
        by_case.values(), key=lambda c: order.index(c["case"]) if c["case"] in order else len(order)
    )
    ours = {n for n in libs if n.startswith("ours[")}
    for c in cases:
        summarize(c, ours)
    return {
        "environment": runs[-1]["environment"],
        "runs": [
            {
                "file": str(n),
                "environment": r["environment"],
                "cases": [c["case"] for c in r["cases"]],
            }
            for n, r in zip(names, runs)
        ],
        "libraries": libs,
        "cases": cases,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument(
        "--cases", default=None, help="comma-separated case names or substrings, e.g. conv64,ucf11"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per library (default 7, or 3 when one call > 0.5 s)",
    )
    p.add_argument(
        "--libraries",
        default=None,
        help="comma-separated library names, e.g. 'ours[gram],tensorly[torch,rand]'",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON output path ('' for none; default {RESULTS.name} in "
        f"{RESULTS.parent}, projection_powerlaw.json with --input powerlaw)",
    )
    p.add_argument(
        "--from-json",
        default=None,
        help="only re-summarize and print the table of a saved JSON result",
    )
    p.add_argument("--markdown", action="store_true", help="with --from-json: Markdown table")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine saved runs into --out: a case in a later file replaces the "
        "same case of an earlier one (e.g. a rerun of cases hit by other load)",
    )
    p.add_argument(
        "--input",
        choices=INPUTS,
        default="gaussian",
        help="gaussian layer weights (default) or power-law spectra (--alpha)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (default 1)")
    p.add_argument(
        "--quiet-below",
        type=float,
        default=None,
        metavar="PCT",
        help="before each case, wait until the CPU pressure (avg10) is below PCT",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="longest wait per case for --quiet-below, seconds (default 300)",
    )
    args = p.parse_args(argv)
    if args.merge:
        merged = merge_runs([json.loads(Path(f).read_text()) for f in args.merge], args.merge)
        print(format_table(merged["cases"]))
        if args.out:
            Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
            print(f"wrote {args.out}")
        return merged
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        ours = {n for n in saved["libraries"] if n.startswith("ours[")}
        for c in saved["cases"]:
            summarize(c, ours)
        print((format_markdown if args.markdown else format_table)(saved["cases"]))
        return saved
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    cases = select_cases(args.cases.split(",") if args.cases else None, args.quick)
    libs = LIBRARIES
    if args.libraries:
        # names such as tensorly[torch,rand] contain commas: split outside brackets only
        want = [w.strip(",") for w in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.libraries)]
        libs = [lib for lib in LIBRARIES if lib.name in want]
        if not libs:
            raise ValueError(f"--libraries {want} matches none of {[x.name for x in LIBRARIES]}")
    env = environment()
    print(
        f"# {env['date_utc']}  torch {env['versions']['torch']}  threads "
        f"{env['torch_threads']}  MALLOC env {env['malloc_env'] or 'unset (glibc default)'}"
        f"  cpu pressure: {env['cpu_pressure_start']}"
    )
    t0 = time.perf_counter()
    results = []
    for c in cases:
        waited = 0.0
        if args.quiet_below is not None:
            waited = wait_quiet(args.quiet_below, args.max_wait)
        start = cpu_pressure()
        res = run_case(c, libs, args.repeats, kind=args.input, alpha=args.alpha)
        res["cpu_pressure"] = {"waited_s": round(waited, 1), "start": start, "end": cpu_pressure()}
        results.append(res)
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    env["cpu_pressure_end"] = cpu_pressure()
    env["argv"] = list(sys.argv[1:] if argv is None else argv)
    print()
    print(format_table(results))
    out = {"environment": env, "libraries": {lib.name: lib.note for lib in libs}, "cases": results}
    if args.out is None:
        args.out = str(
            RESULTS if args.input == "gaussian" else RESULTS.with_name("projection_powerlaw.json")
        )
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
