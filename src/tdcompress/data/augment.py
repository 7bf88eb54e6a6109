"""Data augmentation as batched tensor ops on the training device (no per-sample loop)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Augment", "random_crop", "random_flip", "normalize"]


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad every image by ``padding`` and cut a random HxW window per sample."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (n,1,h,1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (n,1,1,w)
    bidx = torch.arange(n, device=dev)[:, None, None, None]
    cidx = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the samples horizontally."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass
class Augment:
    """Random crop with zero padding and horizontal flip, applied to a float batch."""

    crop_padding: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, generator)
        return random_flip(x, generator) if self.flip else x
