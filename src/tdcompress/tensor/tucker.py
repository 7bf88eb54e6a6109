"""Tucker: (partial) HOSVD with optional HOOI refinement, reconstruction and projection."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tdcompress.tensor._checks import check_tensor, expand_ranks, working_dtype
from tdcompress.tensor._linalg import check_method, run_with_fallback, truncate

__all__ = ["tucker", "tucker_to_tensor", "tucker_project"]


def _check_modes(modes: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, int):
        modes = (modes,)
    out = []
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, int) or not -ndim <= m < ndim:
            raise ValueError(f"modes must be ints in [{-ndim}, {ndim}), got {list(modes)}")
        out.append(m % ndim)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"modes must be non-empty and distinct, got {list(modes)}")
    return tuple(out)


def mode_product(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """``x`` with its ``mode`` multiplied by matrix ``m`` (new_size, old_size)."""
    return torch.movedim(torch.tensordot(m, x, dims=([1], [mode])), 0, mode)


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


def _factors(
    x: torch.Tensor, ranks: list[int], modes: tuple[int, ...], n_iter: int, method: str
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    flags: list[torch.Tensor | None] = []
    factors = []
    for m, r in zip(modes, ranks):  # HOSVD: leading left singular vectors of each unfolding
        Q, _, f, _ = truncate(_unfold(x, m), r, method)
        factors.append(Q)
        flags.append(f)
    for _ in range(n_iter):  # HOOI sweeps
        for j, m in enumerate(modes):
            y = x
            for i, (mi, U) in enumerate(zip(modes, factors)):
                if i != j:
                    y = mode_product(y, U.mT, mi)
            Q, _, f, _ = truncate(_unfold(y, m), ranks[j], method)
            factors[j] = Q
            flags.append(f)
    return factors, flags


@torch.no_grad()
def tucker(
    x: torch.Tensor,
    ranks: int | Sequence[int],
    modes: Sequence[int] | None = None,
    *,
    n_iter: int = 0,
    method: str = "gram",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tucker decomposition of ``x`` on ``modes`` (default: all): ``(core, factors)``.

    HOSVD (each factor: the leading left singular vectors of the mode unfolding), then
    ``n_iter`` HOOI sweeps. ``factors[j]`` has shape (x.shape[modes[j]], r_j) with
    orthonormal columns; ``core`` is ``x`` with those modes reduced to the ranks. Ranks are
    one int or one per mode, clipped to the mode size. Tucker-2 of a conv kernel
    (O, I, kh, kw) is ``tucker(w, (r_out, r_in), modes=(0, 1))``.
    """
    x = check_tensor(x, "x")
    check_method(method)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    modes = _check_modes(modes, x.dim())
    r = expand_ranks(ranks, len(modes))
    xw = x.to(working_dtype(x))
    factors = run_with_fallback(lambda m: _factors(xw, r, modes, n_iter, m), method, xw.numel())
    core = xw
    for m, U in zip(modes, factors):
        core = mode_product(core, U.mT, m)
    return core.to(x.dtype), [U.to(x.dtype) for U in factors]


def tucker_to_tensor(
    core: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int] | None = None
) -> torch.Tensor:
    """The full tensor ``core x_{modes[j]} factors[j]``; differentiable."""
    modes = _check_modes(modes, core.dim()) if modes is not None else tuple(range(len(factors)))
    if len(modes) != len(factors):
        raise ValueError(f"got {len(factors)} factors for {len(modes)} modes; they must match")
    out = core
    for m, U in zip(modes, factors):
        if U.dim() != 2 or U.shape[1] != core.shape[m]:
            raise ValueError(
                f"factor for mode {m} must have shape (n, {core.shape[m]}), got {tuple(U.shape)}"
            )
        out = mode_product(out, U, m)
    return out


def tucker_project(
    x: torch.Tensor,
    ranks: int | Sequence[int],
    modes: Sequence[int] | None = None,
    *,
    n_iter: int = 0,
    method: str = "gram",
) -> torch.Tensor:
    """Projection onto multilinear rank ``ranks`` on ``modes``: decompose, then reconstruct."""
    with torch.no_grad():
        core, factors = tucker(x, ranks, modes, n_iter=n_iter, method=method)
        mds = _check_modes(modes, x.dim())
        return tucker_to_tensor(core, factors, mds)
