"""The one place where a layer weight maps to the tensor a TT/TR format decomposes, and back.

Three layouts (all multi-indices are row-major: ``o = (o_1 * m_2 + o_2) * m_3 + ...`` for
``O = m_1 * ... * m_a``, likewise for the input side):

``"matrix"`` (Linear, Novikov et al. 2015, TT-matrix)
    ``W`` of shape ``(M, N)``, ``M = prod m_k``, ``N = prod n_k`` (same number ``d`` of
    factors on both sides) -> tensor of shape ``(m_1 n_1, ..., m_d n_d)``; the paired index is
    ``m_k``-major: ``T[..., o_k * n_k + i_k, ...] = W[o, i]``. Core ``k`` as a layer parameter
    has shape ``(r_{k-1}, m_k, n_k, r_k)``.

``"channel"`` (Conv2d, channel-factored; the reference code's layout)
    ``W`` of shape ``(O, I, kh, kw)`` -> ``(O, I, kh*kw)`` -> permute ``(O, kh*kw, I)`` ->
    tensor ``(o_1, ..., o_a, kh*kw, i_1, ..., i_b)`` (``kh*kw`` flattened kh-major).
    Parameters: output cores ``(r, o_k, r')``, the kernel core ``(r, kh, kw, r')``, input
    cores ``(r, i_k, r')``.

``"garipov"`` (Conv2d, Garipov et al. 2016)
    ``W`` of shape ``(O, I, kh, kw)`` with ``O = prod o_k``, ``I = prod i_k`` (same number ``d``
    of factors) -> tensor ``(kh*kw, o_1 i_1, ..., o_d i_d)``: the spatial mode first, then
    ``o_k``-major paired channel modes. Parameters: the spatial core ``(r_0, kh, kw, r_1)``,
    then channel cores ``(r_k, o_k, i_k, r_{k+1})``.

Layers and formats both call these functions; nothing else reshapes weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "LAYOUTS",
    "tensor_shape",
    "weight_to_tensor",
    "tensor_to_weight",
    "core_shapes",
    "cores_to_3d",
    "cores_from_3d",
]

#: layout names by layer kind (the first one is the default)
LAYOUTS: dict[str, tuple[str, ...]] = {"linear": ("matrix",), "conv2d": ("channel", "garipov")}


def _check_layout(layout: str) -> None:
    names = [x for kind in LAYOUTS.values() for x in kind]
    if layout not in names:
        raise ValueError(
            f"layout must be {', '.join(map(repr, names[:-1]))} or {names[-1]!r}, got {layout!r}"
        )


def tensor_shape(
    layout: str,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    kernel_size: Sequence[int] = (1, 1),
) -> tuple[int, ...]:
    """Shape of the tensor a weight maps to under ``layout``."""
    _check_layout(layout)
    of, inf = tuple(out_factors), tuple(in_factors)
    s = int(kernel_size[0]) * int(kernel_size[1])
    if layout == "matrix":
        return tuple(m * n for m, n in zip(of, inf, strict=True))
    if layout == "channel":
        return (*of, s, *inf)
    return (s, *(m * n for m, n in zip(of, inf, strict=True)))


def weight_to_tensor(
    weight: torch.Tensor, layout: str, out_factors: Sequence[int], in_factors: Sequence[int]
) -> torch.Tensor:
    """The layout tensor of ``weight`` (Linear ``(M, N)`` or Conv2d ``(O, I, kh, kw)``)."""
    _check_layout(layout)
    of, inf = tuple(out_factors), tuple(in_factors)
    if layout == "matrix":
        d = len(of)
        t = weight.reshape(*of, *inf)
        perm = [p for k in range(d) for p in (k, d + k)]
        return t.permute(perm).reshape(tensor_shape(layout, of, inf))
    o, i, kh, kw = weight.shape
    if layout == "channel":
        return weight.reshape(o, i, kh * kw).permute(0, 2, 1).reshape(*of, kh * kw, *inf)
    d = len(of)
    t = weight.reshape(*of, *inf, kh * kw)
    perm = [2 * d] + [p for k in range(d) for p in (k, d + k)]
    return t.permute(perm).reshape(tensor_shape(layout, of, inf, (kh, kw)))


def tensor_to_weight(
    tensor: torch.Tensor,
    layout: str,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    kernel_size: Sequence[int] = (1, 1),
) -> torch.Tensor:
    """Inverse of :func:`weight_to_tensor` (differentiable)."""
    _check_layout(layout)
    of, inf = tuple(out_factors), tuple(in_factors)
    O, I = math.prod(of), math.prod(inf)
    kh, kw = int(kernel_size[0]), int(kernel_size[1])
    if layout == "matrix":
        d = len(of)
        t = tensor.reshape([x for k in range(d) for x in (of[k], inf[k])])
        perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
        return t.permute(perm).reshape(O, I)
    if layout == "channel":
        return tensor.reshape(O, kh * kw, I).permute(0, 2, 1).reshape(O, I, kh, kw)
    d = len(of)
    t = tensor.reshape([kh * kw] + [x for k in range(d) for x in (of[k], inf[k])])
    perm = [1 + 2 * k for k in range(d)] + [2 + 2 * k for k in range(d)] + [0]
    return t.permute(perm).reshape(O, I, kh, kw)


def core_shapes(
    layout: str,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    kernel_size: Sequence[int],
    ranks: Sequence[int],
) -> list[tuple[int, ...]]:
    """Parameter shapes of the cores; ``ranks`` has d+1 entries ``[r_0, ..., r_d]``
    (``r_d = r_0``; 1 for a tensor train) for the ``d`` modes of the layout tensor."""
    _check_layout(layout)
    of, inf = tuple(out_factors), tuple(in_factors)
    kh, kw = int(kernel_size[0]), int(kernel_size[1])
    r = list(ranks)
    if layout == "matrix":
        return [(r[k], of[k], inf[k], r[k + 1]) for k in range(len(of))]
    if layout == "channel":
        a = len(of)
        out = [(r[k], of[k], r[k + 1]) for k in range(a)]
        out.append((r[a], kh, kw, r[a + 1]))
        out += [(r[a + 1 + k], inf[k], r[a + 2 + k]) for k in range(len(inf))]
        return out
    return [(r[0], kh, kw, r[1])] + [(r[k + 1], of[k], inf[k], r[k + 2]) for k in range(len(of))]


def cores_to_3d(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Parameter-shaped cores as 3-d cores ``(r, n, r')`` of the layout tensor (paired or
    spatial modes merged, first index major), as :mod:`tdcompress.tensor` uses them."""
    return [c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores]


def cores_from_3d(
    cores: Sequence[torch.Tensor],
    layout: str,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    kernel_size: Sequence[int] = (1, 1),
) -> list[torch.Tensor]:
    """3-d cores of the layout tensor reshaped to the layer's parameter shapes."""
    ranks = [c.shape[0] for c in cores] + [cores[-1].shape[2]]
    shapes = core_shapes(layout, out_factors, in_factors, kernel_size, ranks)
    if len(shapes) != len(cores):
        raise ValueError(f"expected {len(shapes)} cores for layout {layout!r}, got {len(cores)}")
    return [c.reshape(s) for c, s in zip(cores, shapes)]
