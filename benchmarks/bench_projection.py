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

Run ``python benchmarks/bench_projection.py`` (``--quick`` for a smoke run, ``--cases`` to
filter, ``--repeats`` to override). Writes ``benchmarks/results/projection.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
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

from tdcompress.tensor import tt_clip_ranks, tt_project, tt_ranks, tt_svd, tt_to_tensor

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


def tt_matrix_tensor(
    m_f: Sequence[int], n_f: Sequence[int], gen: torch.Generator
) -> torch.Tensor:
    """A Gaussian (M, N) matrix as a TT-matrix tensor with paired modes (m_k * n_k)."""
    if len(m_f) != len(n_f):
        raise ValueError(f"m_f and n_f must have the same length, got {m_f} and {n_f}")
    rows, cols, d = math.prod(m_f), math.prod(n_f), len(m_f)
    w = torch.randn(rows, cols, generator=gen) * math.sqrt(1.0 / cols)
    order = [i for k in range(d) for i in (k, d + k)]
    paired = [m * n for m, n in zip(m_f, n_f)]
    return w.reshape(*m_f, *n_f).permute(order).reshape(paired).contiguous()


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
        return (f"symeig_svd forms a {worst}x{worst} Gram matrix ({need / 1024**3:.0f} GiB "
                f"float32) > {GRAM_BUDGET_BYTES / 1024**3:.0f} GiB budget")
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
    Library("torchtt", False, "torchtt", "torchtt.TT(x, eps=0, rmax=r).full()", _identity,
            _torchtt_run),
    Library("tntorch[svd]", False, "tntorch", "tntorch.Tensor(x, ranks_tt=r).torch()",
            _identity, _tntorch("svd")),
    Library("tntorch[eig]", False, "tntorch",
            "tntorch.Tensor(x, ranks_tt=r, algorithm='eig').torch()", _identity,
            _tntorch("eig")),
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


def time_library(
    lib: Library, x: torch.Tensor, rank: int, repeats: int | None
) -> dict[str, Any]:
    """Warm-up (checked) call, then timed repeats; returns one result row."""
    lib.setup()
    prepared = lib.prepare(x)
    t0 = time.perf_counter()
    full, ranks = (lib.check or lib.run)(prepared, rank)
    first = time.perf_counter() - t0
    err = rel_error(x, full)
    del full
    row: dict[str, Any] = {"ranks": [int(r) for r in ranks], "rel_error": err}
    if first > SLOW_CALL_S:
        row.update(times_ms=[first * 1e3], median_ms=first * 1e3, note="one call > 30 s: "
                   "timed once (the warm-up), not repeated")
        return row
    n = repeats if repeats is not None else (3 if first > SLOW_CASE_S else 7)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = lib.run(prepared, rank)
        times.append(time.perf_counter() - t0)
        del out
    row.update(times_ms=[t * 1e3 for t in times], median_ms=statistics.median(times) * 1e3)
    return row


def run_case(
    case: Case,
    libraries: Sequence[Library],
    repeats: int | None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All libraries on one case; adds the ratio to the fastest peer to every row."""
    x = case.make(torch.Generator().manual_seed(seed))
    if tuple(x.shape) != case.shape:
        raise AssertionError(f"{case.name}: built shape {tuple(x.shape)} != {case.shape}")
    expected = [1, *tt_clip_ranks(case.shape, case.rank), 1]
    rows: dict[str, Any] = {}
    for lib in libraries:
        why = available(lib) or lib.feasible(case.shape, case.rank)
        if why is not None:
            rows[lib.name] = {"skipped": why}
            log(f"  {case.name:12s} {lib.name:22s} skipped: {why}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = time_library(lib, x, case.rank, repeats)
        row["ranks_ok"] = row["ranks"] == expected
        rows[lib.name] = row
        log(f"  {case.name:12s} {lib.name:22s} {row['median_ms']:10.2f} ms  "
            f"err {row['rel_error']:.6f}  ranks {row['ranks']}"
            + ("" if row["ranks_ok"] else f" (expected {expected})"))
    peers = {n: r for n, r in rows.items() if "median_ms" in r and not _is_ours(n, libraries)}
    best = min(peers, key=lambda n: peers[n]["median_ms"]) if peers else None
    if best is not None:
        for r in rows.values():
            if "median_ms" in r:
                r["ratio_to_fastest_peer"] = r["median_ms"] / peers[best]["median_ms"]
    return {
        "case": case.name,
        "layer": case.layer,
        "shape": list(case.shape),
        "rank": case.rank,
        "expected_ranks": expected,
        "input": f"Kaiming-scaled Gaussian weight, float32, seed {seed}",
        "fastest_peer": best,
        "results": rows,
    }


def _is_ours(name: str, libraries: Sequence[Library]) -> bool:
    return any(lib.ours for lib in libraries if lib.name == name)


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
    }


def format_table(cases: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: case, rank, library, median ms, ratio to fastest peer, error."""
    head = f"{'case':13s} {'rank':>4s} {'library':22s} {'median ms':>11s} " \
           f"{'x fastest peer':>14s} {'rel. error':>10s}"
    lines = [head, "-" * len(head)]
    for c in cases:
        for name, r in c["results"].items():
            if "skipped" in r:
                lines.append(f"{c['case']:13s} {c['rank']:4d} {name:22s} skipped")
                continue
            mark = "" if r["ranks_ok"] else "  ranks differ!"
            mark += "  (timed once)" if "note" in r else ""
            mark += "  <- fastest peer" if name == c["fastest_peer"] else ""
            ratio = r.get("ratio_to_fastest_peer", float("nan"))
            lines.append(f"{c['case']:13s} {c['rank']:4d} {name:22s} {r['median_ms']:11.2f} "
                         f"{ratio:14.3f} {r['rel_error']:10.6f}{mark}")
        lines.append("")
    return "\n".join(lines)


def select_cases(names: Sequence[str] | None, quick: bool) -> list[Case]:
    """Cases by exact name or substring (``--cases conv64,ucf11``); ``quick``: QUICK only."""
    chosen = [c for c in CASES if c.name in QUICK] if quick else list(CASES)
    if names:
        chosen = [c for c in chosen if any(n == c.name or n in c.name for n in names)]
        if not chosen:
            raise ValueError(f"--cases {list(names)} matches none of {[c.name for c in CASES]}")
    return chosen


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--cases", default=None,
                   help="comma-separated case names or substrings, e.g. conv64,ucf11")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per library (default 7, or 3 when one call > 0.5 s)")
    p.add_argument("--libraries", default=None, help="comma-separated library names")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default=str(RESULTS), help="JSON output path ('' for none)")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    cases = select_cases(args.cases.split(",") if args.cases else None, args.quick)
    libs = LIBRARIES
    if args.libraries:
        want = args.libraries.split(",")
        libs = [lib for lib in LIBRARIES if lib.name in want]
        if not libs:
            raise ValueError(f"--libraries {want} matches none of {[x.name for x in LIBRARIES]}")
    env = environment()
    print(f"# {env['date_utc']}  torch {env['versions']['torch']}  threads "
          f"{env['torch_threads']}  MALLOC env {env['malloc_env'] or 'unset (glibc default)'}")
    t0 = time.perf_counter()
    results = [run_case(c, libs, args.repeats) for c in cases]
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    env["argv"] = list(sys.argv[1:] if argv is None else argv)
    print()
    print(format_table(results))
    out = {"environment": env, "libraries": {lib.name: lib.note for lib in libs},
           "cases": results}
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
