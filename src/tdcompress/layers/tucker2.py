"""Tucker-2 convolution (format ``"tucker2"``): 1x1 ``I -> r_in``, ``kh x kw``
``r_in -> r_out`` (stride, padding, dilation), 1x1 ``r_out -> O`` (bias). The forward picks
the cheapest plan for the actual input shape (factored, U_in or U_out folded into the
kernel, or reconstruct-then-conv; :func:`tdcompress.formats.tucker2.tucker2_plans`) and
caches the choice per shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

import tdcompress.formats.tucker2  # noqa: F401  (registers the "tucker2" format)
from tdcompress.formats.base import FactorSpec, LayerGeometry
from tdcompress.formats.tucker2 import reconstruct_order, tucker2_plans
from tdcompress.layers._base import FactorizedLayer, batch_key, run_chosen
from tdcompress.layers.lowrank import (
    SmallFactorizedLayer,
    _conv_repr,
    conv_geometry,
    pointwise,
    training_nhwc,
)
from tdcompress.layers.registry import register_layer

__all__ = ["Tucker2Conv2d"]


def _merge_in(core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """core (ro, ri, kh, kw) x_1 U_in (I, ri) -> (ro, I, kh, kw)."""
    ro, ri, kh, kw = core.shape
    t = (core.permute(0, 2, 3, 1).reshape(-1, ri) @ u_in.t()).reshape(ro, kh, kw, -1)
    # contiguous: a channels_last-strided weight would make the conv output channels_last
    return t.permute(0, 3, 1, 2).contiguous()


def _merge_out(core: torch.Tensor, u_out: torch.Tensor) -> torch.Tensor:
    """core (ro, ri, kh, kw) x_0 U_out (O, ro) -> (O, ri, kh, kw)."""
    ro = core.shape[0]
    return (u_out @ core.reshape(ro, -1)).reshape(u_out.shape[0], *core.shape[1:])


@register_layer
class Tucker2Conv2d(SmallFactorizedLayer):
    """Conv2d with a Tucker-2 kernel ``core x_0 U_out x_1 U_in``.

    ``ranks``: ``(r_out, r_in)`` or one int for both; clipped to the feasible multilinear
    ranks. ``groups`` must be 1. Parameters: ``cores = [U_out (O, r_out),
    core (r_out, r_in, kh, kw), U_in (I, r_in)]`` and ``bias``.
    """

    format_name = "tucker2"
    kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: int | Sequence[int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        g = conv_geometry(
            name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        spec = self._format().resolve(
            g, ranks if isinstance(ranks, int) else tuple(ranks), layer_name=name
        )
        ro, ri = spec.ranks
        shapes = [(out_channels, ro), (ro, ri, *g.kernel_size), (in_channels, ri)]
        self._setup_factors(g, spec, shapes, device, dtype)

    @classmethod
    def _from_spec(
        cls, geometry: LayerGeometry, spec: FactorSpec, device: Any = None, dtype: Any = None
    ) -> FactorizedLayer:
        g = geometry
        layer = cls(
            g.in_features,
            g.out_features,
            g.kernel_size,
            tuple(spec.ranks),
            stride=g.stride,
            padding=g.padding,
            dilation=g.dilation,
            groups=g.groups,
            bias=g.bias,
            device=device,
            dtype=dtype,
        )
        layer.spec = spec  # keep the spec's options (n_iter)
        return layer

    in_channels = property(lambda self: self.geometry.in_features)
    out_channels = property(lambda self: self.geometry.out_features)
    kernel_size = property(lambda self: self.geometry.kernel_size)
    stride = property(lambda self: self.geometry.stride)
    padding = property(lambda self: self.geometry.padding)
    dilation = property(lambda self: self.geometry.dilation)

    def to_dense(self) -> torch.Tensor:
        """The ``(O, I, kh, kw)`` kernel (differentiable), in the cheaper order."""
        u_out, core, u_in = self.cores[0], self.cores[1], self.cores[2]
        g = self.geometry
        ro, ri = self.spec.ranks
        k = g.kernel_size[0] * g.kernel_size[1]
        order, _ = reconstruct_order(g.out_features, g.in_features, ro, ri, k)
        if order == "in_first":
            return _merge_out(_merge_in(core, u_in), u_out)
        return _merge_in(_merge_out(core, u_out), u_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if x.dim() != 4 or x.shape[1] != g.in_features:
            raise ValueError(
                f"{type(self).__name__}: input must have shape (N, {g.in_features}, H, W), "
                f"got {tuple(x.shape)}"
            )
        chosen = run_chosen(self, x)
        if chosen is not None:
            return chosen
        n, h, w = batch_key(x.shape[0]), int(x.shape[2]), int(x.shape[3])
        ranks = tuple(self.spec.ranks)
        plan = self._plan((n, h, w), lambda b: tucker2_plans(g, ranks, b, (h, w)))
        conv = {"stride": g.stride, "padding": g.padding, "dilation": g.dilation}
        u_out, core, u_in = self.cores[0], self.cores[1], self.cores[2]
        if plan == "dense":
            return F.conv2d(x, self.to_dense(), self.bias, **conv)
        if plan == "merge_in":
            t = F.conv2d(x, _merge_in(core, u_in), None, **conv)
        else:
            t = pointwise(x, u_in.t())
            if plan == "merge_out":
                return F.conv2d(t, _merge_out(core, u_out), self.bias, **conv)
            if training_nhwc(x):
                t = t.contiguous(memory_format=torch.channels_last)
                return pointwise(F.conv2d(t, core, None, **conv), u_out, self.bias).contiguous()
            t = F.conv2d(t, core, None, **conv)
        return pointwise(t, u_out, self.bias)

    def extra_repr(self) -> str:
        ro, ri = self.spec.ranks
        return _conv_repr(self.geometry, f"ranks=(r_out={ro}, r_in={ri})")
