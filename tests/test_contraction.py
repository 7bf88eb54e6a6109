"""The contraction planner (tdcompress.formats.contraction) against opt_einsum's exhaustive
``optimize="optimal"`` search as an oracle.

Cost conventions: ours counts a pairwise contraction as the product of the sizes of every
label of its two operands (multiply-accumulates); opt_einsum counts the same product times 2
(a multiply and an add) when the step sums a label, times 1 when it does not (an outer
product). In the TT/TR/Tucker networks below every operand shares a summed bond with its
neighbours, so the optimal paths sum a label at every step and opt_einsum's optimal FLOP
count is exactly twice our MACs; the test checks that assumption on opt_einsum's path too.
"""

from __future__ import annotations

import itertools
import math

import opt_einsum
import pytest
import torch

from tdcompress.formats import contraction
from tdcompress.formats.contraction import RingStructure, plan_merge, plan_network, run_steps


def _equation(inputs, output) -> tuple[str, dict[str, str]]:
    labs = dict.fromkeys(itertools.chain(*inputs, output))
    letters = {lab: opt_einsum.get_symbol(k) for k, lab in enumerate(labs)}
    eq = ",".join("".join(letters[x] for x in o) for o in inputs)
    return eq + "->" + "".join(letters[x] for x in output), letters


def _path_costs(inputs, output, sizes, path) -> tuple[int, int, bool]:
    """(our MACs, opt_einsum's FLOPs, whether every step sums a label) of a pairwise path."""
    ops = [set(o) for o in inputs]
    macs = flops = 0
    always_inner = True
    for step in path:
        assert len(step) == 2, "a pairwise path"
        a, b = (ops[i] for i in step)
        for i in sorted(step, reverse=True):
            ops.pop(i)
        union = a | b
        later = set(output).union(*ops)
        kept = {x for x in union if x in later}
        size = math.prod(sizes[x] for x in union)
        inner = bool(union - kept)
        always_inner &= inner
        macs += size
        flops += size * (2 if inner else 1)
        ops.append(kept)
    return macs, flops, always_inner


def _check_against_oracle(inputs, output, sizes, **kw) -> int:
    eq, letters = _equation(inputs, output)
    shapes = [tuple(sizes[x] for x in o) for o in inputs]
    path, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="optimal")
    prog, macs = plan_network(inputs, output, sizes, **kw)
    oracle_macs, oracle_flops, always_inner = _path_costs(inputs, output, sizes, path)
    assert oracle_flops == int(info.opt_cost)  # our reading of opt_einsum's convention
    assert always_inner, "the oracle's path has an outer product: the conventions differ"
    assert macs == oracle_macs
    assert 2 * macs == int(info.opt_cost)
    # and the program computes the contraction
    torch.manual_seed(0)
    ts = [torch.randn(s, dtype=torch.float64) for s in shapes]
    want = torch.einsum(eq, *ts)
    got = run_steps(prog, ts).reshape(want.shape)
    torch.testing.assert_close(got, want)
    return macs


RING_CASES = [
    # (layout, out_factors, in_factors, kernel, ring ranks)
    ("matrix", (4, 8), (8, 4), (1, 1), (1, 3, 1)),  # TT, 2 cores
    ("matrix", (2, 4, 8), (8, 4, 2), (1, 1), (1, 5, 7, 1)),  # TT, 3 cores
    ("matrix", (4, 4, 4, 2), (2, 4, 4, 4), (1, 1), (1, 3, 8, 2, 1)),  # TT, 4 cores
    ("matrix", (5, 6), (4, 6), (1, 1), (3, 2, 3)),  # TR
    ("matrix", (3, 4, 5), (5, 4, 3), (1, 1), (2, 4, 3, 2)),  # TR, 3 cores
    ("channel", (4, 8), (4, 4), (3, 3), (1, 3, 4, 5, 2, 1)),  # TT conv, channel layout
    ("channel", (8,), (4, 4), (3, 3), (2, 4, 3, 5, 2)),  # TR conv
    ("garipov", (4, 8), (4, 4), (3, 3), (1, 2, 4, 1)),  # TT conv, Garipov's layout
]


@pytest.mark.parametrize("case", RING_CASES, ids=lambda c: f"{c[0]}-{len(c[4]) - 1}cores")
def test_ring_reconstruction_matches_the_optimal_path(case) -> None:
    layout, of, inf, ks, ranks = case
    st = RingStructure(layout, of, inf, ks, ranks)
    if layout == "matrix":
        out = [x for k in range(len(st.O)) for x in (st.O[k], st.I[k])]
    elif layout == "channel":
        out = [*st.O, "KH", "KW", *st.I]
    else:
        out = ["KH", "KW"] + [x for k in range(len(st.O)) for x in (st.O[k], st.I[k])]
    assert _check_against_oracle(st.labels, out, st.sizes) == st.dense_macs


@pytest.mark.parametrize("batch", [1, 2, 16, 1024])
@pytest.mark.parametrize("case", [c for c in RING_CASES if c[0] == "matrix"], ids=str)
def test_ring_linear_forward_matches_the_optimal_path(case, batch) -> None:
    layout, of, inf, ks, ranks = case
    st = RingStructure(layout, of, inf, ks, ranks)
    inputs = [("B", *st.I), *st.labels]
    sizes = dict(st.sizes, B=batch)
    macs = _check_against_oracle(
        inputs, ("B", *st.O), sizes, act=True, batch="B" if batch > 1 else None
    )
    assert macs == st.plan_linear(batch)[1]


@pytest.mark.parametrize("batch", [1, 8, 256])
@pytest.mark.parametrize("hw", [(4, 4), (32, 32)])
def test_ring_conv_stages_match_the_optimal_path(batch, hw) -> None:
    """The 1x1 einsum stages a channel-layout conv plans (input cores, output cores) and
    Garipov's channel stage after its spatial core."""
    P = hw[0] * hw[1]
    st = RingStructure("channel", (4, 8), (4, 4), (3, 3), (2, 3, 4, 5, 3, 2))
    a = len(st.O)
    R, L = st.R, st.labels
    sizes = dict(st.sizes, B=batch, P=P, Q=P)
    lab = "B" if batch > 1 else None
    pre = [("B", *st.I, "P"), *L[a + 1 :]]
    m_pre = _check_against_oracle(pre, ("B", "R0", R[a + 1], "P"), sizes, act=True, batch=lab)
    post = [("B", "R0", R[a], "Q"), *L[:a]]
    m_post = _check_against_oracle(post, ("B", *st.O, "Q"), sizes, act=True, batch=lab)
    plan = st.plan_conv(batch, hw, hw, kind="factored", pre_mode="einsum", post_mode="einsum")
    assert plan.pre is not None and plan.post is not None
    assert (plan.pre.macs, plan.post.macs) == (m_pre, m_post)

    g = RingStructure("garipov", (4, 8), (4, 4), (3, 3), (1, 2, 4, 1))
    sizes = dict(g.sizes, B=batch, Q=P)
    inputs = [("B", *g.I, "R0", g.R[1], "Q"), *g.labels[1:]]
    m = _check_against_oracle(inputs, ("B", *g.O, "Q"), sizes, act=True, batch=lab)
    plan = g.plan_conv(batch, hw, hw)
    assert plan.kind == "spatial_first" and plan.post is not None and plan.post.macs == m


@pytest.mark.parametrize("batch", [1, 4, 512])
@pytest.mark.parametrize(
    "dims",
    [
        # (in modes, in ranks, out ranks, out modes)
        ((8, 8), (3, 4), (4, 2), (16, 4)),
        ((4, 6, 8), (2, 3, 4), (3, 3, 2), (8, 6, 4)),
        ((64,), (5,), (7,), (32,)),
    ],
    ids=str,
)
def test_tucker_networks_match_the_optimal_path(dims, batch) -> None:
    """A Tucker-factored linear map (input factors, core, output factors) applied to a batch,
    and the reconstruction of its dense tensor (:func:`plan_merge`)."""
    n_in, r_in, r_out, n_out = dims
    d, e = len(n_in), len(n_out)
    I = [f"I{k}" for k in range(d)]
    S = [f"S{k}" for k in range(d)]
    T = [f"T{k}" for k in range(e)]
    O = [f"O{k}" for k in range(e)]
    sizes = dict(zip(I, n_in)) | dict(zip(S, r_in)) | dict(zip(T, r_out)) | dict(zip(O, n_out))
    weights = [(I[k], S[k]) for k in range(d)] + [(*S, *T)] + [(T[k], O[k]) for k in range(e)]
    _check_against_oracle(
        [("B", *I), *weights],
        ("B", *O),
        dict(sizes, B=batch),
        act=True,
        batch="B" if batch > 1 else None,
    )
    if batch == 1:
        out = (*O, *I)
        macs = _check_against_oracle(weights, out, sizes)
        assert plan_merge(weights, out, sizes)[1] == macs


def test_the_names_stay_importable_from_layers_base() -> None:
    from tdcompress.layers import _base

    for name in contraction.__all__:
        assert getattr(_base, name) is getattr(contraction, name)
