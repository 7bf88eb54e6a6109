"""ImageNet ResNet-18/34 (torchvision-compatible names) and the LSTM video classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdcompress.models.lstm_video import LSTMVideoClassifier, lstm_video
from tdcompress.models.resnet_imagenet import resnet18, resnet34

# torchvision.models.resnet18().state_dict(): name and shape ("-" = scalar), in order
RESNET18_KEYS = """
conv1.weight 64,3,7,7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
bn1.num_batches_tracked -
layer1.0.conv1.weight 64,64,3,3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked -
layer1.0.conv2.weight 64,64,3,3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked -
layer1.1.conv1.weight 64,64,3,3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked -
layer1.1.conv2.weight 64,64,3,3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked -
layer2.0.conv1.weight 128,64,3,3
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.bn1.num_batches_tracked -
layer2.0.conv2.weight 128,128,3,3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked -
layer2.0.downsample.0.weight 128,64,1,1
layer2.0.downsample.1.weight 128
layer2.0.downsample.1.bias 128
layer2.0.downsample.1.running_mean 128
layer2.0.downsample.1.running_var 128
layer2.0.downsample.1.num_batches_tracked -
layer2.1.conv1.weight 128,128,3,3
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked -
layer2.1.conv2.weight 128,128,3,3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked -
layer3.0.conv1.weight 256,128,3,3
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.bn1.num_batches_tracked -
layer3.0.conv2.weight 256,256,3,3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked -
layer3.0.downsample.0.weight 256,128,1,1
layer3.0.downsample.1.weight 256
layer3.0.downsample.1.bias 256
layer3.0.downsample.1.running_mean 256
layer3.0.downsample.1.running_var 256
layer3.0.downsample.1.num_batches_tracked -
layer3.1.conv1.weight 256,256,3,3
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked -
layer3.1.conv2.weight 256,256,3,3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked -
layer4.0.conv1.weight 512,256,3,3
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.bn1.num_batches_tracked -
layer4.0.conv2.weight 512,512,3,3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked -
layer4.0.downsample.0.weight 512,256,1,1
layer4.0.downsample.1.weight 512
layer4.0.downsample.1.bias 512
layer4.0.downsample.1.running_mean 512
layer4.0.downsample.1.running_var 512
layer4.0.downsample.1.num_batches_tracked -
layer4.1.conv1.weight 512,512,3,3
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked -
layer4.1.conv2.weight 512,512,3,3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked -
fc.weight 1000,512
fc.bias 1000
"""


def _expected_keys() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in RESNET18_KEYS.strip().splitlines():
        name, shape = line.split()
        out.append((name, () if shape == "-" else tuple(int(s) for s in shape.split(","))))
    return out


def test_resnet18_state_dict_names_and_shapes_match_torchvision():
    sd = resnet18().state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == _expected_keys()


def test_resnet18_loads_a_torchvision_style_state_dict_strictly():
    g = torch.Generator().manual_seed(0)
    foreign = {}
    for name, shape in _expected_keys():
        if name.endswith("num_batches_tracked"):
            foreign[name] = torch.tensor(7)
        else:
            foreign[name] = torch.rand(shape, generator=g) + 0.5
    m = resnet18()
    m.load_state_dict(foreign, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, foreign[k]), k


@pytest.mark.parametrize(("factory", "count"), [(resnet18, 11_689_512), (resnet34, 21_797_672)])
def test_parameter_counts(factory, count):
    assert sum(p.numel() for p in factory().parameters()) == count


def test_resnet34_blocks_per_stage_and_custom_classes():
    m = resnet34(num_classes=7)
    assert [len(s) for s in (m.layer1, m.layer2, m.layer3, m.layer4)] == [3, 4, 6, 3]
    assert m.fc.weight.shape == (7, 512)
    assert m.layer1[0].downsample is None and m.layer3[0].downsample is not None


def _functional_resnet18(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Eval-mode ResNet-18 from the paper's description, on the state dict alone."""

    def bn(t, p):
        return F.batch_norm(
            t,
            sd[p + ".running_mean"],
            sd[p + ".running_var"],
            sd[p + ".weight"],
            sd[p + ".bias"],
            False,
            0.0,
            1e-5,
        )

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for s in range(1, 5):
        for b in range(2):
            p = f"layer{s}.{b}"
            stride = 2 if (s > 1 and b == 0) else 1
            out = F.relu(
                bn(F.conv2d(x, sd[p + ".conv1.weight"], stride=stride, padding=1), p + ".bn1")
            )
            out = bn(F.conv2d(out, sd[p + ".conv2.weight"], padding=1), p + ".bn2")
            if p + ".downsample.0.weight" in sd:
                x = bn(
                    F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1"
                )
            x = F.relu(out + x)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def test_resnet18_forward_matches_functional_oracle():
    torch.manual_seed(0)
    m = resnet18(num_classes=5).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    m.eval()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    ref = _functional_resnet18(m.state_dict(), x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_resnet_he_init_and_zero_init_residual():
    torch.manual_seed(1)
    m = resnet18()
    w = m.layer4[1].conv2.weight  # fan_out = 512 * 9
    assert abs(w.std().item() / (2.0 / (512 * 9)) ** 0.5 - 1) < 0.01
    assert torch.all(m.layer2[0].bn1.weight == 1) and torch.all(m.layer2[0].bn1.bias == 0)
    z = resnet18(zero_init_residual=True)
    assert torch.all(z.layer3[1].bn2.weight == 0) and torch.all(z.layer3[1].bn1.weight == 1)


def test_resnet_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes.*0"):
        resnet18(num_classes=0)


def _manual_lstm(x, w_ih, w_hh, b_ih, b_hh):
    """Closed-form LSTM recursion (gates i, f, g, o) over (B, T, F) -> (B, T, H)."""
    h = x.new_zeros(x.shape[0], w_hh.shape[1])
    c = torch.zeros_like(h)
    outs = []
    for t in range(x.shape[1]):
        i, f, g, o = (x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1)


def test_lstm_video_matches_manual_lstm_on_flattened_frames():
    torch.manual_seed(0)
    m = LSTMVideoClassifier(3 * 4 * 5, 6, 4, num_layers=2).double()
    x = torch.randn(3, 7, 3, 4, 5, dtype=torch.float64)
    flat = x.reshape(3, 7, 60)
    ref_lstm = nn.LSTM(60, 6, 2, batch_first=True).double()
    ref_lstm.load_state_dict(m.lstm.state_dict())
    ref = F.linear(ref_lstm(flat)[0][:, -1], m.fc.weight, m.fc.bias)
    torch.testing.assert_close(m(x), ref)
    # independent closed-form recursion, two stacked layers
    h = flat
    for k in range(2):
        p = {
            n: getattr(m.lstm, f"{n}_l{k}")
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        }
        h = _manual_lstm(h, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
    torch.testing.assert_close(m(x), h[:, -1] @ m.fc.weight.T + m.fc.bias)
    torch.testing.assert_close(m(flat), m(x))  # (B, T, F) input is accepted as is


def test_lstm_video_gradcheck_and_factory():
    torch.manual_seed(0)
    m = LSTMVideoClassifier(6, 3, 2).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    d = lstm_video()
    assert isinstance(d.lstm, nn.LSTM) and d.lstm.input_size == 57_600 and d.fc.out_features == 11


def test_lstm_video_errors():
    with pytest.raises(ValueError, match="hidden_size.*0"):
        LSTMVideoClassifier(4, 0, 2)
    m = LSTMVideoClassifier(12, 3, 2)
    with pytest.raises(ValueError, match="20 features.*input_size=12"):
        m(torch.randn(1, 2, 20))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        m(torch.randn(2, 12))


def test_lstm_video_plans_and_decomposes_exactly_at_full_rank():
    from tdcompress.planning import plan
    from tdcompress.surgery import decompose

    torch.manual_seed(0)
    m = LSTMVideoClassifier(3 * 4 * 6, 16, 3).eval()
    p = plan(m, "tt", ranks=64, lstm=True, input_shape=(1, 5, 3, 4, 6))
    assert [lp.param for lp in p.layers] == ["lstm.weight_ih_l0"] and p.layers[0].steps == 5
    d, _ = decompose(m, p)
    assert not isinstance(d.lstm, nn.LSTM)
    x = torch.randn(2, 5, 3, 4, 6)
    torch.testing.assert_close(d(x), m(x), rtol=1e-5, atol=1e-5)


def test_lstm_video_keras_style_init():
    torch.manual_seed(0)
    m = LSTMVideoClassifier(48, 16, 5, num_layers=2)
    for layer in range(2):
        w_hh = getattr(m.lstm, f"weight_hh_l{layer}").detach()
        torch.testing.assert_close(w_hh.T @ w_hh, torch.eye(16), atol=1e-5, rtol=0)
        b_ih = getattr(m.lstm, f"bias_ih_l{layer}").detach()
        assert b_ih.tolist() == [0.0] * 16 + [1.0] * 16 + [0.0] * 32  # i, f, g, o
        assert torch.count_nonzero(getattr(m.lstm, f"bias_hh_l{layer}")) == 0
        w_ih = getattr(m.lstm, f"weight_ih_l{layer}").detach()
        fan_in = 48 if layer == 0 else 16
        assert float(w_ih.abs().max()) <= (6 / (fan_in + 64)) ** 0.5
    assert torch.count_nonzero(m.fc.bias) == 0


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"hidden": [0]}, r"mlp: hidden must be a sequence of positive ints, got \[0\]"),
        ({"hidden": 256}, r"mlp: hidden must be a sequence of positive ints, got 256"),
        ({"in_features": 0}, r"mlp: in_features must be a positive int, got 0"),
        ({"num_classes": 2.5}, r"mlp: num_classes must be a positive int, got 2.5"),
    ],
)
def test_mlp_refuses_bad_arguments(kwargs, msg):
    from tdcompress.models import build_model

    with pytest.raises(ValueError, match=msg):
        build_model("mlp", **kwargs)
    assert build_model("mlp", hidden=(8,), in_features=4, num_classes=3)(
        torch.zeros(2, 4)
    ).shape == (
        2,
        3,
    )


def test_row_transformer_tokens_are_rows_and_full_rank_tt_is_exact() -> None:
    import tdcompress as tdc
    from tdcompress.models import build_model

    torch.manual_seed(0)
    m = build_model("row_transformer", dropout=0.0).double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    y = m(x)
    # oracle: the same computation written out with the rows as tokens
    t = m.embed(x[:, 0]) + m.pos
    ref = m.head(m.norm(m.encoder(t).mean(1)))
    torch.testing.assert_close(y, ref)
    # the feed-forward matrices at full TT rank: the same function
    p = tdc.plan(
        m, "tt", ranks=64, include=["encoder.layers.*.linear*"], input_shape=(1, 1, 28, 28)
    )
    assert [lp.name for lp in p.layers] == [
        f"encoder.layers.{k}.linear{j}" for k in (0, 1) for j in (1, 2)
    ]
    c, _ = tdc.decompose(m, p)
    torch.testing.assert_close(c.double().eval()(x), y)
    with pytest.raises(ValueError, match="must be"):
        m(torch.randn(2, 1, 27, 28, dtype=torch.float64))
