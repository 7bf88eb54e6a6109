"""Tensor ring: TR-SVD (Zhao et al. 2016), reconstruction and projection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tdcompress.tensor._checks import (
    check_shape,
    check_tensor,
    expand_ranks,
    tensorize,
    working_dtype,
)
from tdcompress.tensor._linalg import check_method, run_with_fallback, truncate
from tdcompress.tensor.tt import _check_cores, tt_sweep

__all__ = ["tr_svd", "tr_to_tensor", "tr_project", "tr_clip_ranks"]


def tr_clip_ranks(shape: Sequence[int], ranks: int | Sequence[int]) -> list[int]:
    """The d ring ranks ``[r_0, r_1, ..., r_{d-1}]`` TR-SVD will use on ``shape``.

    The first unfolding (n_1 x rest) carries ``r_0 * r_1``; if that exceeds its rank bound,
    ``r_0`` is capped at the bound and then ``r_1`` at ``bound // r_0``. Later bonds are
    clipped like TT bonds: ``r_k <= min(r_{k-1} n_k, r_0 prod(n[k+1:]))``.
    """
    shape = check_shape(shape)
    d = len(shape)
    if d < 2:
        raise ValueError(f"a tensor ring needs at least 2 modes, got shape {shape}")
    want = expand_ranks(ranks, d)
    bound = min(shape[0], math.prod(shape[1:]))
    r0 = min(want[0], bound)
    out = [r0, max(1, min(want[1], bound // r0))]
    for k in range(2, d):
        out.append(min(want[k], out[-1] * shape[k - 1], r0 * math.prod(shape[k:])))
    return out


@torch.no_grad()
def tr_svd(
    x: torch.Tensor,
    ranks: int | Sequence[int],
    *,
    method: str = "gram",
    shape: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """TR-SVD of ``x``: cores ``G_k`` of shape (r_k, n_k, r_{k+1}) with r_d = r_0.

    ``ranks``: one int or d ints ``[r_0, ..., r_{d-1}]`` (``r_0`` closes the ring), clipped
    as in :func:`tr_clip_ranks`. The first unfolding is truncated to ``r_0 * r_1``, its
    left factor split into the first core; the rest is a TT sweep carrying ``r_0``.
    Runs under ``no_grad``; ``x`` is never modified.
    """
    x = tensorize(check_tensor(x, "x"), shape)
    check_method(method)
    shape = tuple(x.shape)
    r = tr_clip_ranks(shape, ranks)
    xw = x.to(working_dtype(x))

    def run(meth: str) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        Q, rest, flag, _ = truncate(
            xw.reshape(shape[0], -1), r[0] * r[1], meth, singular_vectors=True
        )
        # TR-SVD depends on the signs of these vectors (the split into r0 x r1 mixes
        # them into later unfoldings): fix them so every method and device agrees.
        sign = torch.sign(Q.gather(0, Q.abs().argmax(0, keepdim=True)))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        Q, rest = Q * sign, rest * sign.mT
        first = Q.reshape(shape[0], r[0], r[1]).permute(1, 0, 2)
        # rest: (r0 * r1, n_2..n_d) -> (r1, n_2..n_d, r0)
        rest = rest.reshape(r[0], r[1], -1).permute(1, 2, 0)
        cores, flags = tt_sweep(rest, shape[1:], r[1], r[0], r[2:], meth, None)
        return [first.contiguous(), *cores], [flag, *flags]

    cores = run_with_fallback(run, method, xw.numel())
    return [c.to(x.dtype) for c in cores]


def tr_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor of tensor-ring cores (trace of the core product); differentiable."""
    _check_cores(cores, ring=True)
    shape = [c.shape[1] for c in cores]
    r0 = cores[0].shape[0]
    # out: (r0, n_1 ... n_k, r_k), contracted left to right, then the ring is closed
    out = cores[0].reshape(r0 * shape[0], -1)
    for c in cores[1:]:
        out = out.reshape(-1, c.shape[0]) @ c.reshape(c.shape[0], -1)
    out = out.reshape(r0, -1, r0)
    return torch.diagonal(out, dim1=0, dim2=2).sum(-1).reshape(shape)


def tr_project(
    x: torch.Tensor,
    ranks: int | Sequence[int],
    *,
    method: str = "gram",
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Projection onto tensor-ring rank ``ranks`` (TR-SVD, then reconstruct), in x's shape."""
    with torch.no_grad():
        return tr_to_tensor(tr_svd(x, ranks, method=method, shape=shape)).reshape(x.shape)
