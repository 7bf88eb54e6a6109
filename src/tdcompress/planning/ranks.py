"""The rank solver: ranks that meet a whole-model target (parameter ratio or MAC reduction),
shared among layers as equal ranks or equal ratios (a start found by bisection, coordinate
descent near it, dynamic programmes over per-layer rank choices), and the per-layer MAC
ceiling (max_layer_macs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tdcompress.planning.records import _TARGET_META, CompressionPlan, LayerPlan

#: a solved target must be met within this relative tolerance
RATIO_TOLERANCE = 0.03


def _capped_solve(max_layer_macs: float | None, *args: Any) -> CompressionPlan:
    """:func:`_solve`, whose error names the MAC ceiling when there is one."""
    try:
        return _solve(*args)
    except ValueError as e:
        if max_layer_macs is None:
            raise
        raise ValueError(
            f"{e} (with max_layer_macs={max_layer_macs:g}, which caps the ranks of layers "
            "that would need more MACs)"
        ) from None


def _cap_macs(lp: LayerPlan, ceiling: float, capped: dict[str, list[int]]) -> LayerPlan:
    """``lp`` with its ranks capped at the largest value whose MACs are at most ``ceiling``
    times the dense layer's (``lp`` itself if it already is); records the capped ranks."""
    if lp.macs is None or lp.dense_macs is None:
        raise ValueError(
            f"max_layer_macs needs the MACs of every planned layer, but {lp.name!r} saw no "
            "input: give input_shape or example_inputs that run it"
        )
    limit = ceiling * lp.dense_macs
    if lp.macs <= limit:
        return lp
    fmt, s = lp.format, lp.spec

    def at(cap: int) -> LayerPlan:
        ranks = tuple(min(r, cap) for r in s.ranks)
        spec = fmt.resolve(
            lp.geometry,
            ranks,
            out_factors=s.out_factors,
            in_factors=s.in_factors,
            layout=s.layout,
            layer_name=lp.name,
        )
        return LayerPlan(lp.name, lp.param, lp.geometry, spec, lp.input_hw, lp.steps, lp.transposed)

    lo, hi = 1, max(s.ranks)  # at(hi) is lp: over the limit
    if at(lo).macs > limit:  # type: ignore[operator]
        raise ValueError(
            f"{lp.name}: even at rank 1 the {s.format!r} layer needs {at(lo).macs:,} MACs, "
            f"more than max_layer_macs={ceiling:g} x its dense {lp.dense_macs:,}; exclude it "
            "or raise max_layer_macs"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).macs <= limit:  # type: ignore[operator]
            lo = mid
        else:
            hi = mid
    out = at(lo)
    capped[lp.name] = list(out.spec.ranks)
    return out


def _equal_rank_start(
    at: Callable[[tuple[int, ...]], CompressionPlan],
    n: int,
    target: float,
    measure: Callable[[CompressionPlan], float],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The largest equal rank r whose plan still meets the target (the measure decreases
    as ranks grow), and r + 1."""
    lo, hi = 1, 1
    while measure(at((hi,) * n)) >= target:
        lo, hi = hi, hi * 2
        if hi > 1 << 16:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(at((mid,) * n)) >= target:
            lo = mid
        else:
            hi = mid
    return (lo,) * n, (lo + 1,) * n


def _equal_ratio_start(
    at: Callable[[tuple[int, ...]], CompressionPlan],
    n: int,
    target: float,
    measure: Callable[[CompressionPlan], float],
    layer_size: Callable[[LayerPlan], tuple[float, float]],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ranks that keep every layer at about the same fraction f of its dense size: for each
    layer the largest rank whose size is at most f times the dense one (at least 1), with f
    the largest fraction whose plan still meets the target; and the ranks one step of f
    above it."""
    # each layer's size at equal ranks 1, 2, ... until no layer's ranks change any more
    # (every rank clipped at its feasible bound); geometric steps above 32 keep wide layers
    # cheap to tabulate
    table: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    dense = [0.0] * n
    r, prev = 1, None
    while r <= 1 << 16:
        p = at((r,) * n)
        specs = [lp.spec.ranks for lp in p.layers]
        if specs == prev:
            break
        for i, lp in enumerate(p.layers):
            size, dense[i] = layer_size(lp)
            table[i].append((r, size))
        prev = specs
        r = r + 1 if r < 32 else max(r + 1, round(r * 1.05))

    def ranks(f: float) -> tuple[int, ...]:
        return tuple(
            max([r for r, size in table[i] if size <= f * dense[i]], default=1) for i in range(n)
        )

    lo, hi = 0.0, 1.0  # f = 0: every rank 1 (the most any plan can compress)
    for _ in range(50):
        mid = (lo + hi) / 2
        if measure(at(ranks(mid))) >= target:
            lo = mid
        else:
            hi = mid
    return ranks(lo), ranks(hi)


def _additive_search(
    at: Callable[[tuple[int, ...]], CompressionPlan],
    start: tuple[int, ...],
    target: float,
    measure: Callable[[CompressionPlan], float],
    layer_size: Callable[[LayerPlan], tuple[float, float]],
    windows: Sequence[Iterable[int]] | None = None,
    equal_fraction: bool = False,
) -> CompressionPlan | None:
    """Per-layer ranks whose plan meets ``target`` within tolerance, or None: the ranks tried
    are ``windows[i]`` (default: near ``start`` or 1 or a power of two), and the one kept
    is the closest to ``start`` (sum of |log rank ratios|) or, with ``equal_fraction``, the
    one whose layers are closest to one shared fraction f of their dense sizes (sum of
    |log(size / (f dense))|, f the fraction that meets the target exactly).

    The measure is D / (F + S): S the sum of the planned layers' sizes, F the size of the
    rest; D and F follow from the start plan. A dynamic programme over the layers keeps,
    per bucket of S (1/(4 L) of the allowed interval), the best assignment."""
    base = at(start)
    n = len(start)
    sizes = [layer_size(lp) for lp in base.layers]
    s0, dense = sum(s for s, _ in sizes), sum(d for _, d in sizes)
    m = measure(base)
    if not (math.isfinite(m) and m > 1):
        return None
    D = m * (dense - s0) / (m - 1)
    F = D - dense
    lo = D / (target * (1 + RATIO_TOLERANCE)) - F
    hi = D / (target * (1 - RATIO_TOLERANCE)) - F
    if hi <= 0:
        return None
    far = {1 << k for k in range(17)}
    if windows is None:
        windows = [set(range(max(1, r0 - 3), r0 + 5)) | far for r0 in start]
    # the fraction f that meets the target exactly (> 0: the band may start at S = 0)
    share = max((D / target - F) / dense, 1e-12)
    options: list[list[tuple[int, float]]] = []
    for i, window in enumerate(windows):
        seen: dict[tuple[int, ...], tuple[int, float]] = {}
        for r in sorted(set(window)):
            lp = at(tuple(r if j == i else q for j, q in enumerate(start))).layers[i]
            seen.setdefault(tuple(lp.spec.ranks), (r, layer_size(lp)[0]))  # (clipped: once)
        options.append(list(seen.values()))

    def cost(i: int, r: int, size: float) -> float:
        if equal_fraction:
            return abs(math.log(max(size, 1e-12) / (share * sizes[i][1])))
        return abs(math.log(r / start[i]))

    step = (hi - lo) / (4 * n)
    states: dict[int, tuple[float, float, tuple[int, ...]]] = {0: (0.0, 0.0, ())}
    for i, opts in enumerate(options):
        nxt: dict[int, tuple[float, float, tuple[int, ...]]] = {}
        for dev, total, chosen in states.values():
            for r, size in opts:
                t = total + size
                if t > hi:
                    continue
                d = dev + cost(i, r, size)
                b = round(t / step)
                if b not in nxt or d < nxt[b][0]:
                    nxt[b] = (d, t, (*chosen, r))
        states = nxt
    fits = [v for v in states.values() if lo <= v[1] <= hi]
    return at(min(fits)[2]) if fits else None


def _solve(
    make: Callable[[Callable[[str], Any]], CompressionPlan],
    chosen: list,
    target: float,
    what: str,
    measure: Callable[[CompressionPlan], float],
    allocation: str = "equal_rank",
    layer_size: Callable[[LayerPlan], tuple[float, float]] | None = None,
) -> CompressionPlan:
    """A starting point from ``allocation`` (equal ranks as large as the target allows, or
    every layer at about the same fraction of its ``layer_size`` (compressed, dense)); then
    per-layer ranks within a few steps of it (still equal inside each layer), chosen one
    layer at a time to land close to the target (equal_rank: as close as possible;
    equal_ratio: only as far as needed to come within tolerance)."""
    if not math.isfinite(target) or target <= 1.0:
        raise ValueError(f"target {what} must be a finite number > 1, got {target}")
    names = [c[0] for c in chosen]
    memo: dict[tuple[int, ...], CompressionPlan] = {}

    def at(ranks: tuple[int, ...]) -> CompressionPlan:
        if ranks not in memo:
            rm = dict(zip(names, ranks))
            memo[ranks] = make(lambda n: rm[n])
        return memo[ranks]

    lo_plan = at((1,) * len(names))
    best_reach = measure(lo_plan)
    if best_reach < target * (1 - RATIO_TOLERANCE):
        raise ValueError(
            f"target {what} {target:g} is unreachable: the highest reachable value with these "
            f"layers and formats is {best_reach:.3g} (every rank 1)"
        )
    if allocation == "equal_ratio":
        assert layer_size is not None
        floor, ceil = _equal_ratio_start(at, len(names), target, measure, layer_size)
    else:
        floor, ceil = _equal_rank_start(at, len(names), target, measure)

    def miss(p: CompressionPlan) -> float:
        return abs(measure(p) / target - 1)

    def descend(ranks: list[int], windows: list[range], stop: float) -> CompressionPlan:
        """Per-layer ranks near ``ranks``, one layer at a time (coordinate descent), until
        the target is missed by at most ``stop`` or no single change gets closer."""
        best = at(tuple(ranks))
        while miss(best) > stop:
            trial = None
            for i in range(len(names)):
                for r in windows[i]:
                    if r == ranks[i]:
                        continue
                    r2 = list(ranks)
                    r2[i] = r
                    p = at(tuple(r2))
                    if miss(p) < miss(best) and (trial is None or miss(p) < miss(trial[1])):
                        trial = (r2, p)
            if trial is None:
                break
            ranks, best = trial
        return best

    if allocation == "equal_ratio":
        # keep the shared fraction: a start already within tolerance is taken as it is
        # (rank steps of small layers are large relative changes); else descend from both
        # starts only until within tolerance
        windows = [range(max(1, min(f, c) - 3), max(f, c) + 5) for f, c in zip(floor, ceil)]
        starts = sorted((floor, ceil), key=lambda r: miss(at(r)))
        if miss(at(starts[0])) <= RATIO_TOLERANCE:
            best = at(starts[0])
        else:
            # the combination of nearby ranks that stays closest to one shared fraction
            # (one-layer moves towards the target can leave a small layer far off it)
            found = _additive_search(
                at, floor, target, measure, layer_size, windows=windows, equal_fraction=True
            )
            if found is not None:
                best = found
            else:
                tries = [descend(list(r), windows, RATIO_TOLERANCE) for r in starts]
                best = min(tries, key=miss)
    else:
        # equal ranks: from the better of r and r + 1, as close to the target as one-layer
        # changes get
        start = min((floor, ceil), key=lambda r: miss(at(r)))
        best = descend(list(start), [range(max(1, r - 3), r + 5) for r in floor], 0.002)
    if miss(best) > RATIO_TOLERANCE and layer_size is not None:
        # small or uneven models: the target may need ranks far from the start (a layer at
        # rank 1, another near full rank), which one-layer moves do not find; search the
        # combinations (only when the near search failed: it costs more plans)
        start = next(r for r, p in memo.items() if p is best)
        found = _additive_search(at, start, target, measure, layer_size)
        if found is not None and miss(found) < miss(best):
            best = found
    got = measure(best)
    if abs(got / target - 1) > RATIO_TOLERANCE:
        raise ValueError(
            f"target {what} {target:g} cannot be met within {RATIO_TOLERANCE:.0%}: the closest "
            f"value found is {got:.3g}"
        )
    best.meta = {_TARGET_META[what]: target, "allocation": allocation}
    return best
