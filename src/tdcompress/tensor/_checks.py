"""Argument validation shared by the tensor decompositions."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x: object, name: str = "x", min_ndim: int = 1) -> torch.Tensor:
    """Return ``x`` if it is a finite real floating tensor with at least ``min_ndim`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
    if x.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    # One device sync: the only way to refuse NaN/Inf instead of returning garbage. A sum
    # is NaN/Inf iff an entry is (or the values overflow, which is refused as well) and
    # costs one read of x, several times cheaper than isfinite().all().
    # (summed in float32 at least: a float16 sum overflows at 65504 on finite values)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not bool(torch.isfinite(x.sum(dtype=acc))):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def check_rank(r: object, name: str) -> int:
    """One rank: an integer >= 1 (bools and floats are refused)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {r!r} ({type(r).__name__})")
    if int(r) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {r}")
    return int(r)


def expand_ranks(ranks: object, n: int, name: str = "ranks") -> list[int]:
    """``ranks`` as a list of ``n`` ints: one int for every entry, or a sequence of ``n``."""
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.tolist()
    if isinstance(ranks, Sequence) and not isinstance(ranks, str):
        if len(ranks) != n:
            raise ValueError(
                f"{name} must have {n} entries (one per bond), got {len(ranks)}: {list(ranks)}"
            )
        return [check_rank(r, f"{name}[{i}]") for i, r in enumerate(ranks)]
    return [check_rank(ranks, name)] * n


def check_rel_tol(rel_tol: object) -> float | None:
    if rel_tol is None:
        return None
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, numbers.Real):
        raise TypeError(f"rel_tol must be a real number in [0, 1), got {rel_tol!r}")
    v = float(rel_tol)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"rel_tol must be in [0, 1), got {v}")
    return v


def check_shape(shape: object, name: str = "shape") -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, Sequence) or len(shape) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    out = []
    for i, s in enumerate(shape):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or int(s) < 1:
            raise ValueError(f"{name}[{i}] must be a positive int, got {s!r}")
        out.append(int(s))
    return tuple(out)


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the decompositions compute in: half precisions are promoted to float32."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def tensorize(x: torch.Tensor, shape: object, name: str = "shape") -> torch.Tensor:
    """``x`` viewed with ``shape`` (None keeps it); the product must equal ``x.numel()``."""
    if shape is None:
        return x
    shape = check_shape(shape, name)
    n = 1
    for s in shape:
        n *= s
    if n != x.numel():
        raise ValueError(
            f"{name} {list(shape)} has {n} entries but x has {x.numel()} (shape "
            f"{list(x.shape)}); the product of {name} must equal x's size"
        )
    return x.reshape(shape)
