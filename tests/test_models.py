"""Models: parameter counts of the papers, shapes of the forward pass, names the plan uses."""

from __future__ import annotations

import pytest
import torch

from tdcompress.models import build_model


@pytest.mark.parametrize(
    "name,params,shape",
    [
        ("lenet5", 431_080, (2, 1, 28, 28)),
        ("resnet20", 269_722, (2, 3, 32, 32)),
        ("resnet32", 464_154, (2, 3, 32, 32)),
        ("resnet56", 853_018, (2, 3, 32, 32)),
        ("mlp", 85_002, (2, 64)),
    ],
)
def test_parameter_counts_and_forward(name, params, shape):
    m = build_model(name)
    assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(*shape)).shape == (2, 10)


def test_resnet_option_a_shortcut_is_identity_with_zero_channels():
    m = build_model("resnet20").eval()
    block = m.layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


def test_lenet_names_and_unknown_model():
    names = [n for n, _ in build_model("lenet5").named_children()]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid names are"):
        build_model("vgg")


def test_registry_names_and_argument_errors():
    from tdcompress.models import MODELS

    required = {"lenet5", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "lstm_video"}
    assert required <= set(MODELS)
    with pytest.raises(TypeError, match=r"model 'resnet20': unknown argument\(s\) \['depth'\]"):
        build_model("resnet20", depth=20)
    with pytest.raises(ValueError, match="LeNet5: num_classes must be an int >= 1, got 0"):
        build_model("lenet5", num_classes=0)
    with pytest.raises(ValueError, match="CifarResNet: num_classes must be a positive int"):
        build_model("resnet32", num_classes=-3)
    assert build_model("resnet20", num_classes=100).fc.out_features == 100


def test_lenet_matches_functional_oracle_and_caffe_init():
    torch.manual_seed(0)
    m = build_model("lenet5", init="caffe")
    for layer in (m.conv1, m.conv2, m.fc1, m.fc2):
        fan_in = layer.weight[0].numel()
        bound = (3 / fan_in) ** 0.5
        assert float(layer.weight.detach().abs().max()) <= bound
        assert torch.count_nonzero(layer.bias) == 0
    # uniform(-b, b) has std b / sqrt(3) = sqrt(1 / fan_in); fc1 has 400,000 weights
    torch.testing.assert_close(m.fc1.weight.std().item(), (1 / 800) ** 0.5, rtol=0.01, atol=0)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    m = m.double()
    h = torch.nn.functional.conv2d(x, m.conv1.weight, m.conv1.bias)
    h = h.unfold(2, 2, 2).unfold(3, 2, 2).amax((-1, -2))  # 2x2 max pool, by hand
    h = torch.nn.functional.conv2d(h, m.conv2.weight, m.conv2.bias)
    h = h.unfold(2, 2, 2).unfold(3, 2, 2).amax((-1, -2))
    assert h.shape == (3, 50, 4, 4)
    h = torch.relu(h.reshape(3, 800) @ m.fc1.weight.T + m.fc1.bias)
    torch.testing.assert_close(m(x), h @ m.fc2.weight.T + m.fc2.bias)


def _cifar_oracle(m, x):
    """ResNet-(6n+2) by hand: BN with running stats, option-A shortcut by concatenating zero
    channels on both sides of the strided input."""
    import torch.nn.functional as F

    def bn(layer, h):
        w, b = layer.weight, layer.bias
        mean, var = layer.running_mean, layer.running_var
        scale = w / torch.sqrt(var + layer.eps)
        return h * scale.view(1, -1, 1, 1) + (b - mean * scale).view(1, -1, 1, 1)

    h = torch.relu(bn(m.bn1, F.conv2d(x, m.conv1.weight, padding=1)))
    for stage in (m.layer1, m.layer2, m.layer3):
        for blk in stage:
            stride = blk.conv1.stride[0]
            out = torch.relu(bn(blk.bn1, F.conv2d(h, blk.conv1.weight, stride=stride, padding=1)))
            out = bn(blk.bn2, F.conv2d(out, blk.conv2.weight, padding=1))
            sc = h[:, :, ::stride, ::stride]
            extra = out.shape[1] - sc.shape[1]
            if extra:
                z = sc.new_zeros(sc.shape[0], extra // 2, *sc.shape[2:])
                sc = torch.cat([z, sc, z], 1)
            h = torch.relu(out + sc)
    return h.mean((2, 3)) @ m.fc.weight.T + m.fc.bias


def test_cifar_resnet_matches_functional_oracle_and_he_init():
    torch.manual_seed(0)
    m = build_model("resnet20").double().eval()
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), _cifar_oracle(m, x))
    strides = [b.conv1.stride[0] for s in (m.layer1, m.layer2, m.layer3) for b in s]
    assert strides == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    w = torch.cat([b.conv1.weight.flatten() for b in build_model("resnet56").layer3])
    torch.testing.assert_close(w.std().item(), (2 / (64 * 9)) ** 0.5, rtol=0.03, atol=0)
