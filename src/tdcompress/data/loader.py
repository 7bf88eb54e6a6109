"""An in-memory loader: uint8 tensors on the training device, batches with augmentation as
tensor ops, epoch-seeded shuffling (a resumed run sees the same order) and DDP sharding."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from tdcompress.data.augment import Augment, normalize

__all__ = ["TensorLoader"]


class TensorLoader:
    """Iterates ``(x float, y long)`` batches over ``images`` (N, C, H, W) uint8.

    The whole set lives on ``device`` as uint8 (CIFAR-10: 150 MB), so there is no worker
    process and no host-to-device copy per batch. Shuffling is drawn from
    ``seed + epoch`` (call :meth:`set_epoch`). Under DDP (``world_size > 1``) every rank gets
    a disjoint, equal share of each epoch's permutation (padded by repeating samples, like
    ``DistributedSampler``); with ``drop_last`` the incomplete last batch is skipped.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        seed: int = 0,
        augment: Augment | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.mean, self.std = augment, mean, std
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return math.ceil(len(self.images) / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _indices(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.images)
        idx = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            idx = torch.cat([idx, idx[: total - n]])
        return idx[self.rank :: self.world_size].to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        idx = self._indices(g)
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[sel].float().div_(255)
            if self.augment is not None:
                x = self.augment(x, g)
            if self.mean is not None and self.std is not None:
                x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[sel]
