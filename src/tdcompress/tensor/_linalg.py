"""Truncated range finding: the one kernel under every SVD-based decomposition here.

``truncate(M, k)`` returns ``Q`` (orthonormal columns) and ``T = Q^T M`` such that
``Q @ T`` is the best rank-``k`` approximation of ``M`` (Eckart-Young), like a truncated SVD.

Method ``"gram"`` (the default) takes the eigendecomposition of the smaller Gram matrix
(``M M^T`` or ``M^T M``) instead of an SVD of ``M``: the same truncation, 4-18x faster than
LAPACK's SVD over the whole TT projection on the layer tensors of
``benchmarks/bench_projection.py`` (docs/performance.md).
A Gram matrix squares the condition number, so directions with singular values below about
``sqrt(eps) * s_max`` are not resolved. Every call therefore reports whether the *kept*
spectrum reaches that floor; the callers gather these flags and, once per decomposition,
redo the whole decomposition with ``"svd"`` (LAPACK) when any flag is set. Method
``"svd"`` uses ``torch.linalg.svd`` throughout.
"""

from __future__ import annotations

import torch

METHODS = ("gram", "svd")
#: what "gram" escalates to when its guard fires: float64 Gram, then LAPACK SVD
_ESCALATION = ("gram", "gram64", "svd")


#: tensors up to this many entries start with a float64 Gram matrix: it costs next to
#: nothing at that size and spares the rerun that decaying spectra often trigger in float32
SMALL = 1 << 20


def run_with_fallback(fn, method: str, numel: int = SMALL + 1):
    """``fn(method) -> (result, flags)``; with ``"gram"``, rerun with a float64 Gram
    matrix and then with the LAPACK SVD while any step's guard fires (one sync each).
    Inputs of at most :data:`SMALL` entries (``numel``) start at the float64 Gram matrix."""
    if method != "gram":
        return fn(method)[0]
    start = 1 if numel <= SMALL else 0
    for m in _ESCALATION[start:]:
        result, flags = fn(m)
        if m == "svd" or not any_flag(flags):
            return result
    raise AssertionError("unreachable")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return method


def _guard(eigs_desc: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """True where the k-th kept eigenvalue of the Gram matrix sits at its rounding floor."""
    eps = torch.finfo(dtype).eps
    top = eigs_desc[..., :1].clamp_min(0)
    kth = eigs_desc[..., k - 1 : k]
    # the Gram matrix (formed in `dtype`) is accurate to ~ n * eps * top; keep a wide margin
    return (kth <= 1e3 * eps * top).any()


def truncate(
    M: torch.Tensor,
    k: int,
    method: str = "gram",
    budget_sq: float | None = None,
    singular_vectors: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Best rank-``k`` factorization ``M ~= Q @ T`` of ``M`` with shape (..., m, n).

    Returns ``(Q, T, flag, used_sq)``: ``Q`` (..., m, k') with orthonormal columns,
    ``T = Q^T M`` (..., k', n), ``k' = min(k, m, n)``; ``flag`` is a 0-dim bool tensor (or
    None when the step was exact) that is True when the Gram method could not resolve the
    kept spectrum. With ``budget_sq`` (2-D ``M`` only) the rank is the smallest one, at most
    ``k``, whose discarded energy stays within ``budget_sq``; ``used_sq`` is the energy
    discarded then (0.0 without a budget). Steps that truncate nothing take exact
    shortcuts (identity or QR) whose ``Q`` spans the right space but is not made of
    singular vectors, unless ``singular_vectors=True``.
    """
    m, n = M.shape[-2:]
    k = min(k, m, n)
    tol = budget_sq is not None
    exact_ok = not tol and not singular_vectors
    if method == "svd":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        used = 0.0
        if tol:
            sq = S.double().square()
            k = rank_for_tolerance(sq, budget_sq, k)
            used = float(sq[k:].sum())
        return U[..., :k], S[..., :k, None] * Vh[..., :k, :], None, used
    if exact_ok and k >= m:  # nothing to truncate on the row side: identity core, exact
        eye = torch.eye(m, dtype=M.dtype, device=M.device).expand(*M.shape[:-2], m, m)
        return eye, M.clone(), None, 0.0  # (M may be a view of the caller's input)
    if exact_ok and m > n and k >= n:  # tall matrix kept at full column rank: QR is exact
        Q, R = torch.linalg.qr(M)
        return Q, R, None, 0.0
    wide = m <= n
    Mg = M.double() if method == "gram64" else M
    # the Gram matrix is accurate to ~eps * ||M||^2 in its dtype; an eigh in that same
    # dtype loses nothing more, and the guard below catches what it cannot resolve
    w, V = torch.linalg.eigh(Mg @ Mg.mT if wide else Mg.mT @ Mg)
    w, V = w.flip(-1).clamp_min(0).double(), V.flip(-1)
    used = 0.0
    if tol:
        k = rank_for_tolerance(w, budget_sq, k)
        used = float(w[k:].sum())
    flag = _guard(w, k, Mg.dtype)
    if not wide and singular_vectors:
        # left singular vectors from the right ones, U = M V / s, with V as the eigensolver
        # gave it (float64 for "gram64"): rounded first, U loses orthogonality as s falls
        s = w[..., :k].sqrt().clamp_min(torch.finfo(M.dtype).tiny)
        Q = (M.double() @ V[..., :k].double()) / s[..., None, :]
        return Q.to(M.dtype), (Q.mT @ M.double()).to(M.dtype), flag, used
    V = V.to(M.dtype)
    if wide:
        Q = V[..., :k]
    else:
        Q, _ = torch.linalg.qr(M @ V[..., :k])  # spans the top-k left subspace
    return Q, Q.mT @ M, flag, used


def rank_for_tolerance(sq: torch.Tensor, budget_sq: float, cap: int) -> int:
    """Smallest rank whose discarded energy (sum of trailing ``sq``) is within ``budget_sq``.

    Reads the spectrum on the host (one sync): ranks decide tensor shapes.
    """
    tail = torch.flip(torch.cumsum(torch.flip(sq, (0,)), 0), (0,))  # tail[i] = sum sq[i:]
    ok = (tail <= budget_sq).nonzero()
    r = int(ok[0]) if ok.numel() else sq.numel()
    return max(1, min(r, cap))


def any_flag(flags: list[torch.Tensor | None]) -> bool:
    """True if any Gram step was unresolved (one device sync for all steps together)."""
    fl = [f for f in flags if f is not None]
    return bool(torch.stack(fl).any()) if fl else False
