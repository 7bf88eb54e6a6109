"""Tensor-train format (``"tt"``): TT-matrix Linear, channel-factored or Garipov TT Conv2d.

Spec conventions (see :mod:`tdcompress.formats.layouts` for the tensor layouts):

* ``layout``: ``None`` for Linear (the TT-matrix); ``"channel"`` (default) or ``"garipov"``
  for Conv2d.
* ``out_factors``/``in_factors``: the factorization of the output/input features
  (channels). Matrix and Garipov layouts pair them, so both need the same count ``d >= 2``
  (factors of 1 are allowed); the channel layout takes any counts ``a, b >= 1``.
* ``ranks``: one rank per bond of the layout tensor: ``d - 1`` for the matrix layout,
  ``a + b`` for the channel layout, ``d`` for Garipov's (spatial mode + d paired modes).
  Requested ranks are clipped to what TT-SVD can produce (:func:`tt_clip_ranks`).

Automatic shapes (factors not given; if only one side is given the other side gets the
same number of factors where the layout pairs them):

* matrix and Garipov: ``d = clamp(round(log8(max(M, N))), 2, 4)`` factors per side, each
  side ``balanced_factorization(dim, d)`` (so 4096 -> 8x8x8x8, 800 -> 8x10x10, 64 -> 8x8);
* channel: ``ceil(log2(C) / 6)`` factors (clamped to 1..3) for each channel count ``C``
  independently: 1 factor up to 64 channels (the 1x1 / kxk / 1x1 form), 2 up to 4096.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tdcompress.formats import layouts
from tdcompress.formats.base import (
    FactorSpec,
    Format,
    LayerGeometry,
    parse_layer_ranks,
    register_format,
)
from tdcompress.formats.contraction import structure_of
from tdcompress.tensor import (
    balanced_factorization,
    tt_clip_ranks,
    tt_max_ranks,
    tt_project,
    tt_svd,
)

__all__ = ["TTFormat", "RingFormatBase", "auto_pairs", "auto_channel_factors"]


def auto_pairs(out_features: int, in_features: int) -> int:
    """Number of paired factors for the matrix/Garipov layouts (see module docstring)."""
    d = int(math.log(max(out_features, in_features, 2)) / math.log(8) + 0.5)
    return max(2, min(4, d))


def auto_channel_factors(channels: int) -> int:
    """Number of factors of a channel count in the channel layout (module docstring)."""
    return max(1, min(3, math.ceil(math.log2(max(channels, 2)) / 6)))


def _as_ints(v: Any, name: str, layer_name: str) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v,)
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if not isinstance(v, Sequence) or isinstance(v, str) or len(v) == 0:
        raise TypeError(
            f"{layer_name}: {name} must be a non-empty sequence of positive ints, got {v!r}"
        )
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{layer_name}: {name} must contain positive ints, got {list(v)!r}")
        out.append(int(x))
    return tuple(out)


class RingFormatBase(Format):
    """Shared logic of the TT and TR formats (same layouts, different rank conventions)."""

    kinds = ("linear", "conv2d")

    # ---- rank conventions (overridden by TR) -----------------------------------------
    def n_ranks(self, n_modes: int) -> int:
        return n_modes - 1

    def clip(self, shape: tuple[int, ...], ranks: list[int]) -> tuple[int, ...]:
        return tuple(tt_clip_ranks(shape, ranks))

    def _to_tensor_svd(self, t: torch.Tensor, ranks: tuple[int, ...]) -> list[torch.Tensor]:
        return tt_svd(t, list(ranks))

    def _project_tensor(self, t: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        return tt_project(t, list(ranks))

    # ---- spec ------------------------------------------------------------------------
    def resolve(
        self,
        geometry: LayerGeometry,
        ranks: int | tuple[int, ...] | list[int],
        *,
        out_factors: tuple[int, ...] | None = None,
        in_factors: tuple[int, ...] | None = None,
        layout: str | None = None,
        layer_name: str = "layer",
    ) -> FactorSpec:
        self.check_kind(geometry, layer_name)
        g = geometry
        allowed = layouts.LAYOUTS[g.kind]
        if g.kind == "linear":
            if layout not in (None, "matrix"):
                raise ValueError(
                    f"{layer_name}: layout {layout!r} is not available for a linear layer in "
                    f"format {self.name!r}; allowed: None or 'matrix'"
                )
        else:
            if g.groups != 1:
                raise ValueError(
                    f"{layer_name}: format {self.name!r} needs groups=1, got groups={g.groups}; "
                    "grouped and depthwise convolutions are not supported"
                )
            layout = allowed[0] if layout is None else layout
            if layout not in allowed:
                raise ValueError(
                    f"{layer_name}: layout {layout!r} is not available for a conv2d layer in "
                    f"format {self.name!r}; allowed: {list(allowed)}"
                )
        eff_layout = "matrix" if g.kind == "linear" else layout
        of = None if out_factors is None else _as_ints(out_factors, "out_factors", layer_name)
        inf = None if in_factors is None else _as_ints(in_factors, "in_factors", layer_name)
        paired = eff_layout in ("matrix", "garipov")
        if paired:
            if of is None and inf is None:
                d = auto_pairs(g.out_features, g.in_features)
            else:
                d = len(of if of is not None else inf)  # type: ignore[arg-type]
            if d < 2 and eff_layout == "matrix":
                raise ValueError(
                    f"{layer_name}: the TT-matrix layout needs at least 2 factors per side, "
                    f"got out_factors={of}, in_factors={inf}"
                )
            of = of if of is not None else balanced_factorization(g.out_features, d)
            inf = inf if inf is not None else balanced_factorization(g.in_features, d)
            if len(of) != len(inf):
                raise ValueError(
                    f"{layer_name}: layout {eff_layout!r} pairs output and input factors, so "
                    f"out_factors {of} and in_factors {inf} must have the same length"
                )
        else:
            of = (
                of
                if of is not None
                else balanced_factorization(g.out_features, auto_channel_factors(g.out_features))
            )
            inf = (
                inf
                if inf is not None
                else balanced_factorization(g.in_features, auto_channel_factors(g.in_features))
            )
        for nm, f, dim, what in (
            ("out_factors", of, g.out_features, "out_features"),
            ("in_factors", inf, g.in_features, "in_features"),
        ):
            if math.prod(f) != dim:
                raise ValueError(
                    f"{layer_name}: {nm} {tuple(f)} multiply to {math.prod(f)}, but "
                    f"{what} is {dim}; give positive ints whose product is {dim}"
                )
        shape = layouts.tensor_shape(eff_layout, of, inf, g.kernel_size)
        n = self.n_ranks(len(shape))
        r = self._check_ranks(ranks, n, layer_name, eff_layout)
        return FactorSpec(
            format=self.name,
            ranks=self.clip(shape, r),
            out_factors=tuple(of),
            in_factors=tuple(inf),
            layout=None if g.kind == "linear" else layout,
        )

    def _check_ranks(self, ranks: Any, n: int, layer_name: str, layout: str) -> list[int]:
        hint = (
            f"format {self.name!r} with layout {layout!r} has {n} bonds here; give one int "
            f"or {n} ints"
        )
        return parse_layer_ranks(ranks, n, layer_name, hint)

    @staticmethod
    def _layout(spec: FactorSpec) -> str:
        return spec.layout or "matrix"

    def _tensor_shape(self, geometry: LayerGeometry, spec: FactorSpec) -> tuple[int, ...]:
        assert spec.out_factors is not None and spec.in_factors is not None
        return layouts.tensor_shape(
            self._layout(spec), spec.out_factors, spec.in_factors, geometry.kernel_size
        )

    def max_ranks(self, geometry: LayerGeometry, spec: FactorSpec) -> tuple[int, ...]:
        return tuple(tt_max_ranks(self._tensor_shape(geometry, spec)))

    # ---- weights ---------------------------------------------------------------------
    def _weight_tensor(self, weight: torch.Tensor, spec: FactorSpec) -> torch.Tensor:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        layout = self._layout(spec)
        of, inf = spec.out_factors, spec.in_factors
        if of is None or inf is None:
            raise ValueError("spec must be resolved (out_factors and in_factors set)")
        want_dim = 2 if layout == "matrix" else 4
        if (
            weight.dim() != want_dim
            or weight.shape[0] != math.prod(of)
            or (
                weight.shape[1] != math.prod(inf)  # type: ignore[arg-type]
            )
        ):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not match the spec: expected "
                f"{want_dim} dims with ({math.prod(of)}, {math.prod(inf)}, ...) "  # type: ignore[arg-type]
                f"for layout {layout!r}"
            )
        return layouts.weight_to_tensor(weight, layout, of, inf)  # type: ignore[arg-type]

    def project(self, weight: torch.Tensor, spec: FactorSpec) -> torch.Tensor:
        t = self._weight_tensor(weight, spec)
        p = self._project_tensor(t, tuple(spec.ranks))
        return layouts.tensor_to_weight(
            p,
            self._layout(spec),
            spec.out_factors,
            spec.in_factors,  # type: ignore[arg-type]
            tuple(weight.shape[2:]) or (1, 1),
        )

    def decompose(self, weight: torch.Tensor, spec: FactorSpec) -> list[torch.Tensor]:
        """Parameter-shaped cores (see :func:`layouts.core_shapes`) of ``weight``."""
        t = self._weight_tensor(weight, spec)
        cores = self._to_tensor_svd(t, tuple(spec.ranks))
        return layouts.cores_from_3d(
            cores,
            self._layout(spec),
            spec.out_factors,
            spec.in_factors,  # type: ignore[arg-type]
            tuple(weight.shape[2:]) or (1, 1),
        )

    def num_params(self, geometry: LayerGeometry, spec: FactorSpec) -> int:
        st = structure_of(geometry, spec)
        return st.num_core_params + (geometry.out_features if geometry.bias else 0)

    def macs(
        self, geometry: LayerGeometry, spec: FactorSpec, input_hw: tuple[int, int] | None = None
    ) -> int:
        return structure_of(geometry, spec).count_macs(geometry, input_hw, batch=1)


class TTFormat(RingFormatBase):
    """Tensor train (see the module docstring for the spec conventions)."""

    name = "tt"


register_format(TTFormat())
