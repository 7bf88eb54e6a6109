"""LeNet-5, the Caffe variant used in the TT literature (431,080 parameters on 1x28x28)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """conv 20 5x5, max-pool 2, conv 50 5x5, max-pool 2, fc 500, ReLU, fc ``num_classes``.

    ``init="pytorch"`` (default) keeps PyTorch's layer defaults, with which the recorded
    results were obtained; ``init="caffe"`` is Caffe's ``lenet_train_test.prototxt``:
    "xavier" weights (uniform in +-sqrt(3 / fan_in)) and zero biases (it needs a smaller
    learning rate: 0.05 with momentum 0.9 diverges without ReLUs between the convs).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        init: str = "pytorch",
    ) -> None:
        super().__init__()
        for arg, v, lo in (
            ("num_classes", num_classes, 1),
            ("in_channels", in_channels, 1),
            ("image_size", image_size, 16),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"LeNet5: {arg} must be an int >= {lo}, got {v!r}")
        if init not in ("pytorch", "caffe"):
            raise ValueError(f"LeNet5: init must be 'pytorch' or 'caffe', got {init!r}")
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)
        for m in (self.conv1, self.conv2, self.fc1, self.fc2) if init == "caffe" else ():
            fan_in = m.weight[0].numel()
            nn.init.uniform_(m.weight, -((3 / fan_in) ** 0.5), (3 / fan_in) ** 0.5)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def lenet5(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 28, init: str = "pytorch"
) -> LeNet5:
    return LeNet5(num_classes, in_channels, image_size, init)
