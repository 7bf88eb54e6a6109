"""TT/TR layers: forward == dense op with to_dense() weights (every plan kind), full-rank
from_dense reproduces the dense layer, gradcheck, counts, init scale, trace/export."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st_
from torch import nn

from tdcompress.formats.base import LayerGeometry, get_format
from tdcompress.layers import build
from tdcompress.layers.tr import TRConv2d, TRLinear
from tdcompress.layers.tt import TTConv2d, TTLinear

D = torch.float64
CONV_CLASSES = [TTConv2d, TRConv2d]
LIN_CLASSES = [TTLinear, TRLinear]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 convs hit ATen's slow paths, which crawl when two threads compete
    with other processes for 2 cores; one thread keeps these tests fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_conv(layer: nn.Module, x: torch.Tensor) -> None:
    g = layer.geometry
    ref = F.conv2d(x, layer.to_dense(), layer.bias, g.stride, g.padding, g.dilation)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


CONV_GEOMS = [
    # (in, out, kernel, stride, padding, dilation, hw, out_factors, in_factors)
    (6, 10, 3, 1, 0, 1, (7, 9), (2, 5), (2, 3)),
    (6, 10, 3, 2, 1, 1, (9, 7), (2, 5), (6,)),
    (6, 4, (3, 1), 1, 1, 2, (9, 8), (4,), (2, 3)),
    (4, 6, 1, 2, 0, 1, (5, 5), (2, 3), (2, 2)),
]


@pytest.mark.parametrize("cls", CONV_CLASSES)
@pytest.mark.parametrize("layout", ["channel", "garipov"])
@pytest.mark.parametrize("geo", CONV_GEOMS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_forward_matches_dense(cls, layout, geo, bias) -> None:
    torch.manual_seed(0)
    i, o, k, s, p, dil, hw, of, inf = geo
    if layout == "garipov" and len(of) != len(inf):
        of, inf = (of + (1,))[:2], (inf + (1,))[:2]
    layer = cls(
        i, o, k, 2, stride=s, padding=p, dilation=dil, bias=bias, layout=layout,
        out_factors=of, in_factors=inf, dtype=D,
    )  # fmt: skip
    st = layer.structure
    kinds = ["dense", "factored", "merge_in", "merge_out"]
    if layout == "garipov":
        kinds = ["dense", "spatial_first"]
    for batch in (1, 5):
        x = torch.randn(batch, i, *hw, dtype=D)
        _check_conv(layer, x)  # the automatically chosen plan
        xc = x.contiguous(memory_format=torch.channels_last)
        _check_conv(layer, xc)  # its channels_last variant
        key = (batch, *hw, False)
        modes = ["einsum", "conv"] if layout == "channel" else [None]
        for kind, pre, post in itertools.product(kinds, modes, modes):  # every possible plan
            layer._plans[key] = st.plan_conv(
                batch, hw, layer.geometry.output_hw(hw), kind=kind, pre_mode=pre, post_mode=post
            )
            _check_conv(layer, x)
            layer._plans[(*key[:-1], True)] = layer._plans[key]
            _check_conv(layer, xc)


@pytest.mark.parametrize("cls", LIN_CLASSES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_matches_dense(cls, bias) -> None:
    torch.manual_seed(0)
    # full ranks: factored work per sample (> 27*15*5) exceeds the dense 27*10, so large
    # batches must reconstruct first; a single sample must not
    layer = cls(27, 10, 1000, out_factors=(1, 2, 5), in_factors=(3, 3, 3), bias=bias, dtype=D)
    for lead in [(1,), (7,), (2, 3), (300,)]:
        x = torch.randn(*lead, 27, dtype=D)
        torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias))
    # the plan is cached per batch size, and a big batch picks reconstruct-then-matmul
    assert set(layer._plans) == {(1,), (7,), (6,), (300,)}
    ops = layer._plans[(300,)].ops
    assert all(0 not in (op.i, op.j) for op in ops[:-1])  # x (operand 0) only at the end
    assert 0 in (ops[-1].i, ops[-1].j)
    assert 0 in (layer._plans[(1,)].ops[0].i, layer._plans[(1,)].ops[0].j)


@pytest.mark.parametrize("cls", CONV_CLASSES)
@pytest.mark.parametrize("layout", ["channel", "garipov"])
def test_conv_full_rank_from_dense_reproduces_dense(cls, layout) -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 4, (3, 3), stride=2, padding=1, dilation=2).double()
    kw = {"out_factors": (2, 2), "in_factors": (2, 3)} if layout == "garipov" else {}
    layer = cls.from_dense(dense, 10**6, layout=layout, **kw)
    assert isinstance(layer, cls) and layer.spec.layout == layout
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 2), (1, 1), (2, 2))
    x = torch.randn(3, 6, 11, 10, dtype=D)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.to_dense(), dense.weight, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", LIN_CLASSES)
def test_linear_full_rank_from_dense_reproduces_dense(cls) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(20, 12).double()
    layer = cls.from_dense(dense, 10**6, out_factors=(3, 4))
    assert layer.spec.in_factors == (4, 5)
    x = torch.randn(4, 20, dtype=D)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-9, atol=1e-10)
    nobias = nn.Linear(20, 12, bias=False).double()
    assert cls.from_dense(nobias, 3).bias is None
    with pytest.raises(TypeError, match=r"from_dense needs an nn.Linear, got Conv2d"):
        cls.from_dense(nn.Conv2d(3, 3, 1), 2)


def test_from_dense_low_rank_equals_projection() -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 6, 3, padding=1).double()
    for cls in CONV_CLASSES:
        layer = cls.from_dense(dense, 2, out_factors=(2, 3), in_factors=(2, 4))
        fmt = get_format(cls.format_name)
        torch.testing.assert_close(layer.to_dense(), fmt.project(dense.weight.detach(), layer.spec))
        torch.testing.assert_close(layer.bias, dense.bias)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TTLinear(12, 6, 2, out_factors=(2, 3), in_factors=(3, 4), dtype=D),
        lambda: TRLinear(12, 6, 2, out_factors=(2, 3), in_factors=(3, 4), dtype=D),
        lambda: TTConv2d(4, 6, 3, 2, stride=2, padding=1, out_factors=(2, 3), dtype=D),
        lambda: TRConv2d(4, 6, 3, 2, padding=1, dilation=2, in_factors=(2, 2), dtype=D),
        lambda: TTConv2d(4, 6, 3, 2, layout="garipov", out_factors=(2, 3), dtype=D),
        lambda: TRConv2d(4, 6, 3, 2, layout="garipov", in_factors=(2, 2), dtype=D),
    ],
)
def test_gradcheck(make) -> None:
    torch.manual_seed(0)
    layer = make()
    shape = (2, 12) if layer.kind == "linear" else (2, 4, 6, 5)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    ps = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *ps))
    assert sum(p.numel() for p in layer.parameters()) == get_format(layer.format_name).num_params(
        layer.geometry, layer.spec
    )


@pytest.mark.parametrize("cls", [TTLinear, TRLinear, TTConv2d, TRConv2d])
def test_init_matches_pytorch_default_variance(cls) -> None:
    torch.manual_seed(0)
    vs = []
    for _ in range(8):
        if cls.kind == "linear":
            layer = cls(256, 128, 6)
            fan_in = 256
        else:
            layer = cls(64, 64, 3, 8)
            fan_in = 64 * 9
        vs.append(layer.to_dense().detach().var())
    ratio = torch.stack(vs).mean() * 3 * fan_in  # PyTorch default: var = 1 / (3 fan_in)
    assert 0.6 < ratio < 1.6
    assert layer.bias.abs().max() <= fan_in**-0.5


def test_extra_repr_and_device_dtype() -> None:
    layer = TTConv2d(8, 6, 3, [3, 2], padding=1, out_factors=(6,), in_factors=(8,))
    r = repr(layer)
    assert "ranks=(3, 2)" in r and "out_factors=(6,)" in r and "padding=(1, 1)" in r
    assert "layout='channel'" in r
    lin = TRLinear(12, 6, 2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in lin.parameters())
    assert "in_features=12, out_features=6" in repr(lin) and "ranks=(2, 2)" in repr(lin)


def test_layer_errors() -> None:
    with pytest.raises(ValueError, match=r"TTConv2d: .*groups=1, got groups=2"):
        TTConv2d(4, 4, 3, 2, groups=2)
    with pytest.raises(ValueError, match=r"TRLinear: in_factors \(2, 2\) multiply to 4.*12"):
        TRLinear(12, 6, 2, out_factors=(2, 3), in_factors=(2, 2))
    with pytest.raises(ValueError, match=r"TTLinear: ranks must be ints >= 1, got 0"):
        TTLinear(12, 6, 0)
    layer = TTLinear(12, 6, 2)
    with pytest.raises(ValueError, match=r"TTLinear: input must have last dimension 12"):
        layer(torch.randn(3, 11))
    conv = TTConv2d(4, 6, 3, 2)
    with pytest.raises(ValueError, match=r"TTConv2d: input must have shape \(N, 4, H, W\)"):
        conv(torch.randn(1, 5, 8, 8))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (
            {"kernel_size": (2.9, 3)},
            r"kernel_size must be an int or a pair of ints, got \(2.9, 3\)",
        ),
        ({"kernel_size": "33"}, "kernel_size must be an int or a pair of ints, got '33'"),
        ({"stride": (1.5, 1)}, r"stride must be an int or a pair of ints"),
        ({"padding": (0.7, 0)}, r"padding must be an int or a pair of ints"),
        ({"padding": True}, r"padding must be an int or a pair of ints, got True"),
        ({"stride": 0}, r"stride must be ints >= 1, got \(0, 0\)"),
        ({"padding": -1}, r"padding must be ints >= 0, got \(-1, -1\)"),
    ],
)
def test_conv_arguments_are_refused_not_truncated(kwargs, msg) -> None:
    args = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=msg):
        TTConv2d(4, 6, args.pop("kernel_size"), 2, **args)


def test_from_factors_refuses_a_bias_it_cannot_hold() -> None:
    fmt = get_format("tt")
    for bias_planned, bias, msg in [
        (False, torch.ones(6), "bias given for a geometry with bias=False"),
        (True, torch.ones(1), r"bias must have out_features=6 values, got shape \(1,\)"),
    ]:
        dense = nn.Linear(12, 6, bias=bias_planned)
        geo = LayerGeometry.from_module(dense)
        spec = fmt.resolve(geo, 2)
        with pytest.raises(ValueError, match=msg):
            build(fmt, geo, fmt.decompose(dense.weight, spec), spec, bias)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TTConv2d(8, 6, 3, 3, padding=1, bias=True),
        lambda: TRConv2d(8, 6, 3, 2, padding=1, bias=True),
        lambda: TTLinear(12, 6, 2, bias=True),
        lambda: TRLinear(12, 6, 2, bias=True),
    ],
)
@pytest.mark.parametrize("batch", [1, 4])
def test_output_dtype_under_autocast_is_that_of_the_dense_layer(make, batch) -> None:
    # the dense layers give bf16 under CPU autocast; a float32 bias must not promote ours
    layer = make()
    x = (
        torch.randn(batch, 8, 6, 6)
        if isinstance(layer, nn.Module) and "Conv" in type(layer).__name__
        else torch.randn(batch, 12)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = (
        F.conv2d(x, layer.to_dense(), layer.bias, padding=1)
        if x.dim() == 4
        else F.linear(x, layer.to_dense(), layer.bias)
    )
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: TTLinear(12, 6, 2, out_factors=(2, 3), in_factors=(3, 4)), (3, 12)),
        (lambda: TRLinear(12, 6, 2, out_factors=(2, 3), in_factors=(3, 4)), (3, 12)),
        (lambda: TTConv2d(4, 6, 3, 2, padding=1, out_factors=(2, 3)), (2, 4, 8, 8)),
        (lambda: TRConv2d(4, 6, 3, 2, stride=2, in_factors=(2, 2)), (2, 4, 8, 8)),
        (lambda: TTConv2d(4, 6, 3, 2, layout="garipov", out_factors=(2, 3)), (2, 4, 8, 8)),
    ],
)
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
    """The exported graph runs in ONNX's reference evaluator and matches the layer."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    for k, (layer, shape) in enumerate(
        (
            (TTLinear(12, 6, 2, out_factors=(2, 3), in_factors=(3, 4)), (3, 12)),
            (TRConv2d(4, 6, 3, 2, padding=1, out_factors=(2, 3)), (2, 4, 8, 8)),
            (TTConv2d(4, 6, 3, 2, stride=2, layout="garipov", out_factors=(2, 3)), (2, 4, 7, 7)),
        )
    ):
        x = torch.randn(shape)
        path = str(tmp_path / f"m{k}.onnx")
        torch.onnx.export(layer.eval(), (x,), path)
        model = onnx.load(path)
        onnx.checker.check_model(model)
        (y,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), layer(x), rtol=1e-4, atol=1e-5)


def test_macs_match_forward_work() -> None:
    """Format.macs equals the work of the single-sample forward, as counted by PyTorch's
    own FLOP counter (2 FLOPs per MAC for mm/bmm/conv) on the executed aten ops."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    for layer, hw in (
        (TTLinear(27, 8, 2, out_factors=(2, 2, 2), in_factors=(3, 3, 3)), None),
        (TRLinear(64, 64, 3, out_factors=(4, 4, 4), in_factors=(4, 4, 4)), None),
        (TTConv2d(6, 10, 3, 2, padding=1, out_factors=(2, 5), in_factors=(2, 3)), (7, 7)),
        (TTConv2d(16, 16, 3, 4, padding=1), (8, 8)),
        (TRConv2d(6, 10, 3, 2, padding=1, layout="garipov", out_factors=(2, 5)), (7, 7)),
    ):
        fmt = get_format(layer.format_name)
        x = torch.randn(1, layer.geometry.in_features, *(hw or ()))
        if hw is None:
            x = x.reshape(1, -1)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            layer(x)
        assert fc.get_total_flops() == 2 * fmt.macs(layer.geometry, layer.spec, hw)


def test_plan_choice_is_cheapest_by_brute_force() -> None:
    """The DP order is no worse than every left-to-right chain order (independent search)."""
    from tdcompress.layers._base import plan_network

    layer = TTLinear(64, 64, 3, out_factors=(2, 4, 8), in_factors=(8, 4, 2))
    st = layer.structure
    best = None
    for batch in (1, 16, 4096):
        sizes = dict(st.sizes, B=batch)
        ops = [("B", *st.I), *st.labels]
        for perm in itertools.permutations(range(1, len(ops))):
            cur, cost = set(ops[0]), 0
            rest = [ops[j] for j in perm]
            for k, o in enumerate(rest):
                union = cur | set(o)
                n = 1
                for lab in union:
                    n *= sizes[lab]
                cost += n
                later = set().union(*rest[k + 1 :]) if k + 1 < len(rest) else set()
                cur = {lab for lab in union if lab in later or lab in ("B", *st.O)}
            best = cost if best is None else min(best, cost)
        _, dp = plan_network(ops, ("B", *st.O), sizes)
        assert dp <= best
        best = None


@pytest.mark.parametrize("plan_at", [2, 4, 64])
def test_a_plan_with_a_batch_label_runs_any_batch_size(plan_at) -> None:
    """Programs leave the batch to run time (-1): a plan made for one batch size gives
    einsum's answer at others (every mm/bmm/mm_left kind), and planning needs size >= 2."""
    from tdcompress.layers._base import plan_network, run_steps

    torch.manual_seed(0)
    layer = TRLinear(24, 30, 3, out_factors=(5, 6), in_factors=(4, 6)).double()
    st = layer.structure
    sizes = dict(st.sizes, B=plan_at)
    ops = [("B", *st.I), *st.labels]
    prog, _ = plan_network(ops, ("B", *st.O), sizes, act=True, batch="B")
    kinds = {op.kind for op in prog.ops}
    assert kinds & {"mm", "bmm", "mm_left"}  # the activation steps are the matrix kinds
    letters = {lab: chr(97 + k) for k, lab in enumerate(dict.fromkeys(sum(ops, ())))}
    eq = ",".join("".join(letters[x] for x in o) for o in ops)
    eq += "->" + "".join(letters[x] for x in ("B", *st.O))
    for n in (1, 3, plan_at, 9):
        x = torch.randn(n, *st.inf, dtype=D)
        want = torch.einsum(eq, x, *layer.cores)
        got = run_steps(prog, [x, *layer.cores]).reshape(want.shape)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"batch label 'B' must have a size >= 2 .* got 1"):
        plan_network(ops, ("B", *st.O), dict(st.sizes, B=1), act=True, batch="B")
    with pytest.raises(ValueError, match=r"batch label 'b' must be a label of the activation"):
        plan_network(ops, ("B", *st.O), dict(sizes, b=4), act=True, batch="b")


def test_gradcheck_every_conv_plan() -> None:
    """Gradients are right for every plan a TR conv (closing rank > 1) can run."""
    torch.manual_seed(0)
    layer = TRConv2d(4, 6, 3, 2, stride=2, padding=1, out_factors=(2, 3), in_factors=(2, 2))
    layer = layer.double()
    x = torch.randn(2, 4, 5, 6, dtype=D, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    ps = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    st, hw = layer.structure, (5, 6)
    plans = [("dense", None, None), ("merge_in", None, "einsum"), ("merge_in", None, "conv")]
    plans += [("merge_out", "einsum", None), ("merge_out", "conv", None)]
    plans += [("factored", a, b) for a in ("einsum", "conv") for b in ("einsum", "conv")]
    for kind, pre, post in plans:
        layer._plans[(2, *hw, False)] = st.plan_conv(
            2, hw, layer.geometry.output_hw(hw), kind=kind, pre_mode=pre, post_mode=post
        )

        def f(x, *qs):
            return torch.func.functional_call(layer, dict(zip(names, qs)), (x,))

        assert torch.autograd.gradcheck(f, (x, *ps)), (kind, pre, post)


@settings(max_examples=25, deadline=None)
@given(
    fmt=st_.sampled_from(["tt", "tr"]),
    layout=st_.sampled_from(["matrix", "channel", "garipov"]),
    of=st_.lists(st_.integers(1, 3), min_size=1, max_size=3),
    inf=st_.lists(st_.integers(1, 3), min_size=1, max_size=3),
    rank=st_.integers(1, 4),
    k=st_.integers(1, 3),
    stride=st_.integers(1, 2),
    batch=st_.integers(1, 3),
)
def test_random_shapes_forward_matches_dense(fmt, layout, of, inf, rank, k, stride, batch):
    """Random factorizations, ranks and conv settings: forward == dense op of to_dense()."""
    import math

    if layout != "channel":  # paired layouts need equal factor counts
        n = max(len(of), len(inf), 2 if layout == "matrix" else 1)
        of, inf = (of + [1] * n)[:n], (inf + [1] * n)[:n]
    O, I = math.prod(of), math.prod(inf)
    torch.manual_seed(0)
    if layout == "matrix":
        cls = TTLinear if fmt == "tt" else TRLinear
        layer = cls(I, O, rank, out_factors=of, in_factors=inf, dtype=D)
        x = torch.randn(batch, I, dtype=D)
        torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias))
        return
    cls = TTConv2d if fmt == "tt" else TRConv2d
    layer = cls(
        I, O, k, rank, stride=stride, padding=k // 2, layout=layout,
        out_factors=of, in_factors=inf, dtype=D,
    )  # fmt: skip
    _check_conv(layer, torch.randn(batch, I, 5, 4, dtype=D))
