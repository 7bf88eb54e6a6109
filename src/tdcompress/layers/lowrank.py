"""Low-rank layers (format ``"svd"``): :class:`LowRankLinear` (``N -> r -> M``) and
:class:`LowRankConv2d` (``kh x kw`` conv ``I -> r``, then 1x1 ``r -> O``). The forward picks
the cheaper of the factored and the reconstruct-then-dense plan for the actual input shape
(:func:`tdcompress.formats.lowrank.lowrank_plans`) and caches the choice per shape."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tdcompress.formats.lowrank  # noqa: F401  (registers the "svd" format)
from tdcompress.formats.base import FactorSpec, LayerGeometry
from tdcompress.formats.lowrank import best_plan, lowrank_plans
from tdcompress.layers._base import (
    FactorizedLayer,
    batch_key,
    cache_plan,
    init_skipped,
    is_channels_last,
    planned_batch,
    run_chosen,
)
from tdcompress.layers.registry import register_layer

__all__ = [
    "LowRankLinear",
    "LowRankConv2d",
    "SmallFactorizedLayer",
    "conv_geometry",
    "pointwise",
    "training_nhwc",
]


def conv_geometry(
    layer_name: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    groups: int,
    bias: bool,
) -> LayerGeometry:
    """A validated conv geometry; errors name ``layer_name``."""
    try:
        g = LayerGeometry(
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
    except (TypeError, ValueError) as e:  # (LayerGeometry checks types and ranges)
        raise ValueError(f"{layer_name}: {e}") from None
    return g


class SmallFactorizedLayer(FactorizedLayer):
    """Base of the low-rank and Tucker-2 layers: the factors live in ``self.cores`` (in the
    order :meth:`Format.decompose` returns them), so ``from_dense``/``from_factors`` of
    :class:`FactorizedLayer` apply unchanged."""

    def _setup_factors(
        self,
        geometry: LayerGeometry,
        spec: FactorSpec,
        shapes: Sequence[tuple[int, ...]],
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.geometry = geometry
        self.spec = spec
        self._plans: dict[tuple[int, ...], str] = {}
        self._execution = {}
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList([nn.Parameter(torch.empty(s, **kw)) for s in shapes])
        if geometry.bias:
            self.bias = nn.Parameter(torch.empty(geometry.out_features, **kw))
        else:
            self.register_parameter("bias", None)
        if not init_skipped():
            self.reset_parameters()

    def _n_terms(self) -> int:
        """Number of products summed into one weight entry (the bond sizes)."""
        return math.prod(self.spec.ranks)

    def reset_parameters(self) -> None:
        """Random factors whose product has the variance of PyTorch's default dense init,
        ``1 / (3 fan_in)``; bias uniform in ``+-1/sqrt(fan_in)``."""
        g = self.geometry
        fan_in = g.in_features * g.kernel_size[0] * g.kernel_size[1]
        d = len(self.cores)
        std = (1.0 / (3.0 * fan_in * self._n_terms())) ** (0.5 / d)
        with torch.no_grad():
            for c in self.cores:
                c.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    def _plan(self, key: tuple[int, ...], plans: Any) -> str:
        """The cached plan for ``key`` (batch first); ``plans(batch)`` gives the MACs of
        each plan for ``batch`` samples."""
        plan = self._plans.get(key)
        if plan is None:
            plan = cache_plan(
                self._plans, key, lambda: best_plan(plans(planned_batch(self._plans, key)))
            )
        return plan

    def _shape_repr(self) -> str:
        return f"ranks={tuple(self.spec.ranks)}"


@register_layer
class LowRankLinear(SmallFactorizedLayer):
    """Linear layer ``y = A (B x) + b`` with ``A (M, r)``, ``B (r, N)`` (format ``"svd"``).

    ``rank`` is clipped to ``min(in_features, out_features)``.
    """

    format_name = "svd"
    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | Sequence[int],
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        try:
            geometry = LayerGeometry.linear(in_features, out_features, bias=bool(bias))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None
        spec = self._format().resolve(geometry, rank, layer_name=name)  # type: ignore[arg-type]
        r = spec.ranks[0]
        self._setup_factors(geometry, spec, [(out_features, r), (r, in_features)], device, dtype)

    @classmethod
    def _from_spec(
        cls, geometry: LayerGeometry, spec: FactorSpec, device: Any = None, dtype: Any = None
    ) -> FactorizedLayer:
        layer = cls(
            geometry.in_features,
            geometry.out_features,
            spec.ranks[0],
            bias=geometry.bias,
            device=device,
            dtype=dtype,
        )
        layer.spec = spec  # keep the spec's options
        return layer

    @property
    def in_features(self) -> int:
        return self.geometry.in_features

    @property
    def out_features(self) -> int:
        return self.geometry.out_features

    @property
    def rank(self) -> int:
        return self.spec.ranks[0]

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``A @ B`` (differentiable)."""
        return self.cores[0] @ self.cores[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if x.dim() < 1 or x.shape[-1] != g.in_features:
            raise ValueError(
                f"{type(self).__name__}: input must have last dimension {g.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        chosen = run_chosen(self, x)
        if chosen is not None:
            return chosen
        rows = batch_key(math.prod(x.shape[:-1]))
        plan = self._plan((rows,), lambda b: lowrank_plans(g, self.rank, b))
        A, B = self.cores[0], self.cores[1]
        if plan == "dense":
            return F.linear(x, A @ B, self.bias)
        return F.linear(F.linear(x, B), A, self.bias)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"in_features={g.in_features}, out_features={g.out_features}, rank={self.rank}, "
            f"bias={g.bias}"
        )


@register_layer
class LowRankConv2d(SmallFactorizedLayer):
    """Conv2d whose kernel, read as an ``(O, I*kh*kw)`` matrix, has rank ``r``: a
    ``kh x kw`` conv ``I -> r`` (stride, padding, dilation) then a 1x1 conv ``r -> O``
    (with the bias). ``rank`` is clipped to ``min(O, I*kh*kw)``; ``groups`` must be 1."""

    format_name = "svd"
    kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int | Sequence[int],
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
        spec = self._format().resolve(g, rank, layer_name=name)  # type: ignore[arg-type]
        r = spec.ranks[0]
        shapes = [(out_channels, r), (r, in_channels, *g.kernel_size)]
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
            spec.ranks[0],
            stride=g.stride,
            padding=g.padding,
            dilation=g.dilation,
            groups=g.groups,
            bias=g.bias,
            device=device,
            dtype=dtype,
        )
        layer.spec = spec  # keep the spec's options
        return layer

    in_channels = property(lambda self: self.geometry.in_features)
    out_channels = property(lambda self: self.geometry.out_features)
    kernel_size = property(lambda self: self.geometry.kernel_size)
    stride = property(lambda self: self.geometry.stride)
    padding = property(lambda self: self.geometry.padding)
    dilation = property(lambda self: self.geometry.dilation)

    @property
    def rank(self) -> int:
        return self.spec.ranks[0]

    def to_dense(self) -> torch.Tensor:
        """The ``(O, I, kh, kw)`` kernel (differentiable)."""
        A, B = self.cores[0], self.cores[1]
        return (A @ B.reshape(B.shape[0], -1)).reshape(A.shape[0], *B.shape[1:])

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
        plan = self._plan((n, h, w), lambda b: lowrank_plans(g, self.rank, b, (h, w)))
        conv = {"stride": g.stride, "padding": g.padding, "dilation": g.dilation}
        if plan == "dense":
            return F.conv2d(x, self.to_dense(), self.bias, **conv)
        A, B = self.cores[0], self.cores[1]
        # (no NHWC switch when training, unlike Tucker-2: this conv reads all I input
        # channels, and converting the input cost as much as it saved, measured)
        return pointwise(F.conv2d(x, B, None, **conv), A, self.bias)

    def extra_repr(self) -> str:
        return _conv_repr(self.geometry, f"rank={self.rank}")


def training_nhwc(x: torch.Tensor) -> bool:
    """Whether to run the rank-space kxk conv (few channels in and out) of an NCHW batch
    in NHWC: oneDNN's backward of such convs is faster there (Tucker-2 on ResNet-20 shapes,
    fwd+bwd up to ~1.7x on a noisy shared machine); the forward alone gains nothing, and
    traced graphs stay plain."""
    return (
        torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and batch_key(x.shape[0]) != 1
        and x.is_contiguous()
    )


def pointwise(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution of ``x`` (N, C, H, W) with the matrix ``w`` (O, C), as one matrix
    product: ATen runs 1x1 convs with few channels on NCHW inputs through a path 10-20x
    slower than a GEMM. A channels_last input stays channels_last."""
    n, c, h, wd = x.shape  # (n is symbolic under a dynamic-batch export: reshapes use -1)
    o = w.shape[0]
    if is_channels_last(x):
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        y = rows @ w.t() if bias is None else torch.addmm(bias, rows, w.t())
        return y.reshape(-1, h, wd, o).permute(0, 3, 1, 2)
    if not isinstance(n, torch.SymInt) and n == 1:
        # (a reshape, not a select of the batch index: cheaper backward)
        xm = x.reshape(c, h * wd)
        y = w @ xm if bias is None else torch.addmm(bias[:, None], w, xm)
        return y.reshape(1, o, h, wd)
    xm = x.reshape(-1, c, h * wd)
    # bmm against the stride-0 expanded weight: no copy of x or of the result (torch.matmul
    # would transpose both, and hand the next conv a strided tensor it runs slowly)
    y = torch.bmm(w.expand(n, o, c), xm).reshape(-1, o, h, wd)
    # in place: no extra activation-sized tensor, and the result keeps the product's dtype
    # (under autocast a float32 bias would otherwise promote a bf16/fp16 output to float32)
    return y if bias is None else y.add_(bias.reshape(1, o, 1, 1))


def _conv_repr(g: LayerGeometry, ranks: str) -> str:
    s = f"{g.in_features}, {g.out_features}, kernel_size={g.kernel_size}, stride={g.stride}"
    if g.padding != (0, 0):
        s += f", padding={g.padding}"
    if g.dilation != (1, 1):
        s += f", dilation={g.dilation}"
    return f"{s}, {ranks}, bias={g.bias}"
