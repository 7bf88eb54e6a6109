"""A plain multi-layer perceptron (the demo's model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Flatten, then Linear+ReLU blocks named ``fc1..fcN`` and a classifier ``fc``."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        for arg, v in (("in_features", in_features), ("num_classes", num_classes)):
            if not _positive_int(v):
                raise ValueError(f"mlp: {arg} must be a positive int, got {v!r}")
        if (
            isinstance(hidden, (str, bytes))
            or not isinstance(hidden, Sequence)
            or not all(_positive_int(h) for h in hidden)
        ):
            raise ValueError(f"mlp: hidden must be a sequence of positive ints, got {hidden!r}")
        dims = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.fc(x)


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def mlp(in_features: int = 64, hidden: Sequence[int] = (256, 256), num_classes: int = 10) -> MLP:
    return MLP(in_features, hidden, num_classes)
