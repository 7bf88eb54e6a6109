"""Tucker2Conv2d, LowRankLinear, LowRankConv2d: forward == dense op with to_dense() weights
(every plan kind), full-rank from_dense reproduces the dense layer, gradcheck, plan choice,
counts, init scale, trace/export, errors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from tdcompress.formats.base import get_format
from tdcompress.layers.lowrank import LowRankConv2d, LowRankLinear
from tdcompress.layers.tucker2 import Tucker2Conv2d

D = torch.float64
CONV_PLANS = {
    Tucker2Conv2d: ["factored", "merge_in", "merge_out", "dense"],
    LowRankConv2d: ["factored", "dense"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 convs crawl when two threads compete for 2 busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CONV_GEOMS = [
    # (in, out, kernel, stride, padding, dilation, hw)
    (5, 7, 3, 1, 0, 1, (7, 9)),
    (5, 7, 3, 2, 1, 1, (9, 7)),
    (6, 4, (3, 1), 1, 1, 2, (9, 8)),
    (3, 6, 1, 2, 0, 1, (5, 5)),
    (4, 5, (1, 3), (2, 1), (0, 1), (1, 2), (6, 7)),
]


def _ref_conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    g = layer.geometry
    return F.conv2d(x, layer.to_dense(), layer.bias, g.stride, g.padding, g.dilation)


@pytest.mark.parametrize("cls", [Tucker2Conv2d, LowRankConv2d])
@pytest.mark.parametrize("geo", CONV_GEOMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_forward_matches_dense_every_plan(cls, geo, bias, batch) -> None:
    torch.manual_seed(0)
    i, o, k, s, p, dil, hw = geo
    ranks = (3, 2) if cls is Tucker2Conv2d else 2
    layer = cls(i, o, k, ranks, stride=s, padding=p, dilation=dil, bias=bias, dtype=D)
    x = torch.randn(batch, i, *hw, dtype=D)
    ref = _ref_conv(layer, x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)  # the chosen plan
    key = (batch, *hw)
    for plan in CONV_PLANS[cls]:
        layer._plans[key] = plan
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10, msg=plan)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 9), (4, 9), (2, 3, 9), (9,)])
def test_linear_forward_matches_dense_every_plan(bias, shape) -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(9, 5, 3, bias=bias, dtype=D)
    x = torch.randn(*shape, dtype=D)
    ref = F.linear(x, layer.to_dense(), layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
    for plan in ("factored", "dense"):
        layer._plans[(math.prod(shape[:-1]),)] = plan
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [Tucker2Conv2d, LowRankConv2d])
@pytest.mark.parametrize("geo", CONV_GEOMS)
def test_full_rank_from_dense_reproduces_conv(cls, geo) -> None:
    torch.manual_seed(1)
    i, o, k, s, p, dil, hw = geo
    dense = nn.Conv2d(i, o, k, stride=s, padding=p, dilation=dil).double()
    layer = cls.from_dense(dense, 10**4)
    assert (layer.stride, layer.padding, layer.dilation) == (
        dense.stride,
        dense.padding,
        dense.dilation,
    )
    torch.testing.assert_close(layer.to_dense(), dense.weight, rtol=1e-10, atol=1e-10)
    for batch in (1, 4):
        x = torch.randn(batch, i, *hw, dtype=D)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_from_dense_reproduces_linear(bias) -> None:
    torch.manual_seed(2)
    dense = nn.Linear(7, 11, bias=bias).double()
    layer = LowRankLinear.from_dense(dense, 100)
    assert layer.rank == 7 and (layer.bias is None) == (not bias)
    x = torch.randn(5, 7, dtype=D)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)


def test_from_dense_truncates_like_the_format() -> None:
    torch.manual_seed(3)
    dense = nn.Conv2d(6, 8, 3, padding=1).double()
    for cls, ranks in ((Tucker2Conv2d, (3, 2)), (LowRankConv2d, 3)):
        layer = cls.from_dense(dense, ranks)
        fmt = get_format(layer.spec.format)
        want = fmt.project(dense.weight.detach(), layer.spec)
        torch.testing.assert_close(layer.to_dense(), want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.bias, dense.bias)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: LowRankLinear(5, 4, 2, dtype=D), (3, 5)),
        (lambda: LowRankLinear(5, 4, 2, bias=False, dtype=D), (5,)),
        (lambda: LowRankConv2d(3, 4, 3, 2, stride=2, padding=1, dtype=D), (2, 3, 5, 5)),
        (lambda: Tucker2Conv2d(3, 4, 3, (2, 2), dilation=2, padding=1, dtype=D), (2, 3, 5, 6)),
    ],
)
def test_gradcheck(make, shape) -> None:
    torch.manual_seed(4)
    layer = make()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    plans = CONV_PLANS.get(type(layer), ["factored", "dense"])
    key = (int(math.prod(shape[:-1])),) if x.dim() < 4 else (shape[0], *shape[2:])
    for plan in plans:
        layer._plans[key] = plan

        def f(x, *ps, plan=plan):
            return functional_call(layer, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params)), plan


def test_plan_choice_follows_batch_size() -> None:
    lin = LowRankLinear(8, 8, 8)
    lin(torch.randn(1, 8))
    lin(torch.randn(100, 8))
    # factored: B * 8 * 16 MACs; dense: 8 * 8 * 8 + B * 64
    assert lin._plans == {(1,): "factored", (100,): "dense"}
    conv = Tucker2Conv2d(16, 16, 3, (4, 4), padding=1)
    conv(torch.randn(1, 16, 8, 8))
    assert conv._plans[(1, 8, 8)] == "factored"


def test_num_params_and_init_scale() -> None:
    torch.manual_seed(5)
    for layer in (
        LowRankLinear(300, 200, 20),
        LowRankConv2d(40, 60, 3, 10),
        Tucker2Conv2d(40, 60, 3, (12, 10)),
        Tucker2Conv2d(40, 60, 3, 8, bias=False),
    ):
        fmt = get_format(layer.spec.format)
        assert fmt.num_params(layer.geometry, layer.spec) == sum(
            p.numel() for p in layer.parameters()
        )
        g = layer.geometry
        fan_in = g.in_features * g.kernel_size[0] * g.kernel_size[1]
        ratio = layer.to_dense().var().item() * 3 * fan_in
        assert 0.5 < ratio < 2.0, (type(layer).__name__, ratio)
        if layer.bias is not None:
            assert layer.bias.abs().max() <= fan_in**-0.5


def test_extra_repr_and_device_dtype() -> None:
    t = Tucker2Conv2d(8, 6, 3, (3, 2), padding=1, stride=2)
    r = repr(t)
    assert "8, 6, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)" in r
    assert "r_out=3, r_in=2" in r and "bias=True" in r
    lin = LowRankLinear(12, 6, 2, bias=False, dtype=D, device="cpu")
    assert all(p.dtype == D for p in lin.parameters())
    assert "in_features=12, out_features=6, rank=2, bias=False" in repr(lin)
    c = LowRankConv2d(4, 6, 3, 2, dilation=2)
    assert "dilation=(2, 2), rank=2" in repr(c)


def test_layer_errors() -> None:
    with pytest.raises(ValueError, match=r"Tucker2Conv2d: .*groups=1, got groups=2"):
        Tucker2Conv2d(4, 4, 3, 2, groups=2)
    with pytest.raises(ValueError, match=r"LowRankConv2d.from_dense: .*groups=1, got groups=4"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4), 2)
    with pytest.raises(ValueError, match=r"Tucker2Conv2d: ranks must be ints >= 1, got 0"):
        Tucker2Conv2d(4, 4, 3, 0)
    with pytest.raises(ValueError, match=r"Tucker2Conv2d: ranks \[1, 2, 3\] has 3 entries"):
        Tucker2Conv2d(4, 4, 3, [1, 2, 3])
    with pytest.raises(ValueError, match=r"LowRankLinear: ranks must be ints >= 1, got -1"):
        LowRankLinear(4, 4, -1)
    with pytest.raises(ValueError, match=r"LowRankConv2d: stride must be ints >= 1"):
        LowRankConv2d(4, 4, 3, 2, stride=0)
    with pytest.raises(TypeError, match=r"Tucker2Conv2d.from_dense needs an nn.Conv2d"):
        Tucker2Conv2d.from_dense(nn.Linear(4, 4), 2)
    with pytest.raises(TypeError, match=r"LowRankLinear.from_dense needs an nn.Linear"):
        LowRankLinear.from_dense(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(ValueError, match=r"LowRankLinear: input must have last dimension 12"):
        LowRankLinear(12, 6, 2)(torch.randn(3, 11))
    with pytest.raises(ValueError, match=r"Tucker2Conv2d: input must have shape \(N, 4, H, W\)"):
        Tucker2Conv2d(4, 6, 3, 2)(torch.randn(1, 5, 8, 8))


TRACE_CASES = [
    (lambda: LowRankLinear(12, 6, 2), (3, 12)),
    (lambda: LowRankLinear(12, 6, 6), (300, 12)),  # dense plan
    (lambda: LowRankConv2d(4, 6, 3, 2, padding=1, stride=2), (2, 4, 8, 8)),
    (lambda: Tucker2Conv2d(4, 6, 3, (3, 2), padding=1), (2, 4, 8, 8)),
    (lambda: Tucker2Conv2d(4, 6, 1, 4, stride=2), (1, 4, 9, 9)),  # dense plan
]


@pytest.mark.parametrize("make,shape", TRACE_CASES)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_trace_and_export(make, shape) -> None:
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(shape)
    ref = layer(x)
    traced = torch.jit.trace(layer, (x,))
    torch.testing.assert_close(traced(x), ref)
    ep = torch.export.export(layer, (x,))
    torch.testing.assert_close(ep.module()(x), ref)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnx (and onnxscript, which torch.onnx.export needs) not installed",
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export(tmp_path) -> None:
    """The exported graph runs in ONNX's reference evaluator and matches the layers (all
    trace cases in one model: one export instead of five)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    class _All(nn.Module):
        def __init__(self, layers: list[nn.Module]) -> None:
            super().__init__()
            self.layers = nn.ModuleList(layers)

        def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(m(x) for m, x in zip(self.layers, xs))

    torch.manual_seed(0)
    model = _All([make() for make, _ in TRACE_CASES]).eval()
    xs = tuple(torch.randn(shape) for _, shape in TRACE_CASES)
    path = str(tmp_path / "layers.onnx")
    torch.onnx.export(model, xs, path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    feeds = {inp.name: x.numpy() for inp, x in zip(proto.graph.input, xs)}
    ys = ReferenceEvaluator(proto).run(None, feeds)
    with torch.no_grad():
        want = model(*xs)
    assert len(ys) == len(want) == len(TRACE_CASES)
    for y, w in zip(ys, want):
        torch.testing.assert_close(torch.from_numpy(y), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [Tucker2Conv2d, LowRankConv2d])
@pytest.mark.parametrize("grad", [True, False])
def test_channels_last_and_no_grad_paths(cls, grad) -> None:
    """NHWC inputs (1x1 stages as GEMMs on the NHWC view) and the inference path give the
    dense result for every plan; an NCHW input gives an NCHW-contiguous output."""
    torch.manual_seed(6)
    ranks = (3, 2) if cls is Tucker2Conv2d else 2
    layer = cls(5, 7, 3, ranks, stride=2, padding=1, dtype=D)
    x = torch.randn(3, 5, 9, 8, dtype=D)
    ref = _ref_conv(layer, x).detach()
    for plan in CONV_PLANS[cls]:
        layer._plans[(3, 9, 8)] = plan
        with torch.set_grad_enabled(grad):
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                y = layer(inp)
                torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10, msg=plan)
                if inp.is_contiguous():
                    assert y.is_contiguous()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    data=st.data(),
    cls=st.sampled_from([Tucker2Conv2d, LowRankConv2d]),
    i=st.integers(1, 6),
    o=st.integers(1, 6),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    p=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dil=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    batch=st.integers(1, 3),
    bias=st.booleans(),
)
def test_random_conv_geometries_every_plan_and_macs(
    data, cls, i, o, k, s, p, dil, batch, bias
) -> None:
    """Random geometries and ranks: every plan equals F.conv2d with to_dense(); the
    format's MAC count is what torch counts in the single-sample forward; params match."""
    hw = data.draw(st.tuples(st.integers(1, 7), st.integers(1, 7)))
    assume(all(hw[j] + 2 * p[j] >= dil[j] * (k[j] - 1) + 1 for j in range(2)))
    n_ranks = 2 if cls is Tucker2Conv2d else 1
    ranks = data.draw(st.lists(st.integers(1, 8), min_size=n_ranks, max_size=n_ranks))
    torch.manual_seed(9)
    layer = cls(i, o, k, ranks, stride=s, padding=p, dilation=dil, bias=bias, dtype=D)
    fmt = get_format(layer.spec.format)
    assert all(1 <= r <= m for r, m in zip(layer.spec.ranks, fmt.max_ranks(layer.geometry, None)))
    assert fmt.num_params(layer.geometry, layer.spec) == sum(q.numel() for q in layer.parameters())
    x = torch.randn(batch, i, *hw, dtype=D)
    ref = _ref_conv(layer, x)
    for plan in CONV_PLANS[cls]:
        layer._plans[(batch, *hw)] = plan
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10, msg=plan)
    layer._plans.clear()
    with FlopCounterMode(display=False) as fc:
        layer(x[:1])
    assert fmt.macs(layer.geometry, layer.spec, hw) == fc.get_total_flops() // 2


@pytest.mark.parametrize("cls", [Tucker2Conv2d, LowRankConv2d, LowRankLinear])
def test_autocast_bf16_every_plan(cls) -> None:
    """Under CPU autocast every plan returns the dense op's autocast dtype (bf16), the
    float32 result to bf16 accuracy, and float32 gradients close to the float32 ones."""
    torch.manual_seed(10)
    if cls is LowRankLinear:
        layer, x = LowRankLinear(9, 7, 3), torch.randn(4, 9)
        key, plans = (4,), ["factored", "dense"]
    else:
        layer = cls(5, 7, 3, (3, 2) if cls is Tucker2Conv2d else 2, stride=2, padding=1)
        x, key, plans = torch.randn(3, 5, 9, 8), (3, 9, 8), CONV_PLANS[cls]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().float() - b.detach()).norm() / b.detach().norm())

    for plan in plans:
        layer._plans[key] = plan
        layer.zero_grad()
        ref = layer(x)
        ref.square().sum().backward()
        g32 = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            want_dtype = (F.linear if cls is LowRankLinear else F.conv2d)(
                x, layer.to_dense(), layer.bias
            ).dtype
        assert y.dtype == want_dtype == torch.bfloat16, plan
        assert rel(y, ref) < 0.02, plan
        y.float().square().sum().backward()
        for p, g in zip(layer.parameters(), g32):
            assert p.grad.dtype == torch.float32 and rel(p.grad, g) < 0.03, plan
