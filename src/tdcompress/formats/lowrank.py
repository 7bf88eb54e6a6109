"""Low-rank format (``"svd"``): a weight as the product of two thin factors.

* Linear ``W (M, N) = A (M, r) @ B (r, N)``: two Linears, ``N -> r -> M``.
* Conv2d ``W (O, I, kh, kw)`` read as the matrix ``(O, I*kh*kw) = A (O, r) @ B (r, I*kh*kw)``:
  a ``kh x kw`` convolution ``I -> r`` (carrying stride, padding, dilation), then a 1x1
  convolution ``r -> O``.

Spec: ``ranks = (r,)`` (one int), clipped to ``min(M, N)`` (``min(O, I*kh*kw)``); no
``out_factors``/``in_factors``/``layout``. Factors (parameter-shaped, what :meth:`decompose`
returns and the layers hold): ``[A (M, r), B (r, N)]`` for Linear, ``[A (O, r),
B (r, I, kh, kw)]`` for Conv2d. ``spec.options["balanced"]`` (default True): the factors
share the singular values evenly (``A = U sqrt(S)``, ``B = sqrt(S) V^T``).

The forward plans (:func:`lowrank_plans`, shared with the layers so MAC counts are what
the forward does): ``"factored"`` (two steps) or ``"dense"`` (reconstruct, one op).
"""

from __future__ import annotations

from typing import Any

import torch

from tdcompress.formats.base import (
    FactorSpec,
    Format,
    LayerGeometry,
    parse_layer_ranks,
    register_format,
)
from tdcompress.tensor import lowrank_project, lowrank_svd

__all__ = [
    "LowRankFormat",
    "lowrank_plans",
    "check_ranks",
    "check_no_shapes",
    "check_groups",
    "spec_option",
]


def check_ranks(ranks: Any, n: int, layer_name: str, fmt_name: str, meaning: str) -> list[int]:
    """``ranks`` as ``n`` ints >= 1 (one int, a 1-sequence or an ``n``-sequence)."""
    hint = f"format {fmt_name!r} takes one int or {n} ints ({meaning})"
    return parse_layer_ranks(ranks, n, layer_name, hint)


def check_no_shapes(
    fmt_name: str,
    layer_name: str,
    out_factors: Any,
    in_factors: Any,
    layout: Any,
) -> None:
    for nm, v in (("out_factors", out_factors), ("in_factors", in_factors), ("layout", layout)):
        if v is not None:
            raise ValueError(
                f"{layer_name}: format {fmt_name!r} takes no {nm}, got {nm}={v!r}; allowed: None"
            )


def check_groups(geometry: LayerGeometry, fmt_name: str, layer_name: str) -> None:
    if geometry.kind == "conv2d" and geometry.groups != 1:
        raise ValueError(
            f"{layer_name}: format {fmt_name!r} needs groups=1, got groups={geometry.groups}; "
            "grouped and depthwise convolutions are not supported"
        )


def spec_option(spec: FactorSpec, name: str, default: Any, allowed: dict[str, str]) -> Any:
    """``spec.options[name]`` (``default`` when absent), validated. ``allowed`` maps every
    option the format knows to a description of its values (``"bool"`` or ``"int >= 0"``);
    an unknown option or a bad value raises ValueError naming the format, option and value."""
    unknown = sorted(set(spec.options) - set(allowed))
    if unknown:
        raise ValueError(
            f"format {spec.format!r}: unknown spec option(s) {unknown}; allowed options: "
            + ", ".join(f"{k} ({v})" for k, v in sorted(allowed.items()))
        )
    v = spec.options.get(name, default)
    kind = allowed[name]
    ok = (
        isinstance(v, bool)
        if kind == "bool"
        else (not isinstance(v, bool) and isinstance(v, int) and v >= 0)
    )
    if not ok:
        raise ValueError(
            f"format {spec.format!r}: spec option {name}={v!r} is not allowed; "
            f"{name} must be {'a bool' if kind == 'bool' else 'an ' + kind}"
        )
    return v


def _k(geometry: LayerGeometry) -> int:
    return geometry.kernel_size[0] * geometry.kernel_size[1]


def lowrank_plans(
    geometry: LayerGeometry, rank: int, batch: int, input_hw: tuple[int, int] | None = None
) -> dict[str, int]:
    """MACs of each forward plan (``"factored"``, ``"dense"``) for ``batch`` samples
    (rows of a Linear input; images of a conv input of spatial size ``input_hw``)."""
    g, r = geometry, rank
    O, I = g.out_features, g.in_features
    if g.kind == "linear":
        return {"factored": batch * r * (I + O), "dense": O * r * I + batch * O * I}
    if input_hw is None:
        raise ValueError("input_hw is required to count the MACs of a conv2d layer")
    ho, wo = g.output_hw(input_hw)
    q, k = ho * wo, _k(g)
    return {
        "factored": batch * q * r * (I * k + O),
        "dense": O * r * I * k + batch * q * O * I * k,
    }


def best_plan(plans: dict[str, int]) -> str:
    """The cheapest plan; ties go to the earliest (factored before dense)."""
    return min(plans, key=lambda name: plans[name])


#: the spec options of format "svd" and their values
_OPTIONS = {"balanced": "bool"}


class LowRankFormat(Format):
    """Low rank ``W = A B`` (see the module docstring)."""

    name = "svd"
    kinds = ("linear", "conv2d")

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
        check_groups(geometry, self.name, layer_name)
        check_no_shapes(self.name, layer_name, out_factors, in_factors, layout)
        (r,) = check_ranks(ranks, 1, layer_name, self.name, "the rank r of W = A B")
        spec = FactorSpec(format=self.name, ranks=(r,))
        return FactorSpec(format=self.name, ranks=(min(r, self.max_ranks(geometry, spec)[0]),))

    def max_ranks(self, geometry: LayerGeometry, spec: FactorSpec) -> tuple[int, ...]:
        return (min(geometry.out_features, geometry.in_features * _k(geometry)),)

    @staticmethod
    def _matrix(weight: torch.Tensor) -> torch.Tensor:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() not in (2, 4):
            raise ValueError(
                f"weight must be a Linear (2-D) or Conv2d (4-D) weight, got shape "
                f"{tuple(weight.shape)}"
            )
        return weight.reshape(weight.shape[0], -1)

    def project(self, weight: torch.Tensor, spec: FactorSpec) -> torch.Tensor:
        spec_option(spec, "balanced", True, _OPTIONS)  # reject unknown/bad options early
        return lowrank_project(self._matrix(weight), spec.ranks[0]).reshape(weight.shape)

    def decompose(self, weight: torch.Tensor, spec: FactorSpec) -> list[torch.Tensor]:
        """``[A (O, r), B (r, I[, kh, kw])]`` with ``A @ B.reshape(r, -1)`` the projection."""
        balanced = spec_option(spec, "balanced", True, _OPTIONS)
        A, B = lowrank_svd(self._matrix(weight), spec.ranks[0], balanced=balanced)
        return [A, B.reshape(B.shape[0], *weight.shape[1:])]

    def num_params(self, geometry: LayerGeometry, spec: FactorSpec) -> int:
        g, r = geometry, spec.ranks[0]
        return r * (g.out_features + g.in_features * _k(g)) + (g.out_features if g.bias else 0)

    def macs(
        self, geometry: LayerGeometry, spec: FactorSpec, input_hw: tuple[int, int] | None = None
    ) -> int:
        plans = lowrank_plans(geometry, spec.ranks[0], 1, input_hw)
        return plans[best_plan(plans)]


register_format(LowRankFormat())
