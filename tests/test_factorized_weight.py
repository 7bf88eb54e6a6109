"""``layer.weight`` of the factorized layers: a stand-in that modules written for nn.Linear
can read, which keeps PyTorch's fused transformer kernels from bypassing the factors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdcompress.layers import (
    LowRankConv2d,
    LowRankLinear,
    TRLinear,
    TTConv2d,
    TTLinear,
    Tucker2Conv2d,
)
from tdcompress.layers._base import FactorizedWeight

LAYERS = [
    lambda: TTLinear(16, 32, 3),
    lambda: TRLinear(16, 32, 2),
    lambda: LowRankLinear(16, 32, 4),
    lambda: TTConv2d(8, 16, 3, 2, padding=1),
    lambda: Tucker2Conv2d(8, 16, 3, (3, 4), padding=1),
    lambda: LowRankConv2d(8, 16, 3, 3, padding=1),
]


@pytest.mark.parametrize("make", LAYERS)
def test_weight_metadata_and_values(make):
    layer = make().double()
    w = layer.weight
    assert isinstance(w, FactorizedWeight)
    dense = layer.to_dense()
    assert w.shape == dense.shape == layer.geometry.weight_shape
    assert w.dtype == torch.float64 and w.device == dense.device and w.dim() == dense.dim()
    assert w.requires_grad
    # any computation runs on the dense reconstruction, differentiably
    torch.testing.assert_close(w * 1.0, dense, rtol=0, atol=0)
    torch.testing.assert_close(w.flatten(1).mT, dense.flatten(1).mT, rtol=0, atol=0)
    w.sum().backward()
    assert all(c.grad is not None for c in layer.cores)


def test_weight_in_functional_calls_matches_forward():
    layer = TTLinear(16, 32, 3).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), layer(x))
    conv = TTConv2d(8, 16, 3, 2, padding=1).double()
    xc = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(xc, conv.weight, conv.bias, padding=1), conv(xc))


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w.data.normal_(),
        lambda w: w.copy_(torch.zeros(w.shape)),
        lambda w: w.__setitem__(0, 1.0),
        lambda w: w.mul_(2),
    ],
)
def test_in_place_changes_raise(change):
    layer = TTLinear(16, 32, 3)
    with pytest.raises(RuntimeError, match=r"TTLinear.weight is computed from the layer's factors"):
        change(layer.weight)


def _counted(layer: nn.Module) -> list[int]:
    """Count the calls of ``layer.forward`` without a hook (hooks alone turn PyTorch's
    fused transformer path off, which would hide what this test looks for)."""
    calls = [0]
    inner = layer.forward

    def forward(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    layer.forward = forward
    return calls


def _factorized_encoder(enc: nn.TransformerEncoder):
    """``enc`` with each layer's linear1 in TT (rank 2) and linear2 in low rank (rank 3),
    a dense copy holding the reconstructed weights (the oracle), and call counters."""
    ref = copy.deepcopy(enc)
    counters = []
    for own, dense in zip(enc.layers, ref.layers):
        own.linear1 = TTLinear.from_dense(own.linear1, 2)
        own.linear2 = LowRankLinear.from_dense(own.linear2, 3)
        with torch.no_grad():
            dense.linear1.weight.copy_(own.linear1.to_dense())
            dense.linear2.weight.copy_(own.linear2.to_dense())
        counters += [_counted(own.linear1), _counted(own.linear2)]
    return enc, ref, counters


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_runs_the_factorized_layers(batch_first, norm_first):
    """In eval mode under no_grad/inference_mode PyTorch's encoder would take its fused
    kernel with ``linear1.weight``; with factorized layers it must call them, and give what
    the dense encoder gives with the reconstructed weights."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
    enc, ref, counters = _factorized_encoder(enc)
    x = torch.randn(3, 5, 32)
    if not batch_first:
        x = x.transpose(0, 1)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    enc.eval()
    ref.eval()
    n = 0
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        for mask in (None, pad):
            with ctx():
                got = enc(x, src_key_padding_mask=mask)
                want = ref(x, src_key_padding_mask=mask)
            n += 1
            assert all(c[0] == n for c in counters), (ctx.__name__, mask is None)
            if mask is not None and want.is_nested:
                want = want.to_padded_tensor(0.0, got.shape)
            if mask is not None:  # padded positions are not defined outputs
                keep = ~pad if batch_first else ~pad.T
                got, want = got[keep], want[keep]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    enc.train()
    enc(x).sum().backward()
    assert all(c[0] == n + 1 for c in counters)
    assert enc.layers[0].linear1.cores[0].grad is not None


def test_setting_a_weight_property_is_refused_not_lost() -> None:
    from tdcompress.layers import TTLinear

    layer = TTLinear.from_dense(torch.nn.Linear(16, 16), ranks=2)
    with pytest.raises(RuntimeError, match="setting weight.data would change a temporary"):
        layer.weight.data = torch.zeros(16, 16)
    with pytest.raises(RuntimeError, match="setting weight.requires_grad"):
        layer.weight.requires_grad = False
    assert all(c.requires_grad for c in layer.cores)


def test_rebuilt_layers_let_the_encoder_take_its_fused_kernel() -> None:
    """Layers that run rebuilt (every choice) give their kept dense kernel as ``weight`` in
    eager inference: PyTorch's encoder then takes its fused kernel without calling them, as
    with dense layers, and gives the dense encoder's output; with autograd on they are
    called (and get gradients)."""
    from tdcompress.layers import set_model_execution

    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    enc, ref, counters = _factorized_encoder(enc)
    set_model_execution(enc, "rebuilt")
    enc.eval()
    ref.eval()
    x = torch.randn(3, 5, 32)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            assert type(enc.layers[0].linear1.weight) is torch.Tensor
            torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)
    assert all(c[0] == 0 for c in counters)  # the fused kernel ran, not the layers
    assert isinstance(enc.layers[0].linear1.weight, FactorizedWeight)  # (autograd on)
    enc(x).sum().backward()
    assert all(c[0] == 1 for c in counters)
    assert enc.layers[0].linear1.cores[0].grad is not None


def test_compiled_encoder_in_eval_mode_has_no_graph_break() -> None:
    """Under torch.compile the encoder's fast-path check reads ``linear1.weight``: there it
    is the kernel rebuilt in the graph (dynamo cannot build the stand-in), so the compiled
    eval forward is one graph and matches eager."""
    from tdcompress.layers import warm_plans

    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    for own in enc.layers:
        own.linear1 = TTLinear.from_dense(own.linear1, 2)
        own.linear2 = LowRankLinear.from_dense(own.linear2, 3)
    x = torch.randn(3, 5, 32)
    warm_plans(enc, [x.shape])
    enc.eval()
    torch._dynamo.reset()
    compiled = torch.compile(enc, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), enc(x), rtol=1e-5, atol=1e-5)
