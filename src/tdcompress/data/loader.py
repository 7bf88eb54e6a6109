"""An in-memory loader: uint8 tensors on the training device, batches with augmentation as
tensor ops, epoch-seeded shuffling (a resumed run sees the same order) and DDP sharding."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from tdcompress.data.augment import Augment, uint8_affine

__all__ = ["TensorLoader"]


class TensorLoader:
    """Iterates ``(x float, y long)`` batches over ``images`` (N, C, H, W) uint8, or over
    ready-made float features of any shape (N, ...), which are batched as they are (cast to
    ``dtype``; no augmentation or normalisation: e.g. the FSDD spectrogram sequences).

    The whole set lives on ``device`` as uint8 (CIFAR-10: 150 MB), so there is no worker
    process and no host-to-device copy per batch. Per batch: gather the samples, ``augment``
    them (on uint8, on the device), convert to ``dtype`` in [0, 1] and normalise with
    ``mean``/``std`` in one fused multiply-add. Shuffling draws from a CPU generator seeded
    with ``(seed, epoch)`` (call :meth:`set_epoch`), augmentation from the same generator on
    CPU and from a generator on the device otherwise, so a resumed run sees the same batches.

    DDP (``world_size > 1``): like ``DistributedSampler(drop_last=False)``, each epoch's
    permutation is padded by repeating its first samples up to a multiple of ``world_size``
    and rank ``r`` takes positions ``r, r + world_size, ...``: the ranks' shares are disjoint
    slices of the padded permutation and have equal size ``ceil(N / world_size)``.
    ``drop_last`` (unlike DistributedSampler's) drops this rank's incomplete last batch.
    ``pad=False`` (evaluation) skips the padding: every sample is seen exactly once across
    the ranks, whose shares then differ in size by at most one.
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
        dtype: torch.dtype = torch.float32,
        pad: bool = True,
    ) -> None:
        features = isinstance(images, torch.Tensor) and images.dtype.is_floating_point
        if features:  # ready-made float inputs of any shape: passed through as they are
            if images.dim() < 2 or augment is not None or mean is not None or std is not None:
                raise ValueError(
                    "TensorLoader: float inputs (features) must be (N, ...) with augment, mean "
                    f"and std None (they are used as given), got shape {tuple(images.shape)}, "
                    f"augment={augment!r}, mean={mean!r}, std={std!r}"
                )
        elif (
            not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4
        ):
            got = (
                (images.dtype, tuple(images.shape)) if isinstance(images, torch.Tensor) else images
            )
            raise ValueError(
                f"TensorLoader: images must be uint8 (N, C, H, W) or float features, got {got!r}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
            raise ValueError(f"TensorLoader: labels must be a 1-d tensor, got {got!r}")
        if len(images) != len(labels):
            raise ValueError(f"TensorLoader: {len(images)} images but {len(labels)} labels")
        for arg, v, lo in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("seed", seed, 0),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"TensorLoader: {arg} must be an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(
                f"TensorLoader: rank must be in [0, world_size={world_size}), got {rank}"
            )
        if augment is not None and not callable(augment):
            raise TypeError(f"TensorLoader: augment must be callable or None, got {augment!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"TensorLoader: dtype must be a float dtype, got {dtype}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.mean, self.std = augment, mean, std
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.channels_last, self.dtype, self.pad = channels_last, dtype, pad
        self.features = features
        if features:
            self._scale = self._shift = None
        else:
            self._scale, self._shift = uint8_affine(mean, std, images.shape[1], self.device, dtype)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation draws the next iteration uses."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"TensorLoader.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        """The CPU generator of the current epoch (a fresh one on every call)."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        if not self.pad:
            return len(range(self.rank, len(self.images), self.world_size))
        return math.ceil(len(self.images) / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _indices(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.images)
        idx = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        total = self.num_samples * self.world_size
        if self.pad and total > n:  # (repeated as often as needed: n may be < world_size)
            idx = idx.repeat(math.ceil(total / n))[:total]
        return idx[self.rank :: self.world_size].to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self.generator()
        idx = self._indices(g)
        # augmentation draws on the data's device: no host-to-device copy (and so no stream
        # synchronisation) per batch on an accelerator; on CPU the same generator continues
        ga = g
        if self.device.type != "cpu" and self.augment is not None:
            ga = torch.Generator(self.device).manual_seed(self.seed * 100_003 + self.epoch)
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[sel]
            if self.augment is not None:
                x = self.augment(x, ga)
            if self.features:
                x = x.to(self.dtype)
            else:
                x = torch.addcmul(self._shift, x.to(self.dtype), self._scale)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[sel]
