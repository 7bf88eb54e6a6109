"""Layer selection by subclass, weights reported as not compressible, MAC ceilings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tdcompress as tdc
from tdcompress.planning import CompressionPlan


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D, as it is written there: a Linear stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class MyLinear(nn.Linear):
    pass


def _encoder(batch_first=True):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


def test_subclasses_are_selected_and_attention_projections_reported():
    model = nn.Sequential(MyLinear(16, 32), _encoder(), nn.Linear(32, 4))
    p = tdc.plan(model, "tt", ranks=2)
    assert "0" in [lp.name for lp in p]  # a subclass of nn.Linear
    assert [lp.name for lp in p][1:] == [
        f"1.0.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)
    ]
    assert set(p.skipped) == {
        f"1.0.layers.{i}.self_attn.{n}" for i in range(2) for n in ("in_proj_weight", "out_proj")
    }
    assert "bare parameter" in p.skipped["1.0.layers.0.self_attn.in_proj_weight"]
    assert "never calls out_proj" in p.skipped["1.0.layers.0.self_attn.out_proj"]
    text = p.summary()
    assert "not compressible here (left dense):" in text and "never calls out_proj" in text
    again = CompressionPlan.from_dict(p.to_dict())
    assert again.skipped == p.skipped
    with pytest.raises(ValueError, match=r"matches only weights that cannot be compressed: .*"):
        tdc.plan(model, "tt", ranks=2, include=["*out_proj"])


def test_grouped_convs_and_tied_weights_are_skipped_with_reasons():
    emb = nn.Embedding(10, 16)
    head = nn.Linear(16, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(
        {
            "stem": nn.Conv2d(3, 8, 3),
            "dw": nn.Conv2d(8, 8, 3, groups=8),
            "conv": nn.Conv2d(8, 8, 3),
            "emb": emb,
            "mid": nn.Linear(16, 16),
            "head": head,
        }
    )
    p = tdc.plan(model, "tt", ranks=2)
    assert [lp.name for lp in p] == ["conv", "mid"]  # head: last Linear, tied anyway
    assert "groups=8" in p.skipped["dw"]
    assert "shared with emb.weight" in p.skipped["head"]


def test_conv1d_is_planned_transposed_and_compresses_like_a_linear():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 16), nn.Tanh(), Conv1D(16, 24), nn.Linear(16, 2))
    model.double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    p = tdc.plan(model, "tt", ranks=64, input_shape=(1, 5, 16))  # full rank: exact
    lp = p["0"]
    assert lp.transposed and lp.geometry.weight_shape == (24, 16) and lp.param_shape == (16, 24)
    assert lp.steps == 5 and lp.dense_macs == 5 * 16 * 24
    assert CompressionPlan.from_dict(p.to_dict())["0"].transposed
    admm = tdc.ADMM(model, p, rho=0.1)
    for k, z in admm.Z.items():  # full-rank projection: the weight itself, in its layout
        torch.testing.assert_close(z, model.get_parameter(k))
    small, report = tdc.decompose(model, p)
    assert max(report.errors.values()) < 1e-10
    torch.testing.assert_close(small(x), model(x))
    p2 = tdc.plan(model, "svd", ranks=2)
    small2, _ = tdc.decompose(model, p2)
    w = model[0].weight.detach().T  # the dense layout (out, in)
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(small2[0].to_dense(), u[:, :2] * s[:2] @ vh[:2])


def test_summary_flags_layers_above_dense_macs_and_max_layer_macs_caps_them():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 2))
    p = tdc.plan(model, "tt", ranks=28, input_shape=(1, 64))
    over = p.over_dense_macs()
    assert set(over) == {"0", "2"} and all(v > 1 for v in over.values())
    assert "! more MACs than the dense layer: 0 (" in p.summary()
    capped = tdc.plan(model, "tt", ranks=28, input_shape=(1, 64), max_layer_macs=1.0)
    assert capped.over_dense_macs() == {}
    for lp in capped:
        assert lp.macs <= lp.dense_macs
        # the largest cap: one more on every rank would be over
        bigger = tdc.plan(
            model, "tt", ranks=max(lp.spec.ranks) + 1, include=[lp.name], input_shape=(1, 64)
        )
        assert bigger[lp.name].macs > lp.dense_macs
    assert capped.meta["max_layer_macs"] == 1.0 and set(capped.meta["macs_capped"]) == {"0", "2"}
    solved = tdc.plan(model, "tt", target_ratio=37.0, input_shape=(1, 64), max_layer_macs=0.5)
    assert all(lp.macs <= 0.5 * lp.dense_macs for lp in solved)
    assert abs(solved.ratio / 37.0 - 1) < 0.03
    with pytest.raises(ValueError, match=r"cannot be met .*with max_layer_macs=0.5, which caps"):
        tdc.plan(model, "tt", target_ratio=2.0, input_shape=(1, 64), max_layer_macs=0.5)
    with pytest.raises(ValueError, match=r"max_layer_macs must be a finite number > 0.*got -1"):
        tdc.plan(model, "tt", ranks=2, max_layer_macs=-1)
    with pytest.raises(ValueError, match=r"even at rank 1 .*max_layer_macs=0.001"):
        tdc.plan(model, "tt", ranks=2, input_shape=(1, 64), max_layer_macs=0.001)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"max_layer_macs needs the MACs .*'1' saw no input"):
        tdc.plan(conv, "tt", ranks=2, max_layer_macs=1.0)


def test_macs_of_a_transformer_count_every_position_and_the_attention_projections():
    for batch_first in (True, False):
        model = _encoder(batch_first)
        shape = (1, 7, 32) if batch_first else (7, 1, 32)
        p = tdc.plan(model, "tt", ranks=2, include=["*linear1"], input_shape=shape)
        # per layer: q, k, v and out projections (4 x 32 x 32) and the two feed-forward
        # matrices (2 x 32 x 64), at each of the 7 positions
        assert p.model_macs == 2 * 7 * (4 * 32 * 32 + 2 * 32 * 64)
        assert p["0.layers.0.linear1"].steps == 7


def test_example_inputs_trace_keyword_and_integer_inputs():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 16)
            self.fc = nn.Linear(16, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, input_ids, scale=None):
            h = self.fc(self.emb(input_ids))
            return self.out(h if scale is None else h * scale)

    ids = torch.randint(0, 11, (1, 6))
    p = tdc.plan(Tok(), "svd", ranks=2, example_inputs={"input_ids": ids})
    assert p["fc"].steps == 6 and p.model_macs == 6 * (16 * 16 + 16 * 3)
    p2 = tdc.plan(Tok(), "svd", ranks=2, example_inputs=(ids, torch.tensor(2.0)))
    assert p2.model_macs == p.model_macs
    with pytest.raises(ValueError, match="give input_shape or example_inputs, not both"):
        tdc.plan(Tok(), "svd", ranks=2, example_inputs=ids, input_shape=(1, 6))
    with pytest.raises(TypeError, match="example_inputs must be a tensor, a tuple"):
        tdc.plan(Tok(), "svd", ranks=2, example_inputs=[ids])


class _StdConv(nn.Conv2d):  # standardises its weight in forward, as timm's StdConv2d
    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return self._conv_forward(x, w, self.bias)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class _PlainSubLinear(nn.Linear):  # a subclass that computes nn.Linear's function
    pass


def test_subclasses_with_their_own_forward_stay_dense_with_the_reason() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        _StdConv(8, 16, 3),
        nn.Flatten(),
        _ScaledLinear(16 * 4 * 4, 32),
        _PlainSubLinear(32, 32),
        nn.Linear(32, 10),
    )
    p = tdc.plan(model, "tt", ranks=4, include=["*"], input_shape=(1, 3, 8, 8))
    assert [lp.name for lp in p.layers] == ["0", "4", "5"]
    assert "overrides forward()" in p.skipped["1"] and "_StdConv" in p.skipped["1"]
    assert "overrides forward()" in p.skipped["3"]
    # what is planned still computes the model's function at full rank (float64)
    full = tdc.plan(model, "tt", ranks=64, include=["*"], input_shape=(1, 3, 8, 8))
    m = model.double()
    c, _ = tdc.decompose(m, full)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(c(x), m(x))
