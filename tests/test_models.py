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
