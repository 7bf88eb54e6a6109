"""Low rank: truncated-SVD factorization and projection of a matrix or a batch of matrices."""

from __future__ import annotations

import torch

from tdcompress.tensor._checks import check_rank, check_tensor, working_dtype
from tdcompress.tensor._linalg import check_method, run_with_fallback, truncate

__all__ = ["lowrank_svd", "lowrank_project"]


@torch.no_grad()
def lowrank_svd(
    x: torch.Tensor, rank: int, *, balanced: bool = False, method: str = "gram"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(A, B)`` of ``x`` (..., m, n) with ``x ~= A @ B``.

    ``A`` (..., m, r) has orthonormal columns and ``B = A^T x`` (..., r, n), unless
    ``balanced=True``: then ``A = U sqrt(S)``, ``B = sqrt(S) V^T`` (equal norms, better
    conditioned for training). ``rank`` is clipped to ``min(m, n)``.
    """
    x = check_tensor(x, "x", min_ndim=2)
    rank = check_rank(rank, "rank")
    check_method(method)
    xw = x.to(working_dtype(x))

    def run(m: str):
        A, B, flag, _ = truncate(xw, rank, m)
        return (A, B), [flag]

    A, B = run_with_fallback(run, method, xw.numel())
    if balanced:  # SVD of the small factor B only: (r x n)
        U, S, Vh = torch.linalg.svd(B, full_matrices=False)
        s = S.sqrt()
        A, B = (A @ U) * s[..., None, :], s[..., :, None] * Vh
    return A.to(x.dtype), B.to(x.dtype)


def lowrank_project(x: torch.Tensor, rank: int, *, method: str = "gram") -> torch.Tensor:
    """Projection of ``x`` (..., m, n) onto matrices of rank at most ``rank`` (Eckart-Young)."""
    with torch.no_grad():
        A, B = lowrank_svd(x, rank, method=method)
        return A @ B
