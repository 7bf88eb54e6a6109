"""Tensor-ring layers :class:`TRLinear` and :class:`TRConv2d` (same layouts as the TT
layers; ``ranks`` are the d ring ranks ``[r_0, ..., r_{d-1}]``, see
:mod:`tdcompress.formats.tr`)."""

from __future__ import annotations

import tdcompress.formats.tr  # noqa: F401  (registers the "tr" format)
from tdcompress.layers.registry import register_layer
from tdcompress.layers.tt import RingConv2dBase, RingLinearBase

__all__ = ["TRLinear", "TRConv2d"]


@register_layer
class TRLinear(RingLinearBase):
    """Linear layer with a tensor-ring matrix weight (cores ``(r_k, m_k, n_k, r_{k+1})``)."""

    format_name = "tr"


@register_layer
class TRConv2d(RingConv2dBase):
    """Conv2d with a tensor-ring kernel, layout ``"channel"`` (default) or ``"garipov"``."""

    format_name = "tr"
