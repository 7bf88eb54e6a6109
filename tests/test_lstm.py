"""FactorizedLSTM: at full rank it matches nn.LSTM carrying the same weights (batch_first
both ways, 2 layers, given (h0, c0), unbatched, no bias); the input layer runs once per
layer on all time steps; gradcheck; counts; trace/export; errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from tdcompress.layers.lowrank import LowRankLinear
from tdcompress.layers.lstm import FactorizedLSTM

D = torch.float64


def _dense_ih(lstm: nn.LSTM, k: int) -> nn.Linear:
    w = getattr(lstm, f"weight_ih_l{k}")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _tt_full_rank(lin: nn.Linear) -> nn.Module:
    tt = pytest.importorskip("tdcompress.layers.tt")
    return tt.TTLinear.from_dense(lin, 10**4, out_factors=(4, 4), in_factors=(2, 3))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["lowrank", "tt", "dense"])
def test_full_rank_matches_nn_lstm(batch_first, bias, kind) -> None:
    torch.manual_seed(0)
    ref = nn.LSTM(6, 4, num_layers=2, bias=bias, batch_first=batch_first).double()
    if kind == "lowrank":
        layers = [LowRankLinear.from_dense(_dense_ih(ref, 0), 100), None]
    elif kind == "tt":
        layers = [_tt_full_rank(_dense_ih(ref, 0)), LowRankLinear.from_dense(_dense_ih(ref, 1), 4)]
    else:
        layers = None
    f = FactorizedLSTM.from_lstm(ref, layers)
    T, B = 5, 3
    x = torch.randn(*((B, T) if batch_first else (T, B)), 6, dtype=D)
    h0 = torch.randn(2, B, 4, dtype=D)
    c0 = torch.randn(2, B, 4, dtype=D)
    for hx in ((h0, c0), None):
        out, (h, c) = f(x, hx)
        out_r, (h_r, c_r) = ref(x, hx)
        torch.testing.assert_close(out, out_r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h, h_r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, c_r, rtol=1e-10, atol=1e-12)
    # unbatched input (T, I) with unbatched state
    xu = x[0] if batch_first else x[:, 0]
    out, (h, c) = f(xu, (h0[:, 0], c0[:, 0]))
    out_r, (h_r, c_r) = ref(xu, (h0[:, 0], c0[:, 0]))
    torch.testing.assert_close(out, out_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, c_r, rtol=1e-10, atol=1e-12)


def test_gradients_match_nn_lstm() -> None:
    torch.manual_seed(1)
    ref = nn.LSTM(3, 2, num_layers=2).double()
    f = FactorizedLSTM.from_lstm(ref)
    x = torch.randn(4, 2, 3, dtype=D)
    ref(x)[0].square().sum().backward()
    f(x)[0].square().sum().backward()
    for k in range(2):
        torch.testing.assert_close(f.input_layers[k].weight.grad, ref.all_weights[k][0].grad)
        for nm in ("weight_hh", "bias_ih", "bias_hh"):
            g_f = getattr(f, f"{nm}_l{k}").grad
            torch.testing.assert_close(g_f, getattr(ref, f"{nm}_l{k}").grad)


def test_input_layer_called_once_on_all_steps() -> None:
    torch.manual_seed(2)
    lr = LowRankLinear(6, 16, 2)
    f = FactorizedLSTM(6, 4, num_layers=2, input_layers=[lr, None])
    calls: list[tuple[int, ...]] = []
    lr.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    f(torch.randn(7, 3, 6))
    assert calls == [(21, 6)]


def test_gradcheck() -> None:
    torch.manual_seed(3)
    f = FactorizedLSTM(
        3,
        2,
        num_layers=2,
        batch_first=True,
        dtype=D,
        input_layers=[LowRankLinear(3, 8, 2, dtype=D), None],
    )
    names = [n for n, _ in f.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in f.parameters())
    x = torch.randn(2, 3, 3, dtype=D, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=D, requires_grad=True)
    c0 = torch.randn(2, 2, 2, dtype=D, requires_grad=True)

    def fn(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(f, dict(zip(names, ps)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


def test_counts_init_and_repr() -> None:
    torch.manual_seed(4)
    ref = nn.LSTM(10, 8, num_layers=2)
    f = FactorizedLSTM(10, 8, num_layers=2)
    assert sum(p.numel() for p in f.parameters()) == sum(p.numel() for p in ref.parameters())
    bound = 8**-0.5
    assert all(p.abs().max() <= bound for p in f.parameters())
    assert f.weight_hh_l1.std() > 0.5 * bound / 3**0.5
    lr = LowRankLinear(10, 32, 3, bias=False)
    g = FactorizedLSTM.from_lstm(ref, [lr, None])
    want = sum(p.numel() for p in ref.parameters()) - 32 * 10 + 3 * (10 + 32)
    assert sum(p.numel() for p in g.parameters()) == want
    assert g.input_layers[0] is lr
    assert "10, 8, num_layers=2" in repr(g) and "LowRankLinear" in repr(g)
    # nn.LSTM attributes/methods that training code touches
    for nm in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout"):
        assert getattr(g, nm) == getattr(ref, nm), nm
    assert (g.bidirectional, g.proj_size) == (ref.bidirectional, ref.proj_size)
    g.flatten_parameters()


def test_dropout_only_in_training() -> None:
    torch.manual_seed(5)
    ref = nn.LSTM(3, 4, num_layers=2, dropout=0.5).eval()
    f = FactorizedLSTM.from_lstm(ref)
    assert f.dropout == 0.5 and not f.training
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(f(x)[0], ref(x)[0])
    f.train()
    assert not torch.allclose(f(x)[0], ref(x)[0])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_trace_and_export() -> None:
    torch.manual_seed(6)
    f = FactorizedLSTM(
        6, 4, num_layers=2, batch_first=True, input_layers=[LowRankLinear(6, 16, 2), None]
    ).eval()
    x = torch.randn(3, 5, 6)
    ref = f(x)
    traced = torch.jit.trace(f, (x,))
    torch.testing.assert_close(traced(x), ref)
    ep = torch.export.export(f, (x,))
    torch.testing.assert_close(ep.module()(x), ref)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnx (and onnxscript, which torch.onnx.export needs) not installed",
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export(tmp_path) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(7)
    f = FactorizedLSTM(6, 4, input_layers=[LowRankLinear(6, 16, 2)]).eval()
    x = torch.randn(3, 2, 6)
    path = str(tmp_path / "lstm.onnx")
    torch.onnx.export(f, (x,), path)
    model = onnx.load(path)
    (y, *_) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), f(x)[0], rtol=1e-4, atol=1e-5)


def test_errors() -> None:
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 6), torch.randn(2, 6)])
    with pytest.raises(TypeError, match=r"FactorizedLSTM: input must be a tensor \(packed"):
        FactorizedLSTM(6, 4)(packed)
    with pytest.raises(ValueError, match=r"FactorizedLSTM: input_layers has 1 entries.*=2"):
        FactorizedLSTM(6, 4, num_layers=2, input_layers=[None])
    with pytest.raises(ValueError, match=r"input_layers\[0\] maps 6 -> 12 features.*6 -> 16"):
        FactorizedLSTM(6, 4, input_layers=[LowRankLinear(6, 12, 2)])
    with pytest.raises(TypeError, match=r"input_layers\[0\] must be an nn.Module or None"):
        FactorizedLSTM(6, 4, input_layers=["dense"])
    with pytest.raises(ValueError, match=r"FactorizedLSTM: hidden_size must be an int >= 1, got 0"):
        FactorizedLSTM(6, 0)
    with pytest.raises(ValueError, match=r"from_lstm: proj_size=0, bidirectional=True"):
        FactorizedLSTM.from_lstm(nn.LSTM(3, 4, bidirectional=True))
    with pytest.raises(TypeError, match=r"lstm must be an nn.LSTM, got GRU"):
        FactorizedLSTM.from_lstm(nn.GRU(3, 4))
    f = FactorizedLSTM(6, 4, num_layers=2)
    with pytest.raises(ValueError, match=r"FactorizedLSTM: h_0 must have shape \(2, 3, 4\)"):
        f(torch.randn(5, 3, 6), (torch.zeros(1, 3, 4), torch.zeros(2, 3, 4)))
    with pytest.raises(ValueError, match=r"FactorizedLSTM: input must have shape"):
        f(torch.randn(5, 3, 7))
    with pytest.raises(ValueError, match=r"FactorizedLSTM: input has sequence length 0 .*>= 1"):
        FactorizedLSTM(6, 4, batch_first=True)(torch.randn(3, 0, 6))


@pytest.mark.parametrize("loss", ["output", "state"])
def test_hand_written_backward_matches_autograd_of_nn_lstm(loss) -> None:
    """The recurrence's own backward (used in training) against nn.LSTM's gradients, for
    inputs, initial state and all weights, with losses on the output or the final state."""
    torch.manual_seed(8)
    ref = nn.LSTM(4, 3, num_layers=2, batch_first=True).double()
    f = FactorizedLSTM.from_lstm(ref, [LowRankLinear.from_dense(_dense_ih(ref, 0), 10), None])
    x = torch.randn(2, 6, 4, dtype=D)
    h0, c0 = torch.randn(2, 2, 3, dtype=D), torch.randn(2, 2, 3, dtype=D)
    grads = []
    for m in (ref, f):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        out, (h, c) = m(xs, (hs, cs))
        val = out.sin().sum() if loss == "output" else (h.square().sum() + c.cos().sum())
        val.backward()
        grads.append([xs.grad, hs.grad, cs.grad])
        grads[-1] += [
            getattr(m, f"{n}_l{k}").grad
            for k in range(2)
            for n in ("weight_hh", "bias_ih", "bias_hh")
        ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    w_ih = f.input_layers[0].cores[0] @ f.input_layers[0].cores[1]
    g_ref = ref.weight_ih_l0.grad
    # chain rule through W = A B: dL/dA = dL/dW B^T
    torch.testing.assert_close(
        f.input_layers[0].cores[0].grad, g_ref @ f.input_layers[0].cores[1].detach().t()
    )
    assert w_ih.shape == g_ref.shape


def test_autocast_bf16_matches_nn_lstm_and_trains() -> None:
    """Under CPU autocast (bf16) the output dtypes are nn.LSTM's, values agree with the
    float32 result to bf16 accuracy, and the backward runs and gives the float32
    gradients to bf16 accuracy."""
    torch.manual_seed(9)
    ref = nn.LSTM(6, 4, num_layers=2, batch_first=True)
    f = FactorizedLSTM.from_lstm(ref, [LowRankLinear.from_dense(_dense_ih(ref, 0), 100), None])
    x = torch.randn(3, 5, 6)
    out32, (h32, c32) = f(x)
    (out32.sum() + c32.sum()).backward()
    g32 = [p.grad.clone() for p in f.parameters()]
    f.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = f(x)
        out_r, (h_r, c_r) = ref(x)
    assert (out.dtype, h.dtype, c.dtype) == (out_r.dtype, h_r.dtype, c_r.dtype)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().float() - b.detach()).norm() / b.detach().norm())

    for a, b in ((out, out32), (h, h32), (c, c32)):
        assert rel(a, b) < 0.02
    (out.float().sum() + c.float().sum()).backward()
    for p, g in zip(f.parameters(), g32):
        assert p.grad is not None and p.grad.dtype == p.dtype
        assert rel(p.grad, g) < 0.03


def test_meta_device_like_nn_lstm() -> None:
    """Runs on the meta device (shape inference without memory), as nn.LSTM does; the
    autocast check must not trip on device types autocast does not know."""
    ref = nn.LSTM(5, 3, 2, batch_first=True, device="meta")
    f = FactorizedLSTM.from_lstm(ref)
    x = torch.empty(2, 4, 5, device="meta")
    got, want = f(x), ref(x)
    assert [t.shape for t in (got[0], *got[1])] == [t.shape for t in (want[0], *want[1])]
    assert all(t.device.type == "meta" for t in (got[0], *got[1]))


def _rebuilt(layer: nn.Module) -> nn.Module:
    from tdcompress.layers import ANY_SHAPE, set_execution

    set_execution(layer, ANY_SHAPE, "rebuilt")
    return layer


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["dense", "rebuilt", "own_bias", "one_factorized"])
def test_eager_inference_runs_pytorch_lstm_kernel_with_the_same_result(
    batch_first, bias, kind, monkeypatch
) -> None:
    """No grad, eager: input layers that run as one dense matrix (nn.Linear, or factorized
    and chosen "rebuilt", its kernel kept) go through PyTorch's LSTM kernel; the oracle is
    the same module with autograd on (the hand-written recurrence), and nn.LSTM."""
    import tdcompress.layers.lstm as lstm_mod

    torch.manual_seed(4)
    ref = nn.LSTM(6, 4, num_layers=2, bias=bias, batch_first=batch_first).double()
    if kind == "dense":
        layers = None
    elif kind == "rebuilt":
        layers = [_rebuilt(_tt_full_rank(_dense_ih(ref, 0))), None]
    elif kind == "own_bias":  # a bias of the input layer's own, on top of the LSTM's
        layers = [_rebuilt(LowRankLinear(6, 16, 3, bias=True, dtype=D)), None]
    else:  # one layer factorized (not rebuilt): every layer runs the hand-written loop
        layers = [None, LowRankLinear.from_dense(_dense_ih(ref, 1), 4)]
    f = FactorizedLSTM.from_lstm(ref, layers).eval()
    loops: list[int] = []
    real = lstm_mod.recurrence
    monkeypatch.setattr(
        lstm_mod, "recurrence", lambda *a: loops.append(1) or real(*a)
    )  # fmt: skip
    T, B = 5, 3
    x = torch.randn(*((B, T) if batch_first else (T, B)), 6, dtype=D)
    h0, c0 = torch.randn(2, B, 4, dtype=D), torch.randn(2, B, 4, dtype=D)
    xu = x[0] if batch_first else x[:, 0]
    for args in ((x, (h0, c0)), (x,), (xu, (h0[:, 0], c0[:, 0]))):
        want = f(*args)  # autograd on: the hand-written loop
        assert loops, "the grad-enabled forward must run the hand-written recurrence"
        loops.clear()
        with torch.no_grad():
            got = f(*args)
        assert bool(loops) == (kind == "one_factorized")
        loops.clear()
        for a, b in zip(
            torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
        ):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        if kind != "own_bias":
            with torch.no_grad():
                for a, b in zip(
                    torch.utils._pytree.tree_leaves(got),
                    torch.utils._pytree.tree_leaves(ref(*args)),
                ):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_eager_inference_with_dropout_in_training_mode_matches_nn_lstm() -> None:
    """No grad but training mode: the kernel's dropout between layers, as nn.LSTM's."""
    ref = nn.LSTM(6, 4, num_layers=2, dropout=0.5).double()
    f = FactorizedLSTM.from_lstm(ref).train()
    x = torch.randn(5, 3, 6, dtype=D)
    with torch.no_grad():
        torch.manual_seed(7)
        got = f(x)[0]
        torch.manual_seed(7)
        want = ref(x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_inference_with_folded_input_kernel_runs_pytorch_lstm() -> None:
    """Under torch.compile without autograd, a rebuilt input layer with a folded kernel
    (fold_kernels) runs PyTorch's LSTM kernel (outside the graph, as nn.LSTM does):
    nn.LSTM's result."""
    from tdcompress.layers import fold_kernels

    torch.manual_seed(5)
    ref = nn.LSTM(6, 4, num_layers=2).double()
    f = FactorizedLSTM.from_lstm(ref, [_rebuilt(_tt_full_rank(_dense_ih(ref, 0))), None]).eval()
    assert fold_kernels(f) == ["input_layers.0"]
    x = torch.randn(5, 3, 6, dtype=D)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    with torch.no_grad():
        got, want = compiled(x), ref(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _wide_lstm(bias: bool = True, batch_first: bool = False, own_bias: bool = False):
    """A 2-layer FactorizedLSTM whose first input layer is wider than 4 * hidden (20 > 16):
    full-rank low rank (so nn.LSTM with the same weights is an oracle unless ``own_bias``),
    the second a dense nn.Linear; and that nn.LSTM."""
    torch.manual_seed(11)
    ref = nn.LSTM(20, 4, num_layers=2, bias=bias, batch_first=batch_first).double()
    first = LowRankLinear.from_dense(_dense_ih(ref, 0), 100)
    if own_bias:
        first = LowRankLinear(20, 16, 3, bias=True, dtype=D)
    return FactorizedLSTM.from_lstm(ref, [first, None]).eval(), ref


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("own_bias", [False, True])
def test_fused_recurrence_on_projected_gates_matches_per_step(
    batch_first, bias, own_bias, monkeypatch
) -> None:
    """Recurrence mode "fused": a wide input layer running factorized projects, and PyTorch's
    LSTM kernel runs on the gates with an identity input matrix; the oracles are the same
    module with autograd on (the hand-written recurrence) and nn.LSTM; "per_step" (the
    default in eager inference) runs the loop."""
    import tdcompress.layers.lstm as lstm_mod

    f, ref = _wide_lstm(bias, batch_first, own_bias)
    loops: list[int] = []
    real = lstm_mod.recurrence
    monkeypatch.setattr(lstm_mod, "recurrence", lambda *a: loops.append(1) or real(*a))
    T, B = 5, 3
    x = torch.randn(*((B, T) if batch_first else (T, B)), 20, dtype=D)
    h0, c0 = torch.randn(2, B, 4, dtype=D), torch.randn(2, B, 4, dtype=D)
    xu = x[0] if batch_first else x[:, 0]
    for args in ((x, (h0, c0)), (x,), (xu, (h0[:, 0], c0[:, 0]))):
        want = torch.utils._pytree.tree_leaves(f(*args))  # autograd on: the loop
        key = f.recurrence_key(args[0])
        assert key == ((1, T) if args[0].dim() == 2 else (B, T))
        for mode, loop in (("per_step", True), ("fused", False)):
            f.set_recurrence(key, mode)
            loops.clear()
            with torch.no_grad():
                got = torch.utils._pytree.tree_leaves(f(*args))
            assert bool(loops) == loop, mode
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            if not own_bias:
                with torch.no_grad():
                    for a, b in zip(got, torch.utils._pytree.tree_leaves(ref(*args))):
                        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_recurrence_choice_is_timed_by_choose_execution(monkeypatch) -> None:
    """choose_execution times a FactorizedLSTM whose wide input layer runs factorized (per
    step against fused) and records the faster mode for the shape; outputs do not change;
    a narrow factorized input layer leaves nothing to choose; bad modes are refused."""
    import tdcompress.layers._base as base
    from tdcompress.layers import RECURRENCE_MODES, choose_execution

    # the input layer's own choice made "factorized" whatever this machine measures
    monkeypatch.setattr(base, "_time_modes", lambda *a: (0.0, 1.0))
    f, _ = _wide_lstm()
    x = torch.randn(5, 3, 20, dtype=D)
    with torch.no_grad():
        want = f(x)[0]
    recs = choose_execution(f, [tuple(x.shape)], repeats=2, warmup=0)
    assert [r.key for r in recs if r.layer == ""] == [(3, 5)]
    (rec,) = [r for r in recs if r.layer == ""]
    assert rec.mode in RECURRENCE_MODES and rec.factorized_s > 0 and rec.rebuilt_s > 0
    assert f._recurrence[(3, 5)] == rec.mode
    with torch.no_grad():
        torch.testing.assert_close(f(x)[0], want, rtol=1e-10, atol=1e-12)
    narrow = FactorizedLSTM(6, 4, input_layers=[LowRankLinear(6, 16, 2)]).eval()
    assert narrow.time_recurrence(torch.randn(5, 3, 6), repeats=1, warmup=0) is None
    with pytest.raises(ValueError, match=r"mode must be one of \['per_step', 'fused'\]"):
        f.set_recurrence((3, 5), "loop")


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnx (and onnxscript, which torch.onnx.export needs) not installed",
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", ["wide_factorized", "wide_rebuilt", "narrow_factorized"])
def test_export_runs_onnx_lstm_operator_and_keeps_the_cores(tmp_path, case) -> None:
    """Exported, a FactorizedLSTM is one ONNX LSTM operator per layer group (not the loop
    unrolled into the graph) whatever its input layer's mode: a wide factorized input layer
    projects and the operator multiplies by an identity built in the graph; otherwise the
    operator's input matrix is rebuilt from the cores in the graph. The file keeps the
    compressed size (no dense matrix, no identity stored) and matches the eager model."""
    import onnx

    from tdcompress.export import export_model
    from tdcompress.layers import ANY_SHAPE, TTLinear, set_execution

    torch.manual_seed(3)
    wide = case != "narrow_factorized"
    n_in = 512 if wide else 64
    f = FactorizedLSTM(n_in, 32, input_layers=[TTLinear(n_in, 128, ranks=2)]).eval()
    if case == "wide_rebuilt":
        set_execution(f.input_layers[0], ANY_SHAPE, "rebuilt")
    res = export_model(f, torch.randn(7, 2, n_in), tmp_path / "lstm.onnx", dynamic_batch=False)
    proto = onnx.load(str(res.path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LSTM") == 1, ops
    assert "Loop" not in ops and ops.count("Sigmoid") == 0, ops
    dense_ih = n_in * 128 * 4  # bytes of the dense input matrix
    recurrent = 128 * 32 * 4
    assert res.file_bytes < recurrent + dense_ih / 4, (res.file_bytes, dense_ih)
    if wide:  # and the 128 x 128 identity is not stored either
        assert res.file_bytes < recurrent + 128 * 128 * 4 / 4


def test_compiled_inference_runs_the_fused_kernel_outside_the_graph() -> None:
    """Under torch.compile without autograd, a FactorizedLSTM that runs PyTorch's fused
    kernel is left out of the graph (a graph break, as dynamo does with nn.LSTM), with
    eager's result; one whose wide input layer runs per step is traced (no break)."""
    import torch._dynamo

    class Net(nn.Module):  # (ops before and after the LSTM: a break splits the graph)
        def __init__(self, lstm: nn.Module) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(2 * x)[0].sum(-1)

    torch.manual_seed(8)
    dense = Net(FactorizedLSTM(20, 4, batch_first=True)).eval()
    wide = Net(_wide_lstm()[0].float()).eval()  # low-rank first layer, per step by default
    x = torch.randn(3, 5, 20)
    from tdcompress.layers import warm_plans

    warm_plans(wide, [tuple(x.shape)])  # (a plan made while tracing is a graph break)
    for f, breaks in ((dense, 1), (wide, 0)):
        torch._dynamo.reset()
        with torch.no_grad():
            want = f(x)
            info = torch._dynamo.explain(f)(x)
            got = torch.compile(f, backend="eager")(x)
        assert info.graph_break_count == breaks, [str(b.reason)[:80] for b in info.break_reasons]
        ops = [str(n.target) for gm in info.graphs for n in gm.graph.nodes if n.op != "placeholder"]
        assert not any("lstm" in o.lower() for o in ops), ops  # (no fused kernel in a graph)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.enable_grad():  # training: traced (the per-step loop), no break
        torch._dynamo.reset()
        info = torch._dynamo.explain(dense)(x)
    assert info.graph_break_count == 0
