"""CUDA paths, checked against the same computation on the CPU (skipped without a GPU;
`python benchmarks/gpu_check.py` runs them on one). Each test compares the device result
with a CPU oracle: the factorized layers forward and backward, the ADMM projection and
update, the LSTM's hand-written backward, bf16/fp16 autocast, fp16 training with its
GradScaler through the pipeline, and export of a model that lives on the GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tdcompress as tdc
from tdcompress.layers import FactorizedLSTM, TRConv2d, TTConv2d, TTLinear, Tucker2Conv2d
from tdcompress.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layers():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    lin = nn.Linear(64, 48)
    return [
        (TTConv2d.from_dense(conv, ranks=4), (4, 16, 12, 12)),
        (TRConv2d.from_dense(conv, ranks=3), (4, 16, 12, 12)),
        (Tucker2Conv2d.from_dense(conv, ranks=(6, 8)), (4, 16, 12, 12)),
        (TTLinear.from_dense(lin, ranks=4), (5, 64)),
    ]


@pytest.mark.parametrize("k", range(4))
def test_factorized_layers_match_cpu_forward_and_backward(k) -> None:
    layer, shape = _layers()[k]
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    gl = [p.grad.clone() for p in layer.parameters()]
    gx = x.grad.clone()
    dev = layer.cuda()
    for p in dev.parameters():
        p.grad = None
    xd = x.detach().cuda().requires_grad_()
    yd = dev(xd)
    yd.square().sum().backward()
    torch.testing.assert_close(yd.cpu(), y.detach())
    torch.testing.assert_close(xd.grad.cpu(), gx)
    for a, b in zip(dev.parameters(), gl):
        torch.testing.assert_close(a.grad.cpu(), b)


def test_admm_projection_and_update_match_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    plan = tdc.plan(model, "tt", ranks=4, include=["0"], input_shape=(1, 64))
    twin = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    twin.load_state_dict(model.state_dict())
    a_cpu = tdc.ADMM(model, plan, rho=0.1)
    a_gpu = tdc.ADMM(twin.cuda(), plan, rho=0.1)
    for a in (a_cpu, a_gpu):
        a.update()
    r_cpu, r_gpu = a_cpu.residuals(), a_gpu.residuals()
    for k in r_cpu:
        assert abs(r_cpu[k] - r_gpu[k]) < 1e-4, k
    x = torch.randn(8, 64)
    torch.testing.assert_close(a_gpu.penalty().cpu(), a_cpu.penalty(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin(x.cuda()).cpu(), model(x), rtol=1e-5, atol=1e-5)


def test_factorized_lstm_backward_matches_cpu() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(24, 16, batch_first=True).double()
    f = FactorizedLSTM.from_lstm(lstm)
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    out, _ = f(x)
    out.sum().backward()
    g = x.grad.clone()
    fd = FactorizedLSTM.from_lstm(lstm).cuda()
    xd = x.detach().cuda().requires_grad_()
    od, _ = fd(xd)
    od.sum().backward()
    torch.testing.assert_close(od.detach().cpu(), out.detach())
    torch.testing.assert_close(xd.grad.cpu(), g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_close_to_fp32(dtype) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).cuda().eval()
    plan = tdc.plan(model, "tt", target_ratio=6.8, input_shape=(1, 3, 32, 32))
    tt, _ = tdc.decompose(model, plan)
    tt = tt.cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = tt(x)
        with torch.autocast("cuda", dtype=dtype):
            low = tt(x)
    assert low.dtype == dtype
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, float(err)


def test_fp16_pipeline_trains_with_grad_scaler(tmp_path) -> None:
    from tdcompress.config import load_config
    from tdcompress.pipeline import Pipeline

    cfg = load_config(
        None,
        [
            "data.dataset=synthetic",
            "model.name=mlp",
            "dense.epochs=2",
            "admm.epochs=1",
            "finetune.epochs=1",
            "compress.ranks=8",
            "runtime.device=cuda",
            "runtime.amp=fp16",
            "runtime.progress=false",
            f"runtime.out_dir={tmp_path / 'run'}",
        ],
    )
    done = Pipeline(cfg).run()
    assert done["evaluate"]["finetuned_acc"] > 0.5
    st = torch.load(tmp_path / "run" / "finetune.ckpt.pt", weights_only=False)
    assert st["scaler"] and st["scaler"]["scale"] > 0  # the GradScaler's state is kept


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_of_a_gpu_model(tmp_path, fmt) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    plan = tdc.plan(model, "tt", target_ratio=6.8, input_shape=(1, 3, 32, 32))
    tt, _ = tdc.decompose(model, plan)
    tt = tt.cuda().eval()
    res = tdc.export_model(tt, torch.randn(2, 3, 32, 32, device="cuda"), tmp_path / f"m.{fmt}")
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-3
