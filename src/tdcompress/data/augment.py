"""Data augmentation as batched tensor ops on the training device (no per-sample loop).

Every function works on any dtype (uint8 before conversion is cheapest) and on any device.
Random draws come from ``generator`` (CPU or on ``x``'s device); the same generator state
gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Augment", "random_crop", "random_flip", "normalize", "to_float", "uint8_affine"]


def _check_batch(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a (N, C, H, W) tensor, got {shape}")


def _draw_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return x.device if generator is None else generator.device


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad every image by ``padding`` and cut an HxW window at a random offset per sample.

    Offsets ``oy`` then ``ox`` are drawn as ``torch.randint(0, 2 * padding + 1, (N,))`` each;
    sample ``i`` is ``pad(x)[i, :, oy[i]:oy[i] + H, ox[i]:ox[i] + W]`` (one gather, no loop).
    """
    _check_batch(x, "random_crop")
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"random_crop: padding must be an int >= 0, got {padding!r}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    wp = w + 2 * padding
    xp = F.pad(x, (padding, padding, padding, padding))
    dev, gdev = x.device, _draw_device(x, generator)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev).to(dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev).to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)  # (n, h)
    cols = ox[:, None] + torch.arange(w, device=dev)  # (n, w)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w)
    return xp.flatten(2).gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)


def random_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Mirror (along W) the samples where ``torch.rand(N) < p``."""
    _check_batch(x, "random_flip")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"random_flip: p must be in [0, 1], got {p!r}")
    flip = torch.rand(x.shape[0], generator=generator, device=_draw_device(x, generator)) < p
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def _values(values: tuple[float, ...], name: str, channels: int, fn: str) -> list[float]:
    seq = values if isinstance(values, (tuple, list)) else [values]
    vals = [float(v) for v in seq]
    if len(vals) not in (1, channels):
        raise ValueError(
            f"{fn}: {name}={tuple(seq)!r} has {len(vals)} values, "
            f"expected 1 or one per channel ({channels})"
        )
    if name == "std" and any(not v > 0 for v in vals):
        raise ValueError(f"{fn}: std must be > 0 per channel, got {tuple(seq)!r}")
    return vals


def uint8_affine(
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    channels: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of shape (1, C, 1, 1) with ``x_uint8 * scale + shift`` equal to
    ``(x / 255 - mean) / std`` (or ``x / 255`` when both are None)."""
    if (mean is None) != (std is None):
        raise ValueError(f"give both mean and std, or neither; got mean={mean!r}, std={std!r}")
    if mean is None:
        m, s = [0.0], [1.0]
    else:
        m = _values(mean, "mean", channels, "normalize")
        s = _values(std, "std", channels, "normalize")
    if len(m) != len(s):
        m, s = m * (len(s) // len(m)), s * (len(m) // len(s))
    scale = torch.tensor([1 / (255 * v) for v in s], dtype=dtype, device=device)
    shift = torch.tensor([-a / b for a, b in zip(m, s)], dtype=dtype, device=device)
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for a float batch (N, C, H, W)."""
    _check_batch(x, "normalize")
    if not x.is_floating_point():
        raise TypeError(f"normalize: x must be a float tensor, got {x.dtype} (use to_float)")
    c = x.shape[1]
    m = torch.tensor(_values(mean, "mean", c, "normalize"), dtype=x.dtype, device=x.device)
    s = torch.tensor(_values(std, "std", c, "normalize"), dtype=x.dtype, device=x.device)
    return (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


def to_float(
    x: torch.Tensor,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 0..255 -> ``dtype`` in [0, 1], then ``(x - mean) / std`` per channel if given
    (one fused multiply-add)."""
    _check_batch(x, "to_float")
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float: x must be uint8, got {x.dtype}")
    scale, shift = uint8_affine(mean, std, x.shape[1], x.device, dtype)
    return torch.addcmul(shift, x.to(dtype), scale)


@dataclass
class Augment:
    """Random crop with ``crop_padding`` zero padding, then horizontal flip (if ``flip``)."""

    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        p = self.crop_padding
        if not isinstance(p, int) or isinstance(p, bool) or p < 0:
            raise ValueError(f"Augment: crop_padding must be an int >= 0, got {p!r}")
        if not isinstance(self.flip, bool):
            raise TypeError(f"Augment: flip must be a bool, got {self.flip!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, generator)
        return random_flip(x, generator) if self.flip else x
