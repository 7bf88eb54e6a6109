"""Which module class builds each format: the layer side of the format registry.

A factorized layer class registers itself (:func:`register_layer`): under its class name
(what a saved layer's record names, for :func:`tdcompress.load_compressed`) and, when it
declares ``format_name`` and ``kind``, as the module of that format for that kind of layer
(:func:`layer_class`, :func:`build`, :func:`build_initialized`, as surgery uses them). The
formats (:mod:`tdcompress.formats`) know nothing of the layers: imports run
tensor -> formats -> layers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from tdcompress.formats.base import FactorSpec, Format, LayerGeometry, get_format

__all__ = ["register_layer", "layer_class", "layer_classes", "build", "build_initialized"]

T = TypeVar("T", bound=type)

_BY_FORMAT: dict[tuple[str, str], type] = {}
_BY_NAME: dict[str, type] = {}


def register_layer(cls: T) -> T:
    """Register a factorized module class (a class decorator): under its name and, if it
    has ``format_name`` and ``kind`` (a ``FactorizedLayer``), as the module that format
    builds for that kind of layer. A second class for the same name or format and kind is
    refused."""
    name = cls.__name__
    if _BY_NAME.get(name, cls) is not cls:
        raise ValueError(f"a layer class named {name!r} is already registered")
    fmt, kind = getattr(cls, "format_name", None), getattr(cls, "kind", None)
    if fmt is not None and kind is not None:
        have = _BY_FORMAT.get((fmt, kind), cls)
        if have is not cls:
            raise ValueError(
                f"format {fmt!r} already builds {have.__name__} for {kind} layers; "
                f"cannot register {name}"
            )
        _BY_FORMAT[(fmt, kind)] = cls
    _BY_NAME[name] = cls
    return cls


def layer_class(format: str | Format, geometry: LayerGeometry) -> type:
    """The factorized module class ``format`` builds for ``geometry`` (linear or conv)."""
    fmt = get_format(format) if isinstance(format, str) else format
    fmt.check_kind(geometry, f"layer_class({fmt.name!r}) (used by build and build_initialized)")
    try:
        return _BY_FORMAT[(fmt.name, geometry.kind)]
    except KeyError:
        raise ValueError(
            f"no layer class builds format {fmt.name!r} for {geometry.kind} layers: "
            "register one with tdcompress.layers.register_layer"
        ) from None


def layer_classes() -> dict[str, type]:
    """Every registered factorized module class by name."""
    return dict(_BY_NAME)


def build(
    format: str | Format,
    geometry: LayerGeometry,
    factors: list[torch.Tensor],
    spec: FactorSpec,
    bias: torch.Tensor | None = None,
) -> nn.Module:
    """The factorized module of ``format`` holding ``factors`` (and ``bias``); its
    ``to_dense()`` equals ``fmt.project(weight, spec)`` when
    ``factors = fmt.decompose(weight, spec)``."""
    return layer_class(format, geometry).from_factors(geometry, factors, spec, bias)


def build_initialized(
    format: str | Format,
    geometry: LayerGeometry,
    spec: FactorSpec,
    device: Any = None,
    dtype: Any = None,
) -> nn.Module:
    """The factorized module of ``format`` at its random initialisation (no decomposition)."""
    return layer_class(format, geometry)._from_spec(geometry, spec, device=device, dtype=dtype)
