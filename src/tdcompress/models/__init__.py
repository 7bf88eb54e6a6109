"""Models of the paper's experiments, and a registry: ``build_model(name, **kwargs)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tdcompress.models.lenet import LeNet5, lenet5
from tdcompress.models.mlp import MLP, mlp
from tdcompress.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet56

__all__ = [
    "MODELS",
    "build_model",
    "LeNet5",
    "lenet5",
    "MLP",
    "mlp",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet56",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """The model registered as ``name`` built with ``kwargs``."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names are {sorted(MODELS)}") from None
    return factory(**kwargs)
