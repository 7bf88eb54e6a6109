"""Models of the paper's experiments, and a registry: ``build_model(name, **kwargs)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from tdcompress.models.lenet import LeNet5, lenet5
from tdcompress.models.lstm_video import (
    LSTMClassifier,
    LSTMVideoClassifier,
    lstm_speech,
    lstm_video,
)
from tdcompress.models.mlp import MLP, mlp
from tdcompress.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from tdcompress.models.resnet_imagenet import ImageNetResNet, resnet18, resnet34
from tdcompress.models.transformer import RowTransformer, row_transformer

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
    "ImageNetResNet",
    "resnet18",
    "resnet34",
    "LSTMClassifier",
    "LSTMVideoClassifier",
    "lstm_video",
    "lstm_speech",
    "RowTransformer",
    "row_transformer",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "lstm_video": lstm_video,
    "lstm_speech": lstm_speech,
    "row_transformer": row_transformer,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """The model registered as ``name`` (see ``MODELS``) built with ``kwargs``."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {sorted(MODELS)}")
    factory = MODELS[name]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"model {name!r}: unknown argument(s) {unknown}; valid arguments are {list(params)}"
        )
    return factory(**kwargs)
