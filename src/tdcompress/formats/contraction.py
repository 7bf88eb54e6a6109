"""Contraction planning of the factorized formats: the cheapest order to contract a small
tensor network, by multiply-accumulates (MACs), and the plans of a TT/TR layer's forward.

:func:`plan_network` finds the cheapest pairwise contraction order (exact dynamic
programming over subsets, cost = multiply-accumulates) of a small tensor network and
compiles it into a :class:`Program` of ``mm``/``bmm`` steps that never copy the activation
when avoidable (``torch.einsum`` for weight-only steps). :class:`RingStructure` describes a TT or
tensor-ring layer (a TT is a ring whose closing bond has size 1) in one of the layouts of
:mod:`tdcompress.formats.layouts` and plans its forward for a given input shape, choosing
between the factorized contraction orders and reconstruct-then-dense-op. The formats count
MACs with this planner (``Format.macs``), and the layers of :mod:`tdcompress.layers` run
its plans, so ``Format.macs`` is what the single-sample forward does.

The module holds no state but the cache of :func:`structure_of`; the per-layer plan caches
(one plan per input shape, ``torch.compile``'s symbolic batch) live with the layers
(:mod:`tdcompress.layers._base`). It imports nothing of :mod:`tdcompress.layers`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from string import ascii_letters
from typing import Any

import torch

from tdcompress.formats import layouts
from tdcompress.formats.base import FactorSpec, LayerGeometry

__all__ = [
    "plan_network",
    "run_steps",
    "Op",
    "Program",
    "Merge",
    "EINSUM_COST",
    "plan_merge",
    "run_merge",
    "Stage",
    "ConvPlan",
    "RingStructure",
    "ring_ranks",
    "structure_of",
]


def plan_network(
    inputs: Sequence[Sequence[str]],
    output: Sequence[str],
    sizes: dict[str, int],
    act: bool = False,
    batch: str | None = None,
) -> tuple[Program, int]:
    """Cheapest pairwise contraction order of a tensor network and its MAC count.

    ``inputs``: index labels of each operand; ``output``: labels of the result, in order;
    ``sizes``: size of every label. A pairwise contraction costs the product of the sizes
    of all labels of its two operands. Exact DP over subsets (fine for <= ~10 operands).
    ``act``: ``inputs[0]`` is an activation (batch-sized); the plan is compiled so that it
    is never copied when avoidable (see :func:`_compile`). ``batch``: the label of the batch
    size, left to run time in the program's reshapes (``-1``), so that a plan made for one
    batch size runs any other (the order then need not be the cheapest for it); its size
    in ``sizes`` must be at least 2 (size-1 labels are dropped from programs).
    """
    n = len(inputs)
    if n == 1:
        raise ValueError("a network needs at least two operands")
    if batch is not None:
        if sizes.get(batch, 0) < 2:
            raise ValueError(
                f"batch label {batch!r} must have a size >= 2 in sizes, got {sizes.get(batch)!r}"
            )
        if batch not in inputs[0] or batch not in output:
            raise ValueError(
                f"batch label {batch!r} must be a label of the activation inputs[0] "
                f"{tuple(inputs[0])} and of the output {tuple(output)}"
            )
    occ: dict[str, int] = {}
    for k, labs in enumerate(inputs):
        for lab in labs:
            occ[lab] = occ.get(lab, 0) | (1 << k)
    out_set = set(output)
    full = (1 << n) - 1
    order = list(occ)  # first-appearance order, for deterministic intermediate layouts

    keep: dict[int, tuple[str, ...]] = {}

    def kept(mask: int) -> tuple[str, ...]:
        if mask not in keep:
            if mask == full:
                keep[mask] = tuple(output)
            elif mask & (mask - 1) == 0:
                keep[mask] = tuple(inputs[mask.bit_length() - 1])
            else:
                keep[mask] = tuple(
                    lab
                    for lab in order
                    if occ[lab] & mask and (occ[lab] & ~mask & full or lab in out_set)
                )
        return keep[mask]

    best: dict[int, tuple[int, int]] = {1 << k: (0, 0) for k in range(n)}
    for mask in range(1, full + 1):
        if mask & (mask - 1) == 0:
            continue
        cand: tuple[int, int] | None = None
        sub = (mask - 1) & mask
        while sub:
            other = mask ^ sub
            if sub < other and sub in best and other in best:
                labs = set(kept(sub)) | set(kept(other))
                c = best[sub][0] + best[other][0] + math.prod(sizes[x] for x in labs)
                if cand is None or c < cand[0]:
                    cand = (c, sub)
            sub = (sub - 1) & mask
        assert cand is not None
        best[mask] = cand

    prog = _compile(inputs, output, sizes, order, best, kept, act, batch)
    return prog, best[full][0]


def _compile(
    inputs: Sequence[Sequence[str]],
    output: Sequence[str],
    sizes: dict[str, int],
    order: list[str],
    best: dict[int, tuple[int, int]],
    kept: Any,
    act: bool,
    batch: str | None = None,
) -> Program:
    """Turn the DP tree into matrix products that avoid copying the activation.

    Size-1 labels are dropped. A step between the activation (operand 0 when ``act``, or
    any result involving it) and a weight-only operand becomes one ``mm``/``bmm``: the
    activation is viewed as ``(G, K[, N])`` when its contracted labels ``K`` are contiguous
    in memory (permuted and copied otherwise), the weight is permuted to ``(M, K)`` (cheap),
    and the result's labels are ``G + M + N``, ``M`` ordered so that the next step finds its
    contracted labels contiguous. Other steps (weights only) use ``torch.einsum``.
    """
    n = len(inputs)
    full = (1 << n) - 1

    def strip(labs: Sequence[str]) -> tuple[str, ...]:
        return tuple(x for x in labs if sizes[x] != 1)

    def size(part: Sequence[str]) -> int:  # of a group of labels; the batch's is -1
        return -1 if batch in part else math.prod(sizes[x] for x in part)

    out_pos = {x: k for k, x in enumerate(output)}
    first = {x: k for k, x in enumerate(order)}
    rank = {x: (out_pos.get(x, len(out_pos)), first[x]) for x in order}
    parent: dict[int, tuple[int, int]] = {}

    def link(mask: int) -> None:
        if mask & (mask - 1):
            sub = best[mask][1]
            parent[sub], parent[mask ^ sub] = (mask, mask ^ sub), (mask, sub)
            link(sub)
            link(mask ^ sub)

    link(full)
    letters = {lab: ascii_letters[k] for k, lab in enumerate(order)}
    labels: dict[int, tuple[str, ...]] = {}
    index: dict[int, int] = {}
    is_act: dict[int, bool] = {}
    ops: list[Op] = []
    for k in range(n):
        labels[1 << k] = strip(inputs[k])
        index[1 << k] = k
        is_act[1 << k] = act and k == 0

    def emit(mask: int) -> None:
        if mask in index:
            return
        sub = best[mask][1]
        other = mask ^ sub
        emit(sub)
        emit(other)
        res = set(strip(kept(mask)))
        nxt: set[str] = set()
        if mask in parent:
            par, sib = parent[mask]
            nxt = res & set(strip(kept(sib))) - set(strip(kept(par)))
        if is_act[sub] != is_act[other]:
            a_m, w_m = (sub, other) if is_act[sub] else (other, sub)
            la, lw = labels[a_m], labels[w_m]
            both = set(la) & set(lw)
            K = [x for x in la if x in both]
            if K and not (both & res):
                pos = [la.index(x) for x in K]
                a_perm = None
                if max(pos) - min(pos) + 1 != len(K):  # not contiguous: copy, K last
                    rest = [x for x in la if x not in both]
                    a_perm = tuple(la.index(x) for x in rest + K)
                    la = tuple(rest + K)
                    pos = list(range(len(rest), len(la)))
                G, N = la[: min(pos)], la[max(pos) + 1 :]
                # labels the next step contracts go next to the activation's labels it
                # contracts too (after G or before N), so that step needs no copy
                tail = bool(N) and N[0] in nxt
                free_w = sorted(
                    (x for x in lw if x not in both),
                    key=lambda x: ((x in nxt) == tail, rank[x]),
                )
                w_perm = tuple(lw.index(x) for x in free_w + K)
                g, kk, nn_ = (size(part) for part in (G, K, N))
                m = size(free_w)
                out_labels = (*G, *free_w, *N)
                kind = "mm" if not N else ("mm_left" if g == 1 else "bmm")
                a_shape = (g, kk) if not N else ((kk, nn_) if g == 1 else (g, kk, nn_))
                ops.append(
                    Op(
                        kind,
                        index[a_m],
                        index[w_m],
                        a_perm=a_perm,
                        a_shape=a_shape,
                        w_perm=w_perm,
                        w_shape=(m, kk),
                        out_shape=tuple(size((x,)) for x in out_labels),
                    )
                )
                labels[mask] = out_labels
                index[mask] = n + len(ops) - 1
                is_act[mask] = True
                return
        out_labels = tuple(x for x in order if x in res)
        if mask == full:
            out_labels = strip(output)
        eq = "".join(letters[x] for x in labels[sub]) + ","
        eq += "".join(letters[x] for x in labels[other]) + "->"
        eq += "".join(letters[x] for x in out_labels)
        ops.append(Op("einsum", index[sub], index[other], eq=eq))
        labels[mask] = out_labels
        index[mask] = n + len(ops) - 1
        is_act[mask] = is_act[sub] or is_act[other]

    emit(full)
    final = labels[full]
    want = strip(output)
    out_perm = None if final == want else tuple(final.index(x) for x in want)
    in_shapes = tuple(tuple(size((x,)) for x in labels[1 << k]) for k in range(n))
    return Program(in_shapes, tuple(ops), out_perm)


@dataclass(frozen=True)
class Op:
    """One pairwise contraction of a :class:`Program` (see :func:`_compile`)."""

    kind: str  # "einsum" | "mm" | "mm_left" | "bmm"
    i: int  # the activation for the matrix kinds
    j: int  # the weight for the matrix kinds
    eq: str = ""
    a_perm: tuple[int, ...] | None = None
    a_shape: tuple[int, ...] = ()
    w_perm: tuple[int, ...] = ()
    w_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Program:
    """A compiled contraction: input shapes (size-1 modes dropped), ops, final permutation.
    Results are appended to the operand list; the last one (permuted) is returned."""

    in_shapes: tuple[tuple[int, ...], ...]
    ops: tuple[Op, ...]
    out_perm: tuple[int, ...] | None


def run_steps(prog: Program, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Execute a plan of :func:`plan_network` on ``operands``; the caller reshapes the
    result (size-1 modes are dropped)."""
    ops = [t.reshape(s) for t, s in zip(operands, prog.in_shapes)]
    for op in prog.ops:
        if op.kind == "einsum":
            r = torch.einsum(op.eq, ops[op.i], ops[op.j])
        else:
            a = ops[op.i]
            if op.a_perm is not None:
                a = a.permute(op.a_perm)
            a = a.reshape(op.a_shape)
            w = ops[op.j].permute(op.w_perm).reshape(op.w_shape)
            if op.kind == "mm":
                r = a @ w.t()
            elif op.kind == "mm_left":
                r = w @ a
            else:
                r = torch.bmm(w.expand(a.shape[0], op.w_shape[0], op.w_shape[1]), a)
            r = r.reshape(op.out_shape)
        ops.append(r)
    y = ops[-1]
    return y if prog.out_perm is None else y.permute(prog.out_perm)


#: how a group of cores merges into one tensor: einsum steps, or (one core) a permutation
Merge = tuple["Program | None", tuple[int, ...]]

#: relative cost of a MAC done by a compiled einsum stage on activations vs one done by a
#: convolution; measured equal once the stages run as copy-free mm/bmm (bench_layers)
EINSUM_COST = 1.0


def plan_merge(
    inputs: Sequence[Sequence[str]], output: Sequence[str], sizes: dict[str, int]
) -> tuple[Merge, int]:
    """Plan to merge cores (no activations) into one tensor with labels ``output``."""
    if len(inputs) == 1:
        labs = list(inputs[0])
        if sorted(labs) != sorted(output):
            raise ValueError(f"cannot permute labels {labs} into {list(output)}")
        return (None, tuple(labs.index(x) for x in output)), 0
    steps, macs = plan_network(inputs, output, sizes)
    return (steps, ()), macs


def run_merge(merge: Merge, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    prog, perm = merge
    return cores[0].permute(perm) if prog is None else run_steps(prog, cores)


@dataclass(frozen=True)
class Stage:
    """A 1x1 channel-mixing stage: ``mode="einsum"`` contracts the activation with the cores
    (``steps`` over ``[activation, *cores]``); ``mode="conv"`` merges the cores (``merge``)
    into a 1x1 convolution weight."""

    mode: str
    macs: int
    steps: Program | None = None
    merge: Merge = (None, ())

    @property
    def cost(self) -> float:
        return self.macs * (EINSUM_COST if self.mode == "einsum" else 1.0)


@dataclass(frozen=True)
class ConvPlan:
    """How a conv forward runs for one input shape: ``kind`` is ``"dense"``
    (reconstruct, one conv), ``"factored"`` (input stage, small conv, output stage),
    ``"merge_in"`` (kernel merged with the input cores), ``"merge_out"`` (kernel merged with
    the output cores) or, for Garipov's layout, ``"spatial_first"`` (the spatial core as a
    per-input-channel conv, then the channel cores)."""

    kind: str
    macs: int
    cost: float
    pre: Stage | None = None  # input stage (x -> r0 * r_{a+1} channels)
    weight: Merge = (None, ())  # the kh x kw conv weight from cores (merge/dense kinds)
    post: Stage | None = None  # output stage (r0 * r_a channels -> O)


class RingStructure:
    """Shapes, labels and planning of a TT/TR layer (no parameters).

    ``ranks`` are the d+1 ring ranks ``[r_0, ..., r_d]`` with ``r_d = r_0`` (a TT has
    ``r_0 = 1``) over the ``d`` modes of ``layout``'s tensor.
    """

    def __init__(
        self,
        layout: str,
        out_factors: Sequence[int],
        in_factors: Sequence[int],
        kernel_size: Sequence[int],
        ranks: Sequence[int],
    ) -> None:
        self.layout = layout
        self.of = tuple(int(v) for v in out_factors)
        self.inf = tuple(int(v) for v in in_factors)
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.ranks = tuple(int(r) for r in ranks)
        self.shapes = layouts.core_shapes(layout, self.of, self.inf, self.kernel_size, self.ranks)
        d = len(self.shapes)
        if len(self.ranks) != d + 1 or self.ranks[0] != self.ranks[-1]:
            raise ValueError(f"ranks must have {d + 1} entries with r_d = r_0, got {self.ranks}")
        R = [f"R{k}" for k in range(d)] + ["R0"]
        O = [f"O{k}" for k in range(len(self.of))]
        I = [f"I{k}" for k in range(len(self.inf))]
        self.O, self.I, self.R = O, I, R
        sizes = {f"R{k}": self.ranks[k] for k in range(d)}
        sizes.update(zip(O, self.of))
        sizes.update(zip(I, self.inf))
        sizes.update(KH=self.kernel_size[0], KW=self.kernel_size[1])
        self.sizes = sizes
        if layout == "matrix":
            self.labels = [(R[k], O[k], I[k], R[k + 1]) for k in range(d)]
            dense_out = [x for k in range(d) for x in (O[k], I[k])]
        elif layout == "channel":
            a = len(O)
            self.labels = [(R[k], O[k], R[k + 1]) for k in range(a)]
            self.labels.append((R[a], "KH", "KW", R[a + 1]))
            self.labels += [(R[a + 1 + k], I[k], R[a + 2 + k]) for k in range(len(I))]
            dense_out = [*O, "KH", "KW", *I]
        else:
            self.labels = [(R[0], "KH", "KW", R[1])]
            self.labels += [(R[k + 1], O[k], I[k], R[k + 2]) for k in range(len(O))]
            dense_out = ["KH", "KW"] + [x for k in range(len(O)) for x in (O[k], I[k])]
        self.dense_steps, self.dense_macs = plan_network(self.labels, dense_out, sizes)
        self.num_core_params = sum(math.prod(s) for s in self.shapes)

    @property
    def out_features(self) -> int:
        return math.prod(self.of)

    @property
    def in_features(self) -> int:
        return math.prod(self.inf)

    def reconstruct(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """The dense weight from the cores (differentiable), through the layout."""
        t = run_steps(self.dense_steps, cores)
        shape = layouts.tensor_shape(self.layout, self.of, self.inf, self.kernel_size)
        return layouts.tensor_to_weight(
            t.reshape(shape), self.layout, self.of, self.inf, self.kernel_size
        )

    # ---- planning -------------------------------------------------------------------
    def plan_linear(self, batch: int) -> tuple[Program, int]:
        """Cheapest full contraction of ``x (B, n_1..n_d)`` with the cores (it includes
        reconstruct-then-matmul when cheaper)."""
        sizes = dict(self.sizes, B=batch)
        return plan_network(
            [("B", *self.I), *self.labels], ("B", *self.O), sizes, act=True, batch=_label(batch)
        )

    def plan_conv(
        self,
        batch: int,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        kind: str | None = None,
        pre_mode: str | None = None,
        post_mode: str | None = None,
    ) -> ConvPlan:
        """Cheapest conv forward for a ``(batch, I, *in_hw)`` input (output ``out_hw``).

        Cost: MACs, those of einsum stages on activations weighted by :data:`EINSUM_COST`.
        ``kind``, ``pre_mode``, ``post_mode`` force a plan kind and the stage modes
        (``"einsum"`` or ``"conv"``; for tests and benchmarks)."""
        P, Q = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
        k = self.kernel_size[0] * self.kernel_size[1]
        sizes = dict(self.sizes, B=batch, P=P, Q=Q)
        O, I, R, L = self.O, self.I, self.R, self.labels
        n_o, n_i = self.out_features, self.in_features
        r0 = self.ranks[0]
        dense_m = self.dense_macs + batch * Q * n_o * n_i * k
        cands = [ConvPlan("dense", dense_m, float(dense_m), weight=(self.dense_steps, ()))]

        def pick(stages: list[Stage], mode: str | None, prefer: str) -> Stage:
            # ties: the input stage prefers the batched matmul (measured faster), the
            # output stage the 1x1 conv (it fuses the bias) except at batch 1, where ATen
            # runs small convs through its slow im2col path (~40 us) instead of oneDNN
            if mode is not None:
                stages = [s for s in stages if s.mode == mode]
                if not stages:
                    raise ValueError(f"stage mode must be 'einsum' or 'conv', got {mode!r}")
            return min(stages, key=lambda s: (s.cost, s.mode != prefer))

        if self.layout == "channel":
            a = len(O)
            ra, ra1 = self.ranks[a], self.ranks[a + 1]
            out_cores, kern, in_cores = L[:a], L[a], L[a + 1 :]
            steps, m = plan_network(
                [("B", *I, "P"), *in_cores],
                ("B", "R0", R[a + 1], "P"),
                sizes,
                act=True,
                batch=_label(batch),
            )
            merge, mm = plan_merge(in_cores, ("R0", R[a + 1], *I), sizes)
            pre = pick(
                [
                    Stage("einsum", m, steps=steps),
                    Stage("conv", mm + batch * P * r0 * ra1 * n_i, merge=merge),
                ],
                pre_mode,
                "einsum",
            )
            steps, m = plan_network(
                [("B", "R0", R[a], "Q"), *out_cores],
                ("B", *O, "Q"),
                sizes,
                act=True,
                batch=_label(batch),
            )
            merge, mm = plan_merge(out_cores, (*O, "R0", R[a]), sizes)
            post = pick(
                [
                    Stage("einsum", m, steps=steps),
                    Stage("conv", mm + batch * Q * n_o * r0 * ra, merge=merge),
                ],
                post_mode,
                "conv" if batch > 1 else "einsum",
            )
            mid = batch * Q * r0 * ra * ra1 * k
            cands.append(
                ConvPlan(
                    "factored",
                    pre.macs + mid + post.macs,
                    pre.cost + mid + post.cost,
                    pre,
                    post=post,
                )
            )
            w_in, w_m = plan_merge([kern, *in_cores], ("R0", R[a], *I, "KH", "KW"), sizes)
            mid = w_m + batch * Q * r0 * ra * n_i * k
            cands.append(
                ConvPlan("merge_in", mid + post.macs, mid + post.cost, weight=w_in, post=post)
            )
            w_out, w_m = plan_merge([*out_cores, kern], (*O, "R0", R[a + 1], "KH", "KW"), sizes)
            mid = w_m + batch * Q * n_o * r0 * ra1 * k
            cands.append(ConvPlan("merge_out", pre.macs + mid, pre.cost + mid, pre, weight=w_out))
        elif self.layout == "garipov":
            r1 = self.ranks[1]
            steps, m = plan_network(
                [("B", *I, "R0", R[1], "Q"), *L[1:]],
                ("B", *O, "Q"),
                sizes,
                act=True,
                batch=_label(batch),
            )
            post = Stage("einsum", m, steps=steps)
            mid = batch * n_i * r0 * r1 * k * Q
            cands.append(ConvPlan("spatial_first", mid + m, mid + post.cost, post=post))
        else:
            raise ValueError(f"layout {self.layout!r} is not a convolution layout")
        if kind is not None:
            forced = [p for p in cands if p.kind == kind]
            if not forced:
                raise ValueError(
                    f"kind must be one of {[p.kind for p in cands]} for layout "
                    f"{self.layout!r}, got {kind!r}"
                )
            return forced[0]
        order = {"dense": 0, "merge_in": 1, "merge_out": 2, "factored": 3, "spatial_first": 3}
        return min(cands, key=lambda p: (p.cost, order[p.kind]))

    def count_macs(
        self, geometry: LayerGeometry, input_hw: tuple[int, int] | None, batch: int = 1
    ) -> int:
        """MACs of the planned forward for ``batch`` samples (bias not counted), for an
        NCHW input; a channels_last input runs its 1x1 stages as convolutions, which does
        the same MACs whenever a side has one factor."""
        if geometry.kind == "linear":
            return self.plan_linear(batch)[1]
        if input_hw is None:
            raise ValueError("input_hw is required to count the MACs of a conv2d layer")
        hw = (int(input_hw[0]), int(input_hw[1]))
        return self.plan_conv(batch, hw, geometry.output_hw(hw)).macs


def _label(batch: int) -> str | None:
    """The batch label to leave to run time in a plan for ``batch`` samples (none at 1:
    size-1 labels are dropped, so a batch-1 plan runs batch 1 only)."""
    return "B" if batch > 1 else None


def ring_ranks(format_name: str, spec_ranks: Sequence[int]) -> tuple[int, ...]:
    """The d+1 ring ranks of a resolved TT (d-1 bond ranks) or TR (d ranks) spec."""
    r = tuple(int(v) for v in spec_ranks)
    if format_name == "tt":
        return (1, *r, 1)
    return (*r, r[0])


def structure_of(geometry: LayerGeometry, spec: FactorSpec) -> RingStructure:
    """The (cached) :class:`RingStructure` of a resolved TT/TR spec."""
    try:
        return _structure_cached(geometry, spec)
    except TypeError:  # unhashable options
        return _structure(geometry, spec)


@functools.lru_cache(maxsize=4096)
def _structure_cached(geometry: LayerGeometry, spec: FactorSpec) -> RingStructure:
    return _structure(geometry, spec)


def _structure(geometry: LayerGeometry, spec: FactorSpec) -> RingStructure:
    layout = spec.layout or "matrix"
    if spec.out_factors is None or spec.in_factors is None:
        raise ValueError("the spec must be resolved (out_factors and in_factors set)")
    return RingStructure(
        layout,
        spec.out_factors,
        spec.in_factors,
        geometry.kernel_size,
        ring_ranks(spec.format, spec.ranks),
    )
