"""Per-layer execution choice (issue 21): each factorized layer runs an input shape either
factorized or through the dense kernel rebuilt from its cores. Oracles: the two modes agree
in float64 (outputs and gradients), the rebuilt mode really runs one dense op per layer, an
exported graph with rebuilt layers keeps the cores (compressed size), and torch.compile
traces either mode without a graph break."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tdcompress.layers import (
    EXECUTION_MODES,
    TTConv2d,
    TTLinear,
    _base,
    choose_execution,
    clear_execution,
    execution_modes,
    rebuilt_layers,
    set_execution,
    set_model_execution,
)
from tdcompress.layers._base import DYNAMIC, FactorizedLayer

FACTORIZED = ["3", "4", "5", "6", "10", "12"]  # the factorized layers of factorized_net


class _CountDenseOps(TorchFunctionMode):
    """Counts F.conv2d / F.linear calls and which layers ran :func:`rebuilt_forward`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.n = 0
        self.rebuilt: list[str] = []
        real = _base.rebuilt_forward

        def counted(layer, x, weight=None):  # noqa: ANN001, ANN202
            self.rebuilt.append(type(layer).__name__)
            return real(layer, x, weight)

        monkeypatch.setattr(_base, "rebuilt_forward", counted)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (F.conv2d, F.linear):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _grads(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rebuilt_and_factorized_agree_in_float64_outputs_and_gradients(
    batch, channels_last, factorized_net, monkeypatch
):
    model = factorized_net().double().eval()
    x = torch.randn(batch, 3, 16, 16, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    recs = choose_execution(model, [x.shape], force="factorized", channels_last=channels_last)
    assert [r.layer for r in recs] == FACTORIZED and rebuilt_layers(model) == []
    want, want_g = _grads(model, x)
    recs = choose_execution(model, [x.shape], force="rebuilt", channels_last=channels_last)
    assert {r.mode for r in recs} == {"rebuilt"} and rebuilt_layers(model) == FACTORIZED
    with _CountDenseOps(monkeypatch) as count, torch.no_grad():
        got_nograd = model(x)
    # rebuilt: one dense op per factorized layer, plus the model's own first nn.Conv2d
    assert count.n == len(FACTORIZED) + 1 and len(count.rebuilt) == len(FACTORIZED)
    got, got_g = _grads(model, x)
    torch.testing.assert_close(got_nograd, got, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # each layer alone, rebuilt against its factorized forward on a random input
    for name, layer in model.named_modules():
        if isinstance(layer, FactorizedLayer):
            shape = (batch, layer.geometry.in_features) + ((8, 8) if name in "3456" else ())
            xi = torch.randn(shape, dtype=torch.float64)
            key = _base.execution_key(layer, xi)
            set_execution(layer, key, "factorized")
            ref = layer(xi)
            set_execution(layer, key, "rebuilt")
            torch.testing.assert_close(layer(xi), ref, rtol=1e-12, atol=1e-12)


def test_the_choice_is_per_input_shape_and_other_shapes_stay_factorized(
    factorized_net, monkeypatch
):
    model = factorized_net().eval()
    choose_execution(model, [(4, 3, 16, 16)], force="rebuilt")
    modes = execution_modes(model)
    assert set(modes) == set(FACTORIZED)
    # batch 4 and the symbolic batch torch.compile uses for batches >= 2
    assert modes["10"] == {(4,): "rebuilt", (DYNAMIC,): "rebuilt"}
    assert modes["3"] == {(4, 16, 16): "rebuilt", (DYNAMIC, 16, 16): "rebuilt"}
    with _CountDenseOps(monkeypatch) as count, torch.no_grad():
        model(torch.randn(1, 3, 16, 16))  # batch 1 was not chosen: factorized plans
        assert count.rebuilt == []
        model(torch.randn(4, 3, 16, 16))
        assert len(count.rebuilt) == len(FACTORIZED)
    clear_execution(model)
    assert rebuilt_layers(model) == [] and all(not v for v in execution_modes(model).values())


def test_a_choice_per_shape_on_top_of_a_model_wide_mode(factorized_net):
    """set_model_execution's ANY_SHAPE entry stays for other shapes; choose_execution adds
    the shape's own choice (and the symbolic batch's) beside it (it used to fail on the
    empty key)."""
    model = factorized_net().eval()
    set_model_execution(model, "rebuilt")
    choose_execution(model, [(4, 3, 16, 16)], force="factorized")
    modes = execution_modes(model)
    assert modes["10"] == {(): "rebuilt", (4,): "factorized", (DYNAMIC,): "factorized"}


def test_the_choice_is_machine_state_not_saved_in_the_state_dict(factorized_net):
    model = factorized_net().eval()
    sd_before = model.state_dict()
    choose_execution(model, [(2, 3, 16, 16)], force="rebuilt")
    sd = model.state_dict()
    assert sd.keys() == sd_before.keys()
    assert all("execution" not in str(v) for k, v in sd.items() if k.endswith("_extra_state"))
    fresh = factorized_net().eval()
    fresh.load_state_dict(sd)
    assert rebuilt_layers(fresh) == []  # loaded elsewhere: runs factorized until chosen there
    assert rebuilt_layers(copy.deepcopy(model)) == FACTORIZED  # a copy keeps it
    # layers built separately never share one dict (the class default is never mutated)
    assert FactorizedLayer._execution == {}


def test_measured_choice_records_finite_times_and_sets_the_faster_mode(factorized_net):
    model = factorized_net().eval()
    recs = choose_execution(model, [(2, 3, 16, 16), (1, 3, 16, 16)], repeats=3, warmup=1)
    assert len(recs) == 2 * len(FACTORIZED)
    for r in recs:
        assert r.mode in EXECUTION_MODES
        assert r.factorized_s > 0 and r.rebuilt_s > 0
        assert (r.mode == "rebuilt") == (r.rebuilt_s < r.factorized_s * 0.98)
        assert execution_modes(model)[r.layer][r.key] == r.mode
        assert r.to_dict()["input_shape"] == list(r.input_shape)
    folded = choose_execution(model, [(2, 3, 16, 16)], repeats=2, warmup=0, folded=True)
    assert all(r.rebuilt_s > 0 for r in folded)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"force": "dense"}, "force must be None or one of"),
        ({"repeats": 0}, "repeats must be an int >= 1, got 0"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
        ({"margin": 1.5}, "margin must be in"),
    ],
)
def test_bad_arguments_name_the_argument_and_allowed_values(kwargs, match, factorized_net):
    with pytest.raises(ValueError, match=match):
        choose_execution(factorized_net(), [(1, 3, 16, 16)], **kwargs)
    with pytest.raises(ValueError, match="mode must be one of"):
        set_execution(TTLinear(8, 8, ranks=2), (1,), "fast")


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("mode", EXECUTION_MODES)
def test_compile_fullgraph_in_either_mode_matches_eager(mode, dynamic, factorized_net):
    torch._dynamo.reset()
    model = factorized_net().train()
    choose_execution(model, [(4, 3, 16, 16)], force=mode)
    x = torch.randn(4, 3, 16, 16)
    want, want_g = _grads(model, x)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=dynamic)
    got, got_g = _grads(compiled, x)  # fullgraph: raises on any graph break
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if dynamic:  # another batch size: the same graph, the choice of the symbolic batch
        x3 = torch.randn(3, 3, 16, 16)
        torch.testing.assert_close(compiled(x3), model(x3), rtol=1e-5, atol=1e-6)


def _big_model() -> nn.Module:
    """Layers whose dense kernels are many times their cores."""
    torch.manual_seed(0)
    return nn.Sequential(
        TTConv2d(64, 64, 3, ranks=4, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        TTLinear(64 * 4 * 4, 256, ranks=4),
    ).eval()


def _dense_params(model: nn.Module) -> int:
    return sum(m.to_dense().numel() for m in model.modules() if isinstance(m, FactorizedLayer))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_exported_model_with_rebuilt_layers_keeps_the_compressed_size(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    from tdcompress.export import export_model

    model = _big_model()
    x = torch.randn(2, 64, 4, 4)
    params = sum(p.numel() for p in model.parameters())
    dense_bytes = 4 * _dense_params(model)
    assert dense_bytes > 20 * 4 * params  # the oracle can tell the two apart
    sizes = {}
    for mode in EXECUTION_MODES:
        choose_execution(model, [x.shape], force=mode)
        if mode == "rebuilt":  # kernels kept for PyTorch inference stay out of the file
            from tdcompress.layers import fold_kernels

            assert fold_kernels(model) == ["0", "3"]
        res = export_model(model, x, tmp_path / f"{mode}.{fmt}")  # checked against eager
        sizes[mode] = res.file_bytes
        assert res.max_abs_diff is not None
    assert rebuilt_layers(model) == ["0", "3"]
    assert sizes["rebuilt"] < 4 * params + 200_000 and sizes["rebuilt"] < dense_bytes / 4
    assert sizes["rebuilt"] < 1.5 * sizes["factorized"]
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(tmp_path / "rebuilt.onnx"))
        stored = sum(int(torch.Size(list(t.dims)).numel()) for t in proto.graph.initializer)
        assert stored <= params + 64  # the cores and biases (and small shape constants)
        ops = {n.op_type for n in proto.graph.node}
        assert "Conv" in ops and "Gemm" in ops | {"MatMul"}


def test_onnx_runtime_folds_the_rebuilt_kernels_once_at_load(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from tdcompress.export import export_model

    model = _big_model()
    x = torch.randn(1, 64, 4, 4)
    choose_execution(model, [x.shape], force="rebuilt")
    export_model(model, x, tmp_path / "m.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)
    loaded = onnx.load(str(tmp_path / "loaded.onnx"))
    inits = {t.name: t for t in loaded.graph.initializer}
    convs = [n for n in loaded.graph.node if n.op_type in ("Conv", "FusedConv")]
    assert convs, [n.op_type for n in loaded.graph.node]
    # the conv's kernel is a constant of the loaded graph: the rebuild ran once, at load
    w = inits.get(convs[0].input[1])
    assert w is not None and list(w.dims) == [64, 64, 3, 3]
    # and nothing of the rebuild is left to run per call: no Einsum / MatMul on cores only
    assert not any(n.op_type == "Einsum" for n in loaded.graph.node)


def test_eager_inference_keeps_the_rebuilt_kernel_until_a_parameter_changes(
    factorized_net, monkeypatch
):
    """No grad, eager: a rebuilt layer computes its kernel once and keeps it (as ONNX
    Runtime folds it at load); any change of its parameters (an optimizer step,
    load_state_dict), train(), autograd and folding(False) each rebuild (or drop) it."""
    from tdcompress.layers import folding, set_model_execution

    model = factorized_net().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    assert set_model_execution(model, "rebuilt") == FACTORIZED
    builds: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLayer):
            real = m.to_dense
            monkeypatch.setattr(
                m, "to_dense", lambda real=real, name=name: builds.append(name) or real()
            )
    with torch.no_grad():
        got = model(x)
        assert builds == FACTORIZED  # built once each
        torch.testing.assert_close(model(x), got, rtol=0, atol=0)
        assert builds == FACTORIZED  # ... and kept
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # an in-place change of one layer's cores rebuilds that layer alone
    layer = model.get_submodule("10")
    with torch.no_grad():
        layer.cores[0].mul_(2.0)
        builds.clear()
        changed = model(x)
    assert builds == ["10"] and not torch.allclose(changed, got)
    with torch.no_grad():
        layer.cores[0].div_(2.0)
        torch.testing.assert_close(model(x), got, rtol=1e-12, atol=1e-12)
    # load_state_dict (copy_ into the parameters) rebuilds every layer it touches
    builds.clear()
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    with torch.no_grad():
        model(x)
    assert sorted(builds) == sorted(FACTORIZED)
    # autograd: rebuilt in every call, gradients reach the cores
    builds.clear()
    model(x).sum().backward()
    model(x)
    assert builds == FACTORIZED * 2 and layer.cores[0].grad is not None
    # folding(False): rebuilt in every call; train() drops the kept kernels
    with torch.no_grad(), folding(False):
        builds.clear()
        model(x)
        model(x)
    assert builds == FACTORIZED * 2
    with torch.no_grad():
        model(x)
    assert all("_folded" in m.__dict__ for m in model.modules() if isinstance(m, FactorizedLayer))
    # not pickled (torch.save of the module, deepcopy): the file keeps the compressed size
    assert not any("_folded" in m.__dict__ for m in copy.deepcopy(model).modules())
    model.train()
    assert not any("_folded" in m.__dict__ for m in model.modules())


def test_set_model_execution_rebuilt_trains_with_the_same_gradients(factorized_net):
    """ANY_SHAPE: every shape without a choice of its own; training in float64 gives the
    factorized forward's outputs and gradients (here in train mode, BatchNorm included)."""
    from tdcompress.layers import ANY_SHAPE, set_model_execution

    model = factorized_net().double().train()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    want, want_g = _grads(model, x)
    rebuilt = copy.deepcopy(model)
    set_model_execution(rebuilt, "rebuilt")
    assert all(m == {ANY_SHAPE: "rebuilt"} for m in execution_modes(rebuilt).values())
    got, got_g = _grads(rebuilt, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a choice for a shape of its own wins over ANY_SHAPE
    set_execution(rebuilt.get_submodule("10"), (3,), "factorized")
    assert _base.chosen_mode(rebuilt.get_submodule("10"), torch.zeros(3, 10)) == "factorized"
    with pytest.raises(ValueError, match=r"mode must be one of \['factorized', 'rebuilt'\]"):
        set_model_execution(rebuilt, "dense")


def test_compiled_inference_in_rebuilt_mode_has_no_graph_break(factorized_net):
    """Under torch.compile (no grad) the kept kernel is not used (the graph rebuilds it
    from the cores): fullgraph compiles and matches eager."""
    from tdcompress.layers import set_model_execution

    torch._dynamo.reset()
    model = factorized_net().eval()
    set_model_execution(model, "rebuilt")
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_fold_kernels_serves_compiled_inference_and_is_never_saved(factorized_net, tmp_path):
    """fold_kernels: the rebuilt layers keep their kernel as a buffer that a compiled graph
    (no autograd) reads (one graph, eager's result); it is not in the state dict nor in a
    pickled module, and train() / load_state_dict drop it."""
    from tdcompress.layers import fold_kernels, set_model_execution
    from tdcompress.layers._base import FOLDED

    model = factorized_net().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    assert fold_kernels(model) == []  # factorized layers: nothing to fold
    set_model_execution(model, "rebuilt")
    assert fold_kernels(model) == FACTORIZED
    assert not any(FOLDED in k for k in model.state_dict())
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert not any(FOLDED in dict(m.named_buffers(recurse=False)) for m in loaded.modules())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
        layer = model.get_submodule("10")
        layer._buffers[FOLDED].zero_()  # the compiled graph reads the folded kernel
        assert not torch.allclose(compiled(x), want, atol=1e-4)
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    assert FOLDED not in layer._buffers and "forward" not in layer.__dict__
    assert fold_kernels(model) == FACTORIZED
    model.train()
    assert not any(FOLDED in dict(m.named_buffers(recurse=False)) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_layers_forward_like_dense_ones_and_train_from_their_cores(
    channels_last, factorized_net, monkeypatch
):
    """A layer folded with every shape rebuilt forwards straight to the dense op on its
    kernel without autograd (no factorized code runs: counted), with eager's result; with
    autograd on it runs from its cores (gradients reach them); unfold_kernels restores."""
    from tdcompress.layers import fold_kernels, set_model_execution, unfold_kernels

    model = factorized_net().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
    set_model_execution(model, "rebuilt")
    assert fold_kernels(model, channels_last=channels_last) == FACTORIZED
    with _CountDenseOps(monkeypatch) as count, torch.no_grad():
        got = model(x)
    assert count.rebuilt == [] and count.n == len(FACTORIZED) + 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if channels_last:
        assert got.dim() != 4 or got.is_contiguous()  # (the head's output)
    model(x).sum().backward()
    assert all(c.grad is not None for c in model.get_submodule("3").cores)
    assert unfold_kernels(model) == FACTORIZED
    with _CountDenseOps(monkeypatch) as count, torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    assert len(count.rebuilt) == len(FACTORIZED)


def test_folded_layers_with_mixed_choices_run_each_shape_in_its_mode(factorized_net, monkeypatch):
    """A layer folded with batch 1 rebuilt and batch 4 factorized: in eager inference batch 1
    goes straight to the dense op on the kept kernel, batch 4 through the factorized plan;
    both give the factorized forward's result."""
    from tdcompress.layers import fold_kernels

    model = factorized_net().double().eval()
    x1, x4 = (torch.randn(b, 3, 16, 16, dtype=torch.float64) for b in (1, 4))
    with torch.no_grad():
        want1, want4 = model(x1), model(x4)
    choose_execution(model, [x1.shape], force="rebuilt")
    choose_execution(model, [x4.shape], force="factorized")
    own: list[str] = []  # calls of the layers' own (class) forward
    for cls in {type(m) for m in model.modules() if isinstance(m, FactorizedLayer)}:
        real = cls.forward
        monkeypatch.setattr(
            cls, "forward", lambda self, x, real=real: own.append(1) or real(self, x)
        )
    assert fold_kernels(model) == FACTORIZED
    with _CountDenseOps(monkeypatch) as count, torch.no_grad():
        got1 = model(x1)
        assert count.n == len(FACTORIZED) + 1 and count.rebuilt == [] and own == []
        got4 = model(x4)
        assert count.rebuilt == [] and len(own) == len(FACTORIZED)
    torch.testing.assert_close(got1, want1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got4, want4, rtol=1e-12, atol=1e-12)


def _make_slow(monkeypatch, model: nn.Module, slow: str) -> None:
    """Every layer made to sleep 2 ms per call in mode ``slow`` (``"factorized"``: the
    factorized layers; ``"rebuilt"``: the PyTorch layers of the whole-model check's deployed
    copies), while timed alone factorized always looks faster."""
    import time

    def sleep(mod, args):  # noqa: ANN001, ANN202
        time.sleep(0.002)

    monkeypatch.setattr(_base, "_time_modes", lambda *a, **k: (1.0, 2.0))  # factorized wins
    if slow == "factorized":
        for m in model.modules():
            if isinstance(m, FactorizedLayer):
                m.register_forward_pre_hook(sleep)
        return
    real_dense = _base._with_dense_modules

    def dense_modules(twin, channels_last=False):  # noqa: ANN001, ANN202
        out = real_dense(twin, channels_last)
        for m in out.modules():
            if type(m) in (nn.Conv2d, nn.Linear) and not getattr(m, "_tdc_slow", False):
                m._tdc_slow = True
                m.register_forward_pre_hook(sleep)
        return out

    monkeypatch.setattr(_base, "_with_dense_modules", dense_modules)


@pytest.mark.parametrize("slow", ["factorized", "rebuilt"])
def test_folded_choice_keeps_every_layer_rebuilt_unless_the_whole_model_gains(
    slow, factorized_net, monkeypatch
):
    """choose_execution(folded=True) checks the per-layer choices on the whole forward,
    against a copy deployed with every layer as PyTorch's own layer: when the model runs
    slower with the choices, every layer runs rebuilt for that shape and the records say
    so; otherwise the choices stay."""
    model = factorized_net().eval()
    _make_slow(monkeypatch, model, slow)
    recs = choose_execution(model, [(2, 3, 16, 16)], folded=True, repeats=3)
    want = "rebuilt" if slow == "factorized" else "factorized"
    assert {r.mode for r in recs} == {want}
    assert set(rebuilt_layers(model)) == (set(FACTORIZED) if want == "rebuilt" else set())
    assert all(isinstance(model.get_submodule(n), FactorizedLayer) for n in FACTORIZED)


@pytest.mark.parametrize("slow", ["factorized", "rebuilt"])
def test_compiled_choice_checks_the_whole_model_compiled(factorized_net, monkeypatch, slow):
    """compiled=True: the whole-model check times compiled copies of the model, each as it
    would be deployed (every layer as PyTorch's own layer, against the per-layer choices)
    and keeps the faster; each copy is compiled once (warmed before timing); the model
    itself is left with the modes, not compiled, not folded."""
    compiled: list[nn.Module] = []
    real = torch.compile

    def fake_compile(model, **kwargs):  # (the eager backend: fast, the same graph breaks)
        compiled.append(model)
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = factorized_net().eval()
    _make_slow(monkeypatch, model, slow)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want_out = model(x)
    recs = choose_execution(model, [tuple(x.shape)], folded=True, repeats=3, compiled=True)
    want = "rebuilt" if slow == "factorized" else "factorized"
    assert {r.mode for r in recs} == {want}
    assert len(compiled) == 2 and all(c is not model for c in compiled)
    # one copy runs PyTorch's layers only, the other the choices (factorized here)
    kinds = sorted(sum(isinstance(m, FactorizedLayer) for m in c.modules()) for c in compiled)
    assert kinds == [0, len(FACTORIZED)]
    assert all(_base.FOLDED not in m._buffers for m in model.modules())  # model not folded
    assert all(isinstance(model.get_submodule(n), FactorizedLayer) for n in FACTORIZED)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want_out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compiled=True .* needs folded=True"):
        choose_execution(model, [tuple(x.shape)], compiled=True)
