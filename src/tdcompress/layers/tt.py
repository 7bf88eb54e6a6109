"""Tensor-train layers: :class:`TTLinear` (TT-matrix) and :class:`TTConv2d` (channel or
Garipov layout). Shapes, ranks and automatic factorizations follow
:mod:`tdcompress.formats.tt`; the forward picks the cheapest contraction order for the
actual input shape (including reconstruct-then-dense-op) and caches it per shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import tdcompress.formats.tt  # noqa: F401  (registers the "tt" format)
from tdcompress.formats.base import FactorSpec, LayerGeometry
from tdcompress.layers._base import FactorizedLayer, conv_forward, linear_forward
from tdcompress.layers.registry import register_layer

__all__ = ["TTLinear", "TTConv2d", "RingLinearBase", "RingConv2dBase"]

Ranks = int | Sequence[int]


class RingLinearBase(FactorizedLayer):
    """A Linear layer whose weight is a TT/TR matrix."""

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: Ranks,
        *,
        out_factors: Sequence[int] | None = None,
        in_factors: Sequence[int] | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        geometry = LayerGeometry.linear(in_features, out_features, bias=bool(bias))
        spec = self._format().resolve(
            geometry,
            ranks if isinstance(ranks, int) else tuple(ranks),
            out_factors=None if out_factors is None else tuple(out_factors),
            in_factors=None if in_factors is None else tuple(in_factors),
            layer_name=type(self).__name__,
        )
        self._setup(geometry, spec, device, dtype)

    @classmethod
    def _from_spec(
        cls, geometry: LayerGeometry, spec: FactorSpec, device: Any = None, dtype: Any = None
    ) -> FactorizedLayer:
        return cls(
            geometry.in_features,
            geometry.out_features,
            spec.ranks,
            out_factors=spec.out_factors,
            in_factors=spec.in_factors,
            bias=geometry.bias,
            device=device,
            dtype=dtype,
        )

    @property
    def in_features(self) -> int:
        return self.geometry.in_features

    @property
    def out_features(self) -> int:
        return self.geometry.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"in_features={g.in_features}, out_features={g.out_features}, "
            f"{self._shape_repr()}, bias={g.bias}"
        )


class RingConv2dBase(FactorizedLayer):
    """A Conv2d layer whose kernel is a TT/TR tensor (layout ``"channel"`` or ``"garipov"``)."""

    kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: Ranks,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        out_factors: Sequence[int] | None = None,
        in_factors: Sequence[int] | None = None,
        layout: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        geometry = LayerGeometry(
            "conv2d",
            out_channels,
            in_channels,
            kernel_size=kernel_size,  # type: ignore[arg-type]
            stride=stride,  # type: ignore[arg-type]
            padding=padding,  # type: ignore[arg-type]
            dilation=dilation,  # type: ignore[arg-type]
            groups=groups,
            bias=bool(bias),
        )
        for nm in ("kernel_size", "stride", "dilation"):
            if min(getattr(geometry, nm)) < 1:
                raise ValueError(
                    f"{type(self).__name__}: {nm} must be >= 1, got {getattr(geometry, nm)}"
                )
        if min(geometry.padding) < 0:
            raise ValueError(f"{type(self).__name__}: padding must be >= 0, got {geometry.padding}")
        spec = self._format().resolve(
            geometry,
            ranks if isinstance(ranks, int) else tuple(ranks),
            out_factors=None if out_factors is None else tuple(out_factors),
            in_factors=None if in_factors is None else tuple(in_factors),
            layout=layout,
            layer_name=type(self).__name__,
        )
        self._setup(geometry, spec, device, dtype)

    @classmethod
    def _from_spec(
        cls, geometry: LayerGeometry, spec: FactorSpec, device: Any = None, dtype: Any = None
    ) -> FactorizedLayer:
        g = geometry
        return cls(
            g.in_features,
            g.out_features,
            g.kernel_size,
            spec.ranks,
            stride=g.stride,
            padding=g.padding,
            dilation=g.dilation,
            groups=g.groups,
            bias=g.bias,
            out_factors=spec.out_factors,
            in_factors=spec.in_factors,
            layout=spec.layout,
            device=device,
            dtype=dtype,
        )

    @property
    def in_channels(self) -> int:
        return self.geometry.in_features

    @property
    def out_channels(self) -> int:
        return self.geometry.out_features

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.geometry.kernel_size

    @property
    def stride(self) -> tuple[int, int]:
        return self.geometry.stride

    @property
    def padding(self) -> tuple[int, int]:
        return self.geometry.padding

    @property
    def dilation(self) -> tuple[int, int]:
        return self.geometry.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x, self.bias)

    def extra_repr(self) -> str:
        g = self.geometry
        s = f"{g.in_features}, {g.out_features}, kernel_size={g.kernel_size}, stride={g.stride}"
        if g.padding != (0, 0):
            s += f", padding={g.padding}"
        if g.dilation != (1, 1):
            s += f", dilation={g.dilation}"
        return f"{s}, {self._shape_repr()}, bias={g.bias}"


@register_layer
class TTLinear(RingLinearBase):
    """Linear layer with a TT-matrix weight (Novikov et al. 2015).

    ``ranks``: one int or the ``d - 1`` bond ranks; clipped to the feasible maximum.
    """

    format_name = "tt"


@register_layer
class TTConv2d(RingConv2dBase):
    """Conv2d with a TT kernel; ``layout="channel"`` (default: 1x1 input-channel mixing,
    one kh x kw conv between ranks, 1x1 output mixing) or ``"garipov"``."""

    format_name = "tt"
