"""Folder datasets: ImageNet-style image folders (through torchvision) and videos stored as
folders of frames (UCF11/HMDB51 after frame extraction)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["image_folder", "video_frames_dataset", "video_classes", "FRAME_SUFFIXES"]

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_folder(root: str | Path, split: str, *, size: int = 224, transform: Any = None) -> Any:
    """``torchvision.datasets.ImageFolder`` over ``root/<split>/<class>/<image>``.

    ``split`` is "train" (random resized crop of ``size`` + flip) or "val" (resize to
    ``size * 8 / 7``, centre crop); images are normalised with the ImageNet mean/std unless a
    ``transform`` is given. Needs torchvision: ``pip install 'tdcompress[vision]'``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise ImportError(
            "image_folder needs torchvision, which is not installed; install the 'vision' extra: "
            "pip install 'tdcompress[vision]'"
        ) from None
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found (expected {split}/<class>/<image>)")
    if transform is None:
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if split == "train":
            ops = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        else:
            ops = [transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size)]
        transform = transforms.Compose([*ops, transforms.ToTensor(), norm])
    return datasets.ImageFolder(str(folder), transform=transform)


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def video_classes(root: str | Path) -> list[str]:
    """Sorted class folder names under ``root`` (label ``i`` is ``video_classes(root)[i]``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found (expected root/<class>/<video>/<frame>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected root/<class>/<video>/<frame>)")
    return classes


def video_frames_dataset(
    root: str | Path,
    frames: int = 16,
    size: tuple[int, int] = (120, 160),
    *,
    mode: str = "RGB",
    flatten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos stored as ``root/<class>/<video>/<frame>.jpg|png`` as uint8 ``(N, T, C, H, W)``
    and int64 labels (classes in sorted order, see :func:`video_classes`).

    Frames are ordered by name (numbers compared numerically); ``frames`` of them are taken
    evenly spaced over the video (repeated when it has fewer) and resized bilinearly to
    ``size = (H, W)``. ``mode`` is "RGB" (C=3) or "L" (greyscale, C=1). ``flatten`` returns
    every frame as a vector: ``(N, T, C * H * W)`` (the LSTM classifier's input). Needs Pillow.
    """
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in size)
    ):
        raise ValueError(f"size must be (H, W) with two positive ints, got {size!r}")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError(
            "video_frames_dataset needs Pillow to read frames: pip install pillow "
            "(or pip install 'tdcompress[vision]')"
        ) from None
    root = Path(root)
    classes = video_classes(root)
    h, w = size
    channels = 3 if mode == "RGB" else 1
    videos: list[tuple[Path, int]] = []
    for label, c in enumerate(classes):
        vids = sorted((p for p in (root / c).iterdir() if p.is_dir()), key=_natural_key)
        videos.extend((v, label) for v in vids)
    if not videos:
        raise ValueError(f"{root}: no video folders (expected root/<class>/<video>/<frame>)")
    out = np.empty((len(videos), frames, channels, h, w), dtype=np.uint8)
    for i, (vid, _) in enumerate(videos):
        files = sorted(
            (p for p in vid.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES),
            key=_natural_key,
        )
        if not files:
            raise ValueError(f"{vid}: no frames (expected files ending in {FRAME_SUFFIXES})")
        pick = np.linspace(0, len(files) - 1, frames).round().astype(int)
        for t, j in enumerate(pick):
            try:
                with Image.open(files[j]) as im:
                    im = im.convert(mode).resize((w, h), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{files[j]}: not a readable image ({e})") from None
            out[i, t] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
    labels = torch.tensor([lab for _, lab in videos], dtype=torch.long)
    x = torch.from_numpy(out)
    return (x.flatten(2) if flatten else x), labels
