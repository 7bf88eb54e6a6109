"""TT and TR formats: layouts, projection == build(decompose).to_dense(), exactness on
low-rank weights, ranks, counts and error messages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import tdcompress.formats.tr  # noqa: F401  (registers "tr")
import tdcompress.formats.tt  # noqa: F401  (registers "tt")
from tdcompress.formats import layouts
from tdcompress.formats.base import LayerGeometry, get_format
from tdcompress.layers import build
from tdcompress.layers.tr import TRConv2d, TRLinear
from tdcompress.layers.tt import TTConv2d, TTLinear
from tdcompress.tensor import tt_max_ranks

D = torch.float64


def _lin(o: int = 12, i: int = 20) -> LayerGeometry:
    return LayerGeometry.linear(i, o)


def _conv(o: int = 6, i: int = 8, k: tuple[int, int] = (3, 3), **kw) -> LayerGeometry:
    return LayerGeometry("conv2d", o, i, kernel_size=k, **kw)


# ---- layouts: independent element-wise oracles --------------------------------------
def test_matrix_layout_elements() -> None:
    of, inf = (2, 3, 2), (3, 2, 2)
    W = torch.randn(12, 12, dtype=D)
    T = layouts.weight_to_tensor(W, "matrix", of, inf)
    assert T.shape == (6, 6, 4)
    for o, i in itertools.product(range(12), range(12)):
        om = (o // 6, (o // 2) % 3, o % 2)  # row-major multi-index of o over (2, 3, 2)
        im = (i // 4, (i // 2) % 2, i % 2)  # over (3, 2, 2)
        idx = tuple(om[k] * inf[k] + im[k] for k in range(3))
        assert T[idx] == W[o, i]
    assert torch.equal(layouts.tensor_to_weight(T, "matrix", of, inf), W)


def test_channel_layout_elements() -> None:
    of, inf, k = (2, 3), (4,), (2, 3)
    W = torch.randn(6, 4, 2, 3, dtype=D)
    T = layouts.weight_to_tensor(W, "channel", of, inf)
    assert T.shape == (2, 3, 6, 4)
    for o, i, y, x in itertools.product(range(6), range(4), range(2), range(3)):
        assert T[o // 3, o % 3, y * 3 + x, i] == W[o, i, y, x]
    assert torch.equal(layouts.tensor_to_weight(T, "channel", of, inf, k), W)


def test_garipov_layout_elements() -> None:
    of, inf, k = (2, 3), (2, 2), (3, 1)
    W = torch.randn(6, 4, 3, 1, dtype=D)
    T = layouts.weight_to_tensor(W, "garipov", of, inf)
    assert T.shape == (3, 4, 6)
    for o, i, y in itertools.product(range(6), range(4), range(3)):
        o1, o2, i1, i2 = o // 3, o % 3, i // 2, i % 2
        assert T[y, o1 * 2 + i1, o2 * 2 + i2] == W[o, i, y, 0]
    assert torch.equal(layouts.tensor_to_weight(T, "garipov", of, inf, k), W)


# ---- cases covering both formats, both kinds, both conv layouts ----------------------
CASES = [
    ("tt", _lin(12, 20), dict(out_factors=(3, 4), in_factors=(4, 5)), 3),
    ("tt", _lin(8, 27), dict(out_factors=(2, 2, 2), in_factors=(3, 3, 3)), [2, 3]),
    ("tt", _conv(6, 8), dict(out_factors=(2, 3), in_factors=(8,), layout="channel"), 3),
    ("tt", _conv(6, 4), dict(out_factors=(6,), in_factors=(4,), layout="channel"), [3, 2]),
    ("tt", _conv(6, 8, (3, 1)), dict(out_factors=(2, 3), in_factors=(2, 4), layout="garipov"), 2),
    ("tr", _lin(12, 20), dict(out_factors=(3, 4), in_factors=(4, 5)), 2),
    ("tr", _lin(8, 27), dict(out_factors=(2, 2, 2), in_factors=(3, 3, 3)), [2, 3, 2]),
    ("tr", _conv(6, 8), dict(out_factors=(2, 3), in_factors=(8,), layout="channel"), 2),
    ("tr", _conv(6, 8, (3, 3)), dict(out_factors=(2, 3), in_factors=(2, 4), layout="garipov"), 2),
]
IDS = [f"{c[0]}-{c[1].kind}-{c[2].get('layout', 'matrix')}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("name,geo,kw,ranks", CASES, ids=IDS)
def test_project_equals_build_of_decompose(name, geo, kw, ranks) -> None:
    torch.manual_seed(0)
    fmt = get_format(name)
    spec = fmt.resolve(geo, ranks, **kw)
    W = torch.randn(geo.weight_shape, dtype=D)
    P = fmt.project(W, spec)
    assert P.shape == W.shape
    layer = build(fmt, geo, fmt.decompose(W, spec), spec, torch.randn(geo.out_features, dtype=D))
    torch.testing.assert_close(layer.to_dense(), P, rtol=1e-10, atol=1e-12)
    # truncation actually happened (the test would be vacuous otherwise)
    assert torch.linalg.vector_norm(P - W) > 1e-3 * torch.linalg.vector_norm(W)
    # num_params equals the parameters of the built module
    assert fmt.num_params(geo, spec) == sum(p.numel() for p in layer.parameters())
    if name == "tt":  # TT-SVD is a projection; TR-SVD is not idempotent when r0, r1 > 1
        torch.testing.assert_close(fmt.project(P, spec), P, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name,geo,kw,ranks", CASES, ids=IDS)
def test_low_rank_weight_projected_exactly(name, geo, kw, ranks) -> None:
    """A weight built from cores of the spec's ranks is a fixed point of the projection:
    catches any index-order mismatch between the layer and the projection."""
    torch.manual_seed(1)
    fmt = get_format(name)
    if name == "tr":
        # TR-SVD recovers an exact ring only if its first split is separable: r_1 = 1
        # (the closing bond r_0 = 2 stays a real ring bond)
        n = fmt.n_ranks(len(fmt._tensor_shape(geo, fmt.resolve(geo, 1, **kw))))
        ranks = [2, 1] + [2] * (n - 2)
    spec = fmt.resolve(geo, ranks, **kw)
    if name == "tr":
        assert spec.ranks[0] == 2
    cls = {("tt", "linear"): TTLinear, ("tt", "conv2d"): TTConv2d}
    cls.update({("tr", "linear"): TRLinear, ("tr", "conv2d"): TRConv2d})
    layer = cls[(name, geo.kind)]._from_spec(geo, spec, dtype=D)
    W = layer.to_dense().detach()
    err = torch.linalg.vector_norm(fmt.project(W, spec) - W) / torch.linalg.vector_norm(W)
    assert err < 1e-9


@pytest.mark.parametrize("name", ["tt", "tr"])
@pytest.mark.parametrize(
    "geo,kw",
    [
        (_lin(12, 20), {}),
        (_conv(6, 8), {"layout": "channel"}),
        (_conv(6, 8), {"layout": "garipov", "out_factors": (2, 3), "in_factors": (2, 4)}),
    ],
)
def test_full_rank_is_exact(name, geo, kw) -> None:
    fmt = get_format(name)
    spec = fmt.resolve(geo, 10**6, **kw)
    W = torch.randn(geo.weight_shape, dtype=D)
    torch.testing.assert_close(fmt.project(W, spec), W, rtol=1e-9, atol=1e-10)
    if name == "tt":
        shape = layouts.tensor_shape(
            spec.layout or "matrix", spec.out_factors, spec.in_factors, geo.kernel_size
        )
        assert spec.ranks == tuple(tt_max_ranks(shape)) == fmt.max_ranks(geo, spec)


def test_tt_ranks_clipped_per_bond() -> None:
    fmt = get_format("tt")
    spec = fmt.resolve(_lin(8, 27), [100, 1], out_factors=(2, 2, 2), in_factors=(3, 3, 3))
    assert spec.ranks == (6, 1)  # bond 1 <= min(2*3, 2*3*2*3)
    spec = fmt.resolve(_lin(8, 27), [100, 100], out_factors=(2, 2, 2), in_factors=(3, 3, 3))
    assert spec.ranks == (6, 6)
    assert fmt.max_ranks(_lin(8, 27), spec) == (6, 6)


def test_tr_ranks_and_max_ranks() -> None:
    fmt = get_format("tr")
    geo = _lin(8, 27)
    spec = fmt.resolve(geo, 2, out_factors=(2, 2, 2), in_factors=(3, 3, 3))
    assert spec.ranks == (2, 2, 2)
    # r0 <= 6; r1 <= 6 // r0 = 3; r2 <= min(r1 * 6, r0 * 6) = 12
    assert fmt.max_ranks(geo, spec) == (6, 3, 12)


def test_automatic_shapes() -> None:
    tt = get_format("tt")
    s = tt.resolve(LayerGeometry.linear(4096, 4096), 8)
    assert s.out_factors == s.in_factors == (8, 8, 8, 8) and s.ranks == (8, 8, 8)
    s = tt.resolve(LayerGeometry.linear(800, 500), 4)
    assert s.in_factors == (8, 10, 10) and s.out_factors == (5, 10, 10)
    s = tt.resolve(_conv(64, 16), 4)
    assert s.layout == "channel" and s.out_factors == (64,) and s.in_factors == (16,)
    s = tt.resolve(_conv(256, 128), 4)
    assert s.out_factors == (16, 16) and s.in_factors == (8, 16)
    s = tt.resolve(_conv(64, 16), 4, layout="garipov")
    assert s.out_factors == (8, 8) and s.in_factors == (4, 4)
    s = tt.resolve(LayerGeometry.linear(60, 24), 3, out_factors=(2, 3, 4))
    assert s.in_factors == (3, 4, 5)
    assert s.to_dict()["ranks"] == [3, 3]


def test_macs_by_hand() -> None:
    tt = get_format("tt")
    # Linear 6 -> 4, cores G1 (1,2,2,2), G2 (2,2,3,1): x(1,2,3) with G2 costs 2*3*2*2 = 24
    # -> (1, 2, r=2, o2=2); with G1 costs 2*2*2*2 = 16. Total 40 (G1 first: 48;
    # reconstruct-then-matmul: 48 + 24 = 72).
    geo = LayerGeometry.linear(6, 4)
    spec = tt.resolve(geo, 2, out_factors=(2, 2), in_factors=(2, 3))
    assert tt.macs(geo, spec) == 40
    # at batch 4 reconstruct-then-matmul (48 + 4*24 = 144) beats 4*40 = 160
    from tdcompress.layers._base import structure_of

    assert structure_of(geo, spec).plan_linear(4)[1] == 144
    # Conv 3 -> 4, 3x3, pad 1 on 5x5, ranks (2, 2), a = b = 1: 1x1 (3 -> 2) on 25 pixels,
    # 3x3 conv 2 -> 2 on 25 pixels, 1x1 (2 -> 4) on 25 pixels.
    geo = _conv(4, 3, padding=1)
    spec = tt.resolve(geo, 2)
    assert spec.out_factors == (4,) and spec.in_factors == (3,)
    assert tt.macs(geo, spec, (5, 5)) == 25 * 3 * 2 + 25 * 2 * 2 * 9 + 25 * 2 * 4
    with pytest.raises(ValueError, match="input_hw"):
        tt.macs(geo, spec)
    assert tt.num_params(geo, spec) == 4 * 2 + 2 * 9 * 2 + 2 * 3 + 4


@pytest.mark.parametrize("name", ["tt", "tr"])
def test_bad_specs_name_layer_value_and_allowed(name) -> None:
    fmt = get_format(name)
    lin = _lin(12, 20)
    with pytest.raises(ValueError, match=r"fc1: out_factors \(3, 5\) multiply to 15.*12"):
        fmt.resolve(lin, 2, out_factors=(3, 5), in_factors=(4, 5), layer_name="fc1")
    with pytest.raises(ValueError, match=r"fc1: ranks must be ints >= 1, got 0"):
        fmt.resolve(lin, 0, layer_name="fc1")
    with pytest.raises(ValueError, match=r"fc1: ranks must be ints >= 1, got \[2, -1"):
        three = {"out_factors": (2, 2, 3), "in_factors": (2, 2, 5)}
        fmt.resolve(lin, [2, -1, 2][: fmt.n_ranks(3)], **three, layer_name="fc1")
    with pytest.raises(ValueError, match=r"fc1: ranks \[1, 2, 3, 4, 5\] has 5 entries.*give one"):
        fmt.resolve(lin, [1, 2, 3, 4, 5], layer_name="fc1")
    # numpy integers are ranks as the tensor functions take them; floats and bools are not
    assert fmt.resolve(lin, np.int64(2)) == fmt.resolve(lin, 2)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match=r"fc1: ranks must be ints >= 1"):
            fmt.resolve(lin, bad, layer_name="fc1")
    with pytest.raises(ValueError, match=r"fc1: .*same length"):
        fmt.resolve(lin, 2, out_factors=(3, 4), in_factors=(2, 2, 5), layer_name="fc1")
    with pytest.raises(ValueError, match=r"fc1: the TT-matrix layout needs at least 2"):
        fmt.resolve(lin, 2, out_factors=(12,), in_factors=(20,), layer_name="fc1")
    with pytest.raises(ValueError, match=r"fc1: layout 'garipov' .*allowed"):
        fmt.resolve(lin, 2, layout="garipov", layer_name="fc1")
    with pytest.raises(TypeError, match=r"fc1: ranks must be ints"):
        fmt.resolve(lin, 2.5, layer_name="fc1")
    conv = _conv(6, 8, groups=2)
    with pytest.raises(ValueError, match=r"conv3: .*groups=1, got groups=2"):
        fmt.resolve(conv, 2, layer_name="conv3")
    with pytest.raises(ValueError, match=r"conv3: layout 'tucker' .*\['channel', 'garipov'\]"):
        fmt.resolve(_conv(6, 8), 2, layout="tucker", layer_name="conv3")
    with pytest.raises(ValueError, match=r"conv3: in_factors must contain positive ints"):
        fmt.resolve(_conv(6, 8), 2, in_factors=(0, 8), layer_name="conv3")
    spec = fmt.resolve(lin, 2)
    with pytest.raises(ValueError, match=r"weight of shape \(20, 12\) does not match"):
        fmt.project(torch.randn(20, 12), spec)
