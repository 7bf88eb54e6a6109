"""Formats "svd" and "tucker2": projection == build(decompose).to_dense(), exactness on
low-rank weights, projection error against closed forms, counts, MACs, bad specs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tdcompress.formats.lowrank  # noqa: F401
import tdcompress.formats.tucker2  # noqa: F401
from tdcompress.formats.base import LayerGeometry, get_format
from tdcompress.layers import build, build_initialized, layer_class
from tdcompress.layers.lowrank import LowRankConv2d, LowRankLinear
from tdcompress.layers.tucker2 import Tucker2Conv2d

D = torch.float64


def _conv_geo(i=5, o=7, k=(3, 3), **kw) -> LayerGeometry:
    return LayerGeometry("conv2d", o, i, kernel_size=k, **kw)


CASES = [
    # (format, geometry, ranks)
    ("svd", LayerGeometry.linear(9, 6), 3),
    ("svd", LayerGeometry.linear(9, 6, bias=False), (1,)),
    ("svd", _conv_geo(), 4),
    ("svd", _conv_geo(3, 10, (1, 3), stride=2), 2),
    ("tucker2", _conv_geo(), (3, 2)),
    ("tucker2", _conv_geo(6, 4, (1, 3), bias=False), 2),
    ("tucker2", _conv_geo(3, 10, (3, 3)), (5, 3)),
]


def _rand_weight(geo: LayerGeometry) -> torch.Tensor:
    return torch.randn(*geo.weight_shape, dtype=D)


def test_registry() -> None:
    assert type(get_format("svd")).__name__ == "LowRankFormat"
    assert type(get_format("tucker2")).__name__ == "Tucker2Format"


@pytest.mark.parametrize("fmt_name,geo,ranks", CASES)
def test_project_equals_built_layer(fmt_name, geo, ranks) -> None:
    torch.manual_seed(0)
    fmt = get_format(fmt_name)
    spec = fmt.resolve(geo, ranks)
    w = _rand_weight(geo)
    bias = torch.randn(geo.out_features, dtype=D) if geo.bias else None
    p = fmt.project(w, spec)
    layer = build(fmt, geo, fmt.decompose(w, spec), spec, bias)
    torch.testing.assert_close(layer.to_dense(), p, rtol=1e-10, atol=1e-10)
    assert p.shape == w.shape
    assert not torch.allclose(p, w)  # the ranks really truncate
    if bias is not None:
        torch.testing.assert_close(layer.bias, bias)
    # projection is idempotent
    torch.testing.assert_close(fmt.project(p, spec), p, rtol=1e-9, atol=1e-9)
    # parameter count
    assert fmt.num_params(geo, spec) == sum(q.numel() for q in layer.parameters())


@pytest.mark.parametrize("fmt_name,geo,ranks", CASES)
def test_low_rank_weight_is_projected_exactly(fmt_name, geo, ranks) -> None:
    torch.manual_seed(1)
    fmt = get_format(fmt_name)
    spec = fmt.resolve(geo, ranks)
    if fmt_name == "svd":
        r = spec.ranks[0]
        n = torch.Size(geo.weight_shape[1:]).numel()
        m = torch.randn(geo.out_features, r, dtype=D) @ torch.randn(r, n, dtype=D)
        w = m.reshape(geo.weight_shape)
    else:
        ro, ri = spec.ranks
        core = torch.randn(ro, ri, *geo.kernel_size, dtype=D)
        u_out = torch.randn(geo.out_features, ro, dtype=D)
        u_in = torch.randn(geo.in_features, ri, dtype=D)
        w = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    torch.testing.assert_close(fmt.project(w, spec), w, rtol=1e-9, atol=1e-9)
    layer = build(fmt, geo, fmt.decompose(w, spec), spec)
    torch.testing.assert_close(layer.to_dense(), w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("r", [1, 3, 6])
@pytest.mark.parametrize("geo", [LayerGeometry.linear(11, 8), _conv_geo(3, 8, (3, 3))])
def test_svd_projection_error_is_eckart_young(geo, r) -> None:
    torch.manual_seed(2)
    fmt = get_format("svd")
    w = _rand_weight(geo)
    p = fmt.project(w, fmt.resolve(geo, r))
    s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    want = s[r:].square().sum().sqrt()
    torch.testing.assert_close(torch.linalg.vector_norm(w - p), want, rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(p.reshape(p.shape[0], -1)) == r


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


@pytest.mark.parametrize("ranks", [(2, 2), (4, 1), (3, 4)])
def test_tucker2_projection_error_bounds(ranks) -> None:
    """Orthogonal projection (||W||^2 = ||P||^2 + ||W - P||^2), error within the HOSVD
    bounds max_n(tail_n) <= err^2 <= sum_n(tail_n), HOOI no worse than plain HOSVD, and
    multilinear ranks as requested."""
    torch.manual_seed(3)
    geo = _conv_geo(5, 6, (3, 3))
    fmt = get_format("tucker2")
    w = _rand_weight(geo)
    spec = fmt.resolve(geo, ranks)
    p = fmt.project(w, spec)
    err2 = (w - p).square().sum()
    torch.testing.assert_close(w.square().sum(), p.square().sum() + err2, rtol=1e-10, atol=0)
    tails = [torch.linalg.svdvals(_unfold(w, m))[r:].square().sum() for m, r in zip((0, 1), ranks)]
    assert max(tails) * (1 - 1e-9) <= err2 <= sum(tails) * (1 + 1e-9)
    spec0 = type(spec)(format="tucker2", ranks=spec.ranks, options={"n_iter": 0})
    err2_hosvd = (w - fmt.project(w, spec0)).square().sum()
    assert err2 <= err2_hosvd * (1 + 1e-9)
    for m, r in zip((0, 1), ranks):
        assert torch.linalg.matrix_rank(_unfold(p, m)) == r


def test_resolve_clips_ranks_to_feasible() -> None:
    svd, t2 = get_format("svd"), get_format("tucker2")
    assert svd.resolve(LayerGeometry.linear(9, 6), 100).ranks == (6,)
    assert svd.resolve(_conv_geo(2, 30, (3, 3)), 100).ranks == (18,)
    assert t2.resolve(_conv_geo(5, 7), 100).ranks == (7, 5)
    # 1x1: r_out <= r_in * 1 and r_in <= r_out * 1
    assert t2.resolve(_conv_geo(5, 7, (1, 1)), (7, 3)).ranks == (3, 3)
    assert t2.resolve(_conv_geo(2, 30, (1, 2)), 100).ranks == (4, 2)
    assert t2.max_ranks(_conv_geo(2, 30, (1, 2)), None) == (4, 2)
    g = _conv_geo(5, 7)
    assert svd.max_ranks(g, svd.resolve(g, 1)) == (7,)


def test_full_rank_projection_is_identity() -> None:
    torch.manual_seed(4)
    for name, geo in (
        ("svd", _conv_geo()),
        ("tucker2", _conv_geo()),
        ("svd", LayerGeometry.linear(4, 9)),
    ):
        fmt = get_format(name)
        w = _rand_weight(geo)
        torch.testing.assert_close(fmt.project(w, fmt.resolve(geo, 10**4)), w)


def test_macs_by_hand() -> None:
    svd, t2 = get_format("svd"), get_format("tucker2")
    lin = LayerGeometry.linear(7, 5)
    assert svd.macs(lin, svd.resolve(lin, 2)) == 2 * (7 + 5)
    conv = _conv_geo(4, 6, (3, 3), padding=1)
    # 5x5 output; kxk conv 4 -> 2 then 1x1 2 -> 6
    assert svd.macs(conv, svd.resolve(conv, 2), (5, 5)) == 25 * (2 * 4 * 9 + 6 * 2)
    # factored: 1x1 4->2 on 25 px, 3x3 2->3 on 25 px, 1x1 3->6 on 25 px
    assert (
        t2.macs(conv, t2.resolve(conv, (3, 2)), (5, 5)) == 25 * 4 * 2 + 25 * 3 * 2 * 9 + 25 * 6 * 3
    )
    # 1x1 stride 2 on a 9x9 input (5x5 output) at full ranks: the 81-pixel 1x1 input stage
    # makes the factored plan dearest; rebuilding the 6x4 kernel (core x U_in first: 64,
    # then U_out: 96) and one conv (25 * 24) is cheapest
    conv2 = _conv_geo(4, 6, (1, 1), stride=2)
    spec = t2.resolve(conv2, (4, 4))
    factored = 81 * 4 * 4 + 25 * 4 * 4 + 25 * 6 * 4
    merge_in = 4 * 4 * 4 + 25 * 4 * 4 + 25 * 6 * 4
    merge_out = 6 * 4 * 4 + 81 * 4 * 4 + 25 * 6 * 4
    dense = 4 * 4 * 4 + 6 * 4 * 4 + 25 * 6 * 4
    assert dense < min(factored, merge_in, merge_out)
    assert t2.macs(conv2, spec, (9, 9)) == dense == 760
    with pytest.raises(ValueError, match="input_hw"):
        t2.macs(conv, t2.resolve(conv, 2))


def _forward_macs(layer: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc:
        layer(x)
    return fc.get_total_flops() // 2


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: LowRankLinear(9, 6, 2), (1, 9)),
        (lambda: LowRankConv2d(5, 7, 3, 2, padding=1), (1, 5, 6, 5)),
        (lambda: LowRankConv2d(5, 7, 3, 2, stride=2, dilation=2), (1, 5, 9, 8)),
        (lambda: Tucker2Conv2d(5, 7, 3, (3, 2), padding=1), (1, 5, 6, 5)),
        (lambda: Tucker2Conv2d(4, 6, 1, 4, stride=2), (1, 4, 9, 9)),
        (lambda: Tucker2Conv2d(6, 5, 3, (5, 6), stride=2), (1, 6, 7, 7)),
    ],
)
def test_format_macs_equal_forward_macs(make, shape) -> None:
    """Format.macs is what the single-sample forward does, counted by torch."""
    layer = make()
    x = torch.randn(*shape)
    hw = None if x.dim() == 2 else tuple(shape[2:])
    fmt = get_format(layer.spec.format)
    assert fmt.macs(layer.geometry, layer.spec, hw) == _forward_macs(layer, x)


@pytest.mark.parametrize(
    "fmt_name,geo,ranks,kw,match",
    [
        ("svd", LayerGeometry.linear(4, 5), 0, {}, r"conv7: ranks must be ints >= 1, got 0"),
        ("svd", LayerGeometry.linear(4, 5), (2, 3), {}, r"conv7: ranks \[2, 3\] has 2 entries"),
        ("tucker2", _conv_geo(), (2, 3, 4), {}, r"conv7: ranks \[2, 3, 4\] has 3 entries.*2 ints"),
        ("tucker2", _conv_geo(), (2, -1), {}, r"conv7: ranks must be ints >= 1, got \(2, -1\)"),
        (
            "tucker2",
            LayerGeometry.linear(4, 5),
            2,
            {},
            r"conv7: format 'tucker2' does not "
            r"support linear.*\['conv2d'\]",
        ),
        ("tucker2", _conv_geo(4, 6, groups=2), 2, {}, r"conv7: .*groups=1, got groups=2"),
        ("svd", _conv_geo(4, 6, groups=2), 2, {}, r"conv7: .*groups=1, got groups=2"),
        ("svd", _conv_geo(), 2, {"out_factors": (7,)}, r"conv7: .*no out_factors.*\(7,\)"),
        ("tucker2", _conv_geo(), 2, {"layout": "garipov"}, r"conv7: .*no layout.*'garipov'"),
    ],
)
def test_bad_specs_raise(fmt_name, geo, ranks, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_format(fmt_name).resolve(geo, ranks, layer_name="conv7", **kw)


def test_bad_rank_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match="conv7: ranks must be ints >= 1, got 2.5"):
        get_format("svd").resolve(LayerGeometry.linear(4, 5), 2.5, layer_name="conv7")


def test_spec_options_are_used_kept_and_checked() -> None:
    """balanced=False gives A with orthonormal columns (balanced: equal Gram spectra of A
    and B); both give the projection; the built layers keep the options; unknown options
    and bad values raise errors naming the format, the option and the value."""
    from tdcompress.formats.base import FactorSpec

    torch.manual_seed(5)
    svd, t2 = get_format("svd"), get_format("tucker2")
    for geo in (LayerGeometry.linear(9, 6), _conv_geo()):
        w = _rand_weight(geo)
        for balanced in (True, False):
            spec = FactorSpec("svd", (3,), options={"balanced": balanced})
            A, B = svd.decompose(w, spec)
            B2 = B.reshape(3, -1)
            if balanced:
                torch.testing.assert_close(A.t() @ A, B2 @ B2.t(), rtol=1e-9, atol=1e-9)
            else:
                torch.testing.assert_close(A.t() @ A, torch.eye(3, dtype=D), rtol=0, atol=1e-12)
            layer = build(svd, geo, [A, B], spec)
            assert layer.spec.options == {"balanced": balanced}
            torch.testing.assert_close(layer.to_dense(), svd.project(w, spec))
    geo = _conv_geo()
    spec = FactorSpec("tucker2", (3, 2), options={"n_iter": 0})
    assert build(t2, geo, t2.decompose(_rand_weight(geo), spec), spec).spec == spec
    bad = [
        (svd, {"balance": True}, r"format 'svd': unknown spec option\(s\) \['balance'\]"),
        (svd, {"balanced": 1}, r"format 'svd': spec option balanced=1 .*must be a bool"),
        (t2, {"n_iter": -1}, r"format 'tucker2': spec option n_iter=-1 .*must be an int >= 0"),
        (t2, {"n_iter": "2"}, r"n_iter='2' is not allowed"),
        (t2, {"balanced": True}, r"unknown spec option\(s\) \['balanced'\].*n_iter \(int >= 0\)"),
    ]
    for fmt, opts, match in bad:
        spec = FactorSpec(fmt.name, (2, 2) if fmt is t2 else (2,), options=opts)
        for fn in (fmt.project, fmt.decompose):
            with pytest.raises(ValueError, match=match):
                fn(_rand_weight(geo), spec)


def test_tucker2_layer_class_names_itself_for_a_linear_geometry() -> None:
    fmt = get_format("tucker2")
    assert layer_class(fmt, _conv_geo()) is Tucker2Conv2d
    spec = fmt.resolve(_conv_geo(), 2)
    match = r"layer_class\('tucker2'\) .*does not support linear layers.*\['conv2d'\]"
    with pytest.raises(ValueError, match=match):
        build_initialized(fmt, LayerGeometry.linear(4, 5), spec)
