"""A tiny deterministic synthetic classification set, for smoke runs and end-to-end tests."""

from __future__ import annotations

import torch

__all__ = ["synthetic_dataset"]


def synthetic_dataset(
    split: str,
    n_train: int = 512,
    n_test: int = 256,
    shape: tuple[int, ...] = (1, 8, 8),
    num_classes: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, *shape) whose labels come from a fixed random linear teacher, so the
    task is learnable; ``split`` is "train" or "test" (disjoint draws)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(num_classes, int(torch.tensor(shape).prod()), generator=g)
    n = n_train if split == "train" else n_test
    g = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    x = torch.rand(n, *shape, generator=g)
    y = (x.flatten(1) - 0.5) @ teacher.T
    return (x * 255).round().to(torch.uint8), y.argmax(1)
