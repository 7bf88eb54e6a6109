"""Tensor-ring format (``"tr"``): the layouts of the ``"tt"`` format as a ring.

Same layouts, factor rules and automatic shapes as :mod:`tdcompress.formats.tt`. ``ranks``
are the ``d`` ring ranks ``[r_0, r_1, ..., r_{d-1}]`` of the layout tensor's ``d`` modes,
``r_0`` being the closing bond (between the last and the first core), as in
:func:`tdcompress.tensor.tr_svd`; one int means every bond. Requested ranks are clipped as
TR-SVD clips them (:func:`tdcompress.tensor.tr_clip_ranks`).
"""

from __future__ import annotations

import torch

from tdcompress.formats.base import FactorSpec, LayerGeometry, register_format
from tdcompress.formats.tt import RingFormatBase
from tdcompress.tensor import tr_clip_ranks, tr_project, tr_svd

__all__ = ["TRFormat"]


class TRFormat(RingFormatBase):
    """Tensor ring (see the module docstring for the rank convention)."""

    name = "tr"

    def n_ranks(self, n_modes: int) -> int:
        return n_modes

    def clip(self, shape: tuple[int, ...], ranks: list[int]) -> tuple[int, ...]:
        return tuple(tr_clip_ranks(shape, ranks))

    def _to_tensor_svd(self, t: torch.Tensor, ranks: tuple[int, ...]) -> list[torch.Tensor]:
        return tr_svd(t, list(ranks))

    def _project_tensor(self, t: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        return tr_project(t, list(ranks))

    def max_ranks(self, geometry: LayerGeometry, spec: FactorSpec) -> tuple[int, ...]:
        """Entry 0: the largest closing rank ``min(n_1, n_2 ... n_d)``; entries 1..d-1: the
        largest ranks TR-SVD can give those bonds with the spec's closing rank ``r_0``."""
        shape = self._tensor_shape(geometry, spec)
        big = max(shape) ** len(shape)
        r0_max = tr_clip_ranks(shape, [big] * len(shape))[0]
        rest = tr_clip_ranks(shape, [spec.ranks[0]] + [big] * (len(shape) - 1))
        return (r0_max, *rest[1:])


register_format(TRFormat())
