"""A small zoo, each model planned, ADMM-trained for a few steps, decomposed, run in train
and eval mode, exported and checked: nn.TransformerEncoder (batch_first both ways), a
Hugging Face BERT and GPT-2 from small configs with random weights (skipped without the
``transformers`` package), a ResNet with bottleneck blocks and a MobileNet-style model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tdcompress as tdc


def _admm_steps(model, plan, make_batch, loss_of, steps=3):
    admm = tdc.ADMM(model, plan, rho=0.1, schedule=tdc.ADMMSchedule(every_steps=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        loss = loss_of(model, make_batch()) + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        admm.step()
    assert admm.updates == steps
    return admm


def _full_rank_oracle(model, plan_kw, args, kwargs=None):
    """At full rank the decomposed model must compute what the dense one does (float64)."""
    kwargs = kwargs or {}
    dense = model.double().eval()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    p = tdc.plan(dense, "tt", ranks=10_000, **plan_kw)
    full, _ = tdc.decompose(dense, p)
    with torch.no_grad():
        want, got = dense(*args, **kwargs), full.eval()(*args, **kwargs)
    want = want[0] if isinstance(want, tuple) else getattr(want, "last_hidden_state", want)
    got = got[0] if isinstance(got, tuple) else getattr(got, "last_hidden_state", got)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    model.float()


def _export_both(model, args, tmp_path, kwargs=None, dims=None):
    for fmt in ("pt2", "onnx"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = tdc.export_model(
                model,
                args,
                tmp_path / f"m.{fmt}",
                example_kwargs=kwargs,
                dynamic_dims=dims,
                atol=1e-4,
                rtol=1e-4,
            )
        assert res.checked_with is not None and len(res.checked_shapes) == 2
        assert res.checked_shapes[0] != res.checked_shapes[1]
    return res


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(tmp_path, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    shape = (2, 6, 32) if batch_first else (6, 2, 32)
    one = (1, 6, 32) if batch_first else (6, 1, 32)
    _full_rank_oracle(model, {"include": ["*linear*"]}, (torch.randn(shape),))
    p = tdc.plan(model, "tt", ranks=3, include=["*linear*"], input_shape=one)
    assert len(p) == 4 and len(p.skipped) == 4  # in_proj_weight and out_proj per layer
    _admm_steps(model, p, lambda: torch.randn(shape), lambda m, x: m(x).square().mean())
    small, report = tdc.decompose(model, p)
    assert report.params_after < report.params_before
    x = torch.randn(shape)
    small.train()
    assert small(x).shape == shape
    small.eval()
    with torch.inference_mode():
        y = small(x)
    assert torch.isfinite(y).all()
    seq = 1 if batch_first else 0
    _export_both(small, (x,), tmp_path, dims={1 - seq: "batch", seq: "seq"})


def _resnet():

    class Bottleneck(nn.Module):
        def __init__(self, c, mid):
            super().__init__()
            self.conv1 = nn.Conv2d(c, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3 = nn.Conv2d(mid, c, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(c)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = torch.relu(self.bn2(self.conv2(h)))
            return torch.relu(x + self.bn3(self.conv3(h)))

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        Bottleneck(16, 8),
        Bottleneck(16, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _mobilenet():
    def dw_sep(c_in, c_out, stride):
        return nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU6(),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(),
        )

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1),
        dw_sep(16, 32, 1),
        dw_sep(32, 32, 2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


@pytest.mark.parametrize("name", ["resnet_bottleneck", "mobilenet"])
def test_cnns(tmp_path, name):
    torch.manual_seed(0)
    model = _resnet() if name == "resnet_bottleneck" else _mobilenet()
    x = torch.randn(2, 3, 16, 16)
    p = tdc.plan(model, "tt", target_ratio=1.5, input_shape=(1, 3, 16, 16))
    if name == "mobilenet":
        assert set(p.skipped) == {"1.0", "2.0"}  # the depthwise convs
        assert all("grouped convolution (groups=" in r for r in p.skipped.values())
        assert "not compressible here" in p.summary()
    else:
        assert [lp.name for lp in p] == ["1.conv2", "2.conv2"] and not p.skipped
    y = torch.randint(0, 10, (2,))
    _admm_steps(model, p, lambda: x, lambda m, b: nn.functional.cross_entropy(m(b), y))
    small, _ = tdc.decompose(model, p)
    small.train()
    small(x).sum().backward()
    small.eval()
    with torch.no_grad():
        assert torch.isfinite(small(x)).all()
    res = _export_both(small, (x,), tmp_path, dims={0: "batch"})
    assert res.dynamic_batch


# ------------------------------------------------------------------ Hugging Face


def _hf():
    return pytest.importorskip(
        "transformers", reason="the Hugging Face tests need `pip install transformers`"
    )


def _tokens(vocab, batch=2, seq=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return ids, mask


def test_bert(tmp_path):
    hf = _hf()
    torch.manual_seed(0)
    cfg = hf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = hf.BertModel(cfg)
    ids, mask = _tokens(64)
    _full_rank_oracle(model, {}, (ids,), {"attention_mask": mask})
    p = tdc.plan(model, "tt", target_ratio=1.3, example_inputs={"input_ids": ids[:1]})
    names = [lp.name for lp in p]
    assert "encoder.layer.0.attention.self.query" in names
    assert "encoder.layer.1.intermediate.dense" in names
    assert "pooler.dense" not in names  # the last Linear
    assert p.model_macs is not None and p.compressed_macs is not None
    _admm_steps(
        model, p, lambda: _tokens(64), lambda m, b: m(b[0], attention_mask=b[1])[0].square().mean()
    )
    small, _ = tdc.decompose(model, p)
    small.train()
    small(ids, attention_mask=mask).last_hidden_state.sum().backward()
    small.eval()
    with torch.no_grad():
        out = small(ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (2, 7, 32)
    res = _export_both(
        small, (ids,), tmp_path, kwargs={"attention_mask": mask}, dims={0: "batch", 1: "seq"}
    )
    assert res.input_names == ("input_ids", "attention_mask")
    assert res.output_names == ("last_hidden_state", "pooler_output")
    assert res.checked_shapes == (((2, 7), (2, 7)), ((1, 6), (1, 6)))


def test_gpt2(tmp_path):
    hf = _hf()
    torch.manual_seed(0)
    cfg = hf.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    model = hf.GPT2LMHeadModel(cfg)
    ids, mask = _tokens(64)
    p = tdc.plan(model, "svd", target_ratio=1.15, example_inputs=(ids[:1],))
    # GPT-2's Conv1D layers are planned (stored transposed); the head is tied to wte
    assert p["transformer.h.0.mlp.c_fc"].transposed
    assert "tied weights" in p.skipped["lm_head"]
    _full_rank_oracle(model, {"include": ["*c_fc", "*c_proj"]}, (ids,))

    def lm_loss(m, b):
        return m(b[0], attention_mask=b[1], labels=b[0]).loss

    _admm_steps(model, p, lambda: _tokens(64), lm_loss)
    small, _ = tdc.decompose(model, p)
    small.train()
    lm_loss(small, (ids, mask)).backward()
    small.eval()
    with torch.no_grad():
        logits = small(ids, attention_mask=mask).logits
    assert logits.shape == (2, 7, 64)
    res = _export_both(
        small, (ids,), tmp_path, kwargs={"attention_mask": mask}, dims={0: "batch", 1: "seq"}
    )
    assert res.output_names[0] == "logits"
