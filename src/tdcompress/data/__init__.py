"""Datasets (official file formats, the bundled digits), augmentation and loaders."""

from __future__ import annotations

from typing import Any

import torch

from tdcompress.data.augment import Augment, normalize, random_crop, random_flip, to_float
from tdcompress.data.download import ChecksumError, download
from tdcompress.data.folders import image_folder, video_classes, video_frames_dataset
from tdcompress.data.loader import TensorLoader
from tdcompress.data.readers import (
    DATASETS,
    default_root,
    load_dataset,
    read_cifar,
    read_cifar10,
    read_cifar100,
    read_idx,
    read_mnist,
    verify_files,
)
from tdcompress.data.speech import load_fsdd, read_fsdd, read_wav

__all__ = [
    "ChecksumError",
    "download",
    "image_folder",
    "video_classes",
    "video_frames_dataset",
    "Augment",
    "DATASETS",
    "TensorLoader",
    "load_dataset",
    "make_loaders",
    "normalize",
    "random_crop",
    "random_flip",
    "to_float",
    "read_cifar",
    "read_cifar10",
    "read_cifar100",
    "read_idx",
    "read_mnist",
    "verify_files",
    "load_fsdd",
    "validation_split",
    "read_fsdd",
    "read_wav",
]


#: the seed of the validation draw: one split for every run, whatever its own seed
VALIDATION_SEED = 20_260_000


def validation_split(
    x: torch.Tensor, y: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: ``n`` samples drawn without replacement (a
    fixed draw, :data:`VALIDATION_SEED`) held out of ``(x, y)``; both parts keep their
    original order."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < len(x):
        raise ValueError(
            f"data.validation must be an int in [1, {len(x) - 1}] (the training set has "
            f"{len(x)} samples), got {n!r}"
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    held = torch.zeros(len(x), dtype=torch.bool)
    held[perm[:n]] = True
    return x[~held], y[~held], x[held], y[held]


def make_loaders(
    cfg: Any,
    *,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
) -> tuple[TensorLoader, TensorLoader, dict[str, Any]]:
    """Train and test loaders plus dataset info for a :class:`~tdcompress.config.DataConfig`."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid names are {sorted(DATASETS)}")
    info = dict(DATASETS[cfg.dataset])
    root = cfg.root or default_root()
    if cfg.download:
        from tdcompress.data.download import download

        download(cfg.dataset, root)
    if cfg.dataset == "fsdd":  # features, normalised with training-set statistics
        if root is None or str(root) == "":
            raise ValueError(
                "dataset 'fsdd' needs a data root (data.root, --data-root or "
                f"$TDCOMPRESS_DATA_ROOT), got root={root!r}"
            )
        xtr, ytr, xte, yte = load_fsdd(root, cfg.protocol, cfg.speaker)
    else:
        xtr, ytr = load_dataset(cfg.dataset, root, "train")
        xte, yte = load_dataset(cfg.dataset, root, "test")
    info["evaluated_on"] = "test"
    if cfg.validation:
        xtr, ytr, xte, yte = validation_split(xtr, ytr, cfg.validation)
        info["evaluated_on"] = f"validation ({cfg.validation} held out of the training set)"
    if cfg.train_subset:
        xtr, ytr = xtr[: cfg.train_subset], ytr[: cfg.train_subset]
    norm = (info["mean"], info["std"]) if cfg.normalize else (None, None)
    if info["mean"] is None:
        norm = (None, None)
    aug = Augment(cfg.crop_padding, cfg.flip) if cfg.augment else None
    train = TensorLoader(
        xtr,
        ytr,
        cfg.batch_size,
        device=device,
        shuffle=True,
        seed=seed,
        augment=aug,
        mean=norm[0],
        std=norm[1],
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    test = TensorLoader(
        xte,
        yte,
        cfg.eval_batch_size,
        device=device,
        shuffle=False,
        mean=norm[0],
        std=norm[1],
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
        pad=False,  # evaluation counts every test sample exactly once across ranks
    )
    return train, test, info
