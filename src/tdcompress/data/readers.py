"""Readers for the official on-disk formats, and ``load_dataset`` over a data root."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "read_cifar", "load_dataset", "DATASETS", "DatasetInfo", "default_root"]

# idx magic: 0x00 0x00 <type 0x08 = uint8> <ndim>
_IDX_UINT8 = 0x08

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def default_root() -> str | None:
    """``$TDCOMPRESS_DATA_ROOT`` if set."""
    return os.environ.get("TDCOMPRESS_DATA_ROOT")


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST format, gzipped or not) as a uint8 array; clear errors for a
    missing file, a wrong magic number or a truncated file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected an idx file, e.g. from MNIST)")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8 or not 1 <= raw[3] <= 4:
        raise ValueError(
            f"{path}: wrong magic number {raw[:4].hex()}; expected 0000 08 0n (idx, uint8, n dims)"
        )
    nd = raw[3]
    if len(raw) < 4 + 4 * nd:
        raise ValueError(f"{path}: truncated header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    need = int(np.prod(dims)) + 4 + 4 * nd
    if len(raw) != need:
        raise ValueError(
            f"{path}: {len(raw)} bytes, expected {need} for dimensions {dims} "
            "(truncated or corrupt)"
        )
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


def read_cifar(
    folder: str | Path, files: list[str], label_key: bytes = b"labels"
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels from CIFAR python batch files in ``folder``."""
    folder = Path(folder)
    xs, ys = [], []
    for name in files:
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: file not found (expected a CIFAR python batch)")
        try:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data, labels = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[label_key])
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise ValueError(f"{p}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"{p}: data of shape {data.shape}, expected (N, 3072) with N labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


class DatasetInfo(dict):
    """``num_classes``, ``input_shape`` (C, H, W), ``mean``/``std`` per channel (0-1 scale)."""


DATASETS = {
    "mnist": DatasetInfo(num_classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,)),
    "fashion_mnist": DatasetInfo(
        num_classes=10, input_shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,)
    ),
    "cifar10": DatasetInfo(
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": DatasetInfo(
        num_classes=100,
        input_shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "digits": DatasetInfo(num_classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,)),
    "synthetic": DatasetInfo(num_classes=4, input_shape=(1, 8, 8), mean=(0.5,), std=(0.29,)),
}


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the 'digits' dataset ships with scikit-learn: pip install 'tdcompress[demo]'"
        ) from None
    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = d.target
    perm = np.random.default_rng(0).permutation(len(x))  # fixed split: 1,437 train, 360 test
    idx = perm[:1437] if split == "train" else perm[1437:]
    return x[idx], y[idx]


def load_dataset(
    name: str, root: str | Path | None, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, C, H, W), labels int64)`` of ``split`` ("train"/"test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {sorted(DATASETS)}")
    if name == "digits":
        x, y = _digits(split)
    elif name == "synthetic":
        from tdcompress.data.synthetic import synthetic_dataset

        return synthetic_dataset(split)
    else:
        if root is None:
            raise ValueError(f"dataset {name!r} needs a data root (data.root or --data-root)")
        root = Path(root)
        if name in ("mnist", "fashion_mnist"):
            folder = root / name.replace("_", "-")
            xf, yf = MNIST_FILES[split]
            x, y = read_idx(folder / xf)[:, None], read_idx(folder / yf)
            if len(x) != len(y):
                raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels")
        elif name == "cifar10":
            x, y = read_cifar(root / "cifar-10-batches-py", CIFAR10_FILES[split])
        else:
            x, y = read_cifar(root / "cifar-100-python", [split], label_key=b"fine_labels")
    return torch.from_numpy(np.array(x, copy=True)), torch.from_numpy(np.array(y, copy=True)).long()
