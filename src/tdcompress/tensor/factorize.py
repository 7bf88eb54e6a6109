"""Integer factorizations for tensorizing layer dimensions."""

from __future__ import annotations

import math

__all__ = ["factorizations", "balanced_factorization"]


def _check(n: object, d: object) -> tuple[int, int]:
    for name, v in (("n", n), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return n, d  # type: ignore[return-value]


def factorizations(n: int, d: int) -> list[tuple[int, ...]]:
    """All non-decreasing d-tuples of ints >= 1 whose product is ``n``.

    >>> factorizations(12, 2)
    [(1, 12), (2, 6), (3, 4)]
    """
    n, d = _check(n, d)

    def rec(m: int, k: int, lo: int) -> list[tuple[int, ...]]:
        if k == 1:
            return [(m,)] if m >= lo else []
        out = []
        f = lo
        while f**k <= m:
            if m % f == 0:
                out += [(f, *rest) for rest in rec(m // f, k - 1, f)]
            f += 1
        return out

    return rec(n, d, 1)


def balanced_factorization(n: int, d: int) -> tuple[int, ...]:
    """The most balanced split of ``n`` into ``d`` factors (smallest largest factor, then
    largest smallest factor), non-decreasing.

    >>> balanced_factorization(800, 3)
    (8, 10, 10)
    """
    n, d = _check(n, d)
    if d == 1:
        return (n,)
    return min(factorizations(n, d), key=lambda t: (t[-1], -t[0], math.prod(t)))
