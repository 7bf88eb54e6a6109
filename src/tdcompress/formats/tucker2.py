"""Tucker-2 format (``"tucker2"``, Conv2d only): Tucker on the two channel modes of a kernel.

``W (O, I, kh, kw) = core (r_out, r_in, kh, kw) x_0 U_out (O, r_out) x_1 U_in (I, r_in)``;
the forward is a 1x1 convolution ``I -> r_in``, a ``kh x kw`` convolution ``r_in -> r_out``
(carrying stride, padding, dilation), then a 1x1 convolution ``r_out -> O`` (with the bias).

Spec: ``ranks = (r_out, r_in)`` (one int = both), clipped to the feasible multilinear ranks
(``r_out <= min(O, I kh kw, r_in kh kw)``, ``r_in <= min(I, O kh kw, r_out kh kw)``); no
``out_factors``/``in_factors``/``layout``. ``spec.options["n_iter"]``: HOOI sweeps after the
HOSVD (default :data:`DEFAULT_N_ITER`). Factors (what :meth:`decompose` returns and the
layer holds): ``[U_out (O, r_out), core (r_out, r_in, kh, kw), U_in (I, r_in)]``.

Forward plans (:func:`tucker2_plans`, shared with the layer so that MAC counts are what the
forward does): ``"factored"`` (three convs), ``"merge_in"`` (U_in folded into the kernel:
``kh x kw`` conv ``I -> r_out``, then 1x1), ``"merge_out"`` (1x1, then U_out folded into the
kernel: ``kh x kw`` conv ``r_in -> O``) and ``"dense"`` (reconstruct, one conv).
"""

from __future__ import annotations

import torch

from tdcompress.formats.base import FactorSpec, Format, LayerGeometry, register_format
from tdcompress.formats.lowrank import (
    best_plan,
    check_groups,
    check_no_shapes,
    check_ranks,
    spec_option,
)
from tdcompress.tensor import tucker, tucker_project

__all__ = ["Tucker2Format", "tucker2_plans", "DEFAULT_N_ITER"]

#: HOOI sweeps after the HOSVD unless ``spec.options["n_iter"]`` says otherwise
DEFAULT_N_ITER = 2


def reconstruct_order(out_ch: int, in_ch: int, r_out: int, r_in: int, k: int) -> tuple[str, int]:
    """Cheaper order to rebuild the kernel: ``"in_first"`` (core x U_in, then U_out) or
    ``"out_first"``; and its MACs."""
    a = r_out * r_in * k * in_ch + out_ch * r_out * in_ch * k
    b = out_ch * r_out * r_in * k + out_ch * r_in * k * in_ch
    return ("in_first", a) if a <= b else ("out_first", b)


def tucker2_plans(
    geometry: LayerGeometry, ranks: tuple[int, ...], batch: int, input_hw: tuple[int, int]
) -> dict[str, int]:
    """MACs of each forward plan for ``batch`` images of spatial size ``input_hw``."""
    if input_hw is None:
        raise ValueError("input_hw is required to count the MACs of a conv2d layer")
    g = geometry
    O, I = g.out_features, g.in_features
    ro, ri = ranks
    k = g.kernel_size[0] * g.kernel_size[1]
    p = input_hw[0] * input_hw[1]
    ho, wo = g.output_hw(input_hw)
    q = ho * wo
    return {
        "factored": batch * (p * I * ri + q * ro * ri * k + q * O * ro),
        "merge_in": ro * ri * k * I + batch * (q * ro * I * k + q * O * ro),
        "merge_out": O * ro * ri * k + batch * (p * I * ri + q * O * ri * k),
        "dense": reconstruct_order(O, I, ro, ri, k)[1] + batch * q * O * I * k,
    }


def clip_tucker2(geometry: LayerGeometry, r_out: int, r_in: int) -> tuple[int, int]:
    """Largest feasible ``(r_out, r_in)`` not above the request (see module docstring)."""
    O, I = geometry.out_features, geometry.in_features
    k = geometry.kernel_size[0] * geometry.kernel_size[1]
    r_out = min(r_out, O, I * k)
    r_in = min(r_in, I, O * k)
    r_out = min(r_out, r_in * k)
    r_in = min(r_in, r_out * k)
    return r_out, r_in


class Tucker2Format(Format):
    """Tucker-2 on the channel modes of a Conv2d kernel (see the module docstring)."""

    name = "tucker2"
    kinds = ("conv2d",)

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
        ro, ri = check_ranks(ranks, 2, layer_name, self.name, "(r_out, r_in)")
        return FactorSpec(format=self.name, ranks=clip_tucker2(geometry, ro, ri))

    def max_ranks(self, geometry: LayerGeometry, spec: FactorSpec) -> tuple[int, ...]:
        big = geometry.out_features * geometry.in_features
        return clip_tucker2(geometry, big, big)

    @staticmethod
    def _check_weight(weight: torch.Tensor) -> None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 4:
            raise ValueError(
                f"format 'tucker2' needs a Conv2d weight (O, I, kh, kw), got shape "
                f"{tuple(weight.shape)}"
            )

    @staticmethod
    def _n_iter(spec: FactorSpec) -> int:
        return int(spec_option(spec, "n_iter", DEFAULT_N_ITER, {"n_iter": "int >= 0"}))

    def project(self, weight: torch.Tensor, spec: FactorSpec) -> torch.Tensor:
        self._check_weight(weight)
        return tucker_project(weight, tuple(spec.ranks), modes=(0, 1), n_iter=self._n_iter(spec))

    def decompose(self, weight: torch.Tensor, spec: FactorSpec) -> list[torch.Tensor]:
        """``[U_out (O, r_out), core (r_out, r_in, kh, kw), U_in (I, r_in)]``."""
        self._check_weight(weight)
        core, (u_out, u_in) = tucker(
            weight, tuple(spec.ranks), modes=(0, 1), n_iter=self._n_iter(spec)
        )
        return [u_out, core, u_in]

    def num_params(self, geometry: LayerGeometry, spec: FactorSpec) -> int:
        g = geometry
        ro, ri = spec.ranks
        k = g.kernel_size[0] * g.kernel_size[1]
        n = g.out_features * ro + ro * ri * k + g.in_features * ri
        return n + (g.out_features if g.bias else 0)

    def macs(
        self, geometry: LayerGeometry, spec: FactorSpec, input_hw: tuple[int, int] | None = None
    ) -> int:
        if input_hw is None:
            raise ValueError("input_hw is required to count the MACs of a conv2d layer")
        plans = tucker2_plans(geometry, tuple(spec.ranks), 1, input_hw)
        return plans[best_plan(plans)]


register_format(Tucker2Format())
