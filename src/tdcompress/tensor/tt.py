"""Tensor train: TT-SVD (Oseledets 2011; Algorithm 1 of Yin et al.), reconstruction, projection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tdcompress.tensor._checks import (
    check_rel_tol,
    check_shape,
    check_tensor,
    expand_ranks,
    tensorize,
    working_dtype,
)
from tdcompress.tensor._linalg import check_method, run_with_fallback, truncate

__all__ = ["tt_svd", "tt_to_tensor", "tt_project", "tt_max_ranks", "tt_clip_ranks", "tt_ranks"]


def tt_max_ranks(shape: Sequence[int]) -> list[int]:
    """Largest useful rank of each of the d-1 bonds: ``min(prod(n[:k]), prod(n[k:]))``."""
    shape = check_shape(shape)
    return [
        min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1)
    ]


def tt_clip_ranks(shape: Sequence[int], ranks: int | Sequence[int] | None) -> list[int]:
    """The d-1 bond ranks TT-SVD will use for ``ranks`` on a tensor of ``shape``.

    A requested rank above the feasible bound is clipped: bond k can carry at most
    ``min(r_{k-1} * n_k, prod(n[k+1:]))`` after the earlier bonds' truncations.
    """
    shape = check_shape(shape)
    d = len(shape)
    want = tt_max_ranks(shape) if ranks is None else expand_ranks(ranks, d - 1)
    out, r_prev = [], 1
    for k in range(d - 1):
        r = min(want[k], r_prev * shape[k], math.prod(shape[k + 1 :]))
        out.append(r)
        r_prev = r
    return out


def tt_ranks(cores: Sequence[torch.Tensor]) -> list[int]:
    """The d+1 ranks ``[r_0, r_1, ..., r_d]`` of a list of TT cores."""
    _check_cores(cores, ring=False)
    return [cores[0].shape[0]] + [c.shape[2] for c in cores]


def _check_cores(cores: Sequence[torch.Tensor], ring: bool) -> None:
    if isinstance(cores, torch.Tensor) or not isinstance(cores, Sequence) or len(cores) == 0:
        raise TypeError("cores must be a non-empty list of 3-d tensors")
    for i, c in enumerate(cores):
        if not isinstance(c, torch.Tensor) or c.dim() != 3:
            got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"cores[{i}] must be a 3-d tensor (r_in, n, r_out), got {got}")
        if i and c.shape[0] != cores[i - 1].shape[2]:
            raise ValueError(
                f"cores[{i}] has left rank {c.shape[0]} but cores[{i - 1}] has right rank "
                f"{cores[i - 1].shape[2]}; they must match"
            )
    if ring and cores[0].shape[0] != cores[-1].shape[2]:
        raise ValueError(
            f"tensor-ring cores must close: cores[0] left rank {cores[0].shape[0]} != "
            f"cores[-1] right rank {cores[-1].shape[2]}"
        )
    if not ring and (cores[0].shape[0] != 1 or cores[-1].shape[2] != 1):
        raise ValueError(
            "TT cores must start and end with rank 1, got "
            f"{cores[0].shape[0]} and {cores[-1].shape[2]}"
        )


def tt_sweep(
    t: torch.Tensor,
    shape: tuple[int, ...],
    r_left: int,
    r_right: int,
    ranks: list[int],
    method: str,
    budget_sq: float | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Left-to-right TT-SVD of ``t`` viewed as (r_left, n_1, ..., n_d, r_right).

    Returns the cores (the last one absorbs ``r_right``) and the Gram-guard flags.
    ``budget_sq``, if given, is the squared error allowed at each bond.
    """
    cores, flags = [], []
    r_prev = r_left
    rest = t.reshape(r_left * shape[0], -1)
    for k in range(len(shape) - 1):
        Q, rest, flag, _ = truncate(rest, ranks[k], method, budget_sq)
        r = Q.shape[-1]
        cores.append(Q.reshape(r_prev, shape[k], r))
        flags.append(flag)
        r_prev = r
        rest = rest.reshape(r * shape[k + 1], -1)
    cores.append(rest.reshape(r_prev, shape[-1], r_right))
    return cores, flags


@torch.no_grad()
def tt_svd(
    x: torch.Tensor,
    ranks: int | Sequence[int] | None = None,
    *,
    rel_tol: float | None = None,
    method: str = "gram",
    shape: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """TT-SVD of ``x`` (shape n_1 x ... x n_d): cores ``G_k`` of shape (r_{k-1}, n_k, r_k).

    ``ranks``: one int for every bond, or d-1 ints; None means no rank cap. Ranks above the
    feasible bound are clipped (see :func:`tt_clip_ranks`). ``rel_tol``: Oseledets'
    prescribed accuracy, ``||x - tt_to_tensor(cores)|| <= rel_tol * ||x||`` with the
    smallest ranks (still capped by ``ranks``). Cores 1..d-1 are left-orthonormal.
    ``method="gram"`` (default) truncates through float64 Gram eigendecompositions with an
    automatic LAPACK-SVD fallback when they cannot resolve the kept spectrum; ``"svd"``
    always uses ``torch.linalg.svd``. ``shape`` tensorizes ``x`` first (its product must
    equal ``x.numel()``). Runs under ``no_grad``; ``x`` is never modified.

    >>> x = torch.randn(4, 5, 6, dtype=torch.float64)
    >>> [tuple(c.shape) for c in tt_svd(x, 3)]
    [(1, 4, 3), (3, 5, 3), (3, 6, 1)]
    """
    x = tensorize(check_tensor(x, "x"), shape)
    check_method(method)
    tol = check_rel_tol(rel_tol)
    shape = tuple(x.shape)
    if len(shape) == 1:
        return [x.reshape(1, shape[0], 1).clone()]
    clipped = tt_clip_ranks(shape, ranks)
    xw = x.to(working_dtype(x))
    budget = None
    if tol is not None:
        budget = (tol * float(torch.linalg.vector_norm(xw.double()))) ** 2 / (len(shape) - 1)
    cores = run_with_fallback(
        lambda m: tt_sweep(xw, shape, 1, 1, clipped, m, budget), method, xw.numel()
    )
    return [c.to(x.dtype) for c in cores]


def tt_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor (n_1 x ... x n_d) of TT cores; differentiable."""
    _check_cores(cores, ring=False)
    shape = [c.shape[1] for c in cores]
    out = cores[0].reshape(shape[0], -1)
    for c in cores[1:]:
        out = (out @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
    return out.reshape(shape)


def tt_project(
    x: torch.Tensor,
    ranks: int | Sequence[int] | None = None,
    *,
    rel_tol: float | None = None,
    method: str = "gram",
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Projection onto TT rank ``ranks`` (Algorithm 1: TT-SVD, then reconstruct), in the
    shape of ``x`` (``shape`` is the TT shape it is tensorized to, as in :func:`tt_svd`)."""
    with torch.no_grad():
        cores = tt_svd(x, ranks, rel_tol=rel_tol, method=method, shape=shape)
        return tt_to_tensor(cores).reshape(x.shape)
