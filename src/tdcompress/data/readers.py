"""Readers for the official on-disk formats, and ``load_dataset`` over a data root."""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "read_idx",
    "read_mnist",
    "read_cifar",
    "read_cifar10",
    "read_cifar100",
    "verify_files",
    "load_dataset",
    "DATASETS",
    "DatasetInfo",
    "default_root",
]

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


def read_idx(path: str | Path) -> torch.Tensor:
    """An idx file (MNIST format, gzipped or not) as a uint8 tensor of its stored dimensions.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for a corrupt
    gzip stream, a wrong magic number (expected ``00 00 08 0n``: uint8 data, n dimensions), or
    a size that does not match the header's dimensions (truncated or trailing bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected an idx file, e.g. from MNIST)")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8 or not 1 <= raw[3] <= 4:
        raise ValueError(
            f"{path}: wrong magic number {raw[:4].hex()}; expected 0000 08 0n (idx, uint8, n dims)"
        )
    nd = raw[3]
    if len(raw) < 4 + 4 * nd:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes, expected {4 + 4 * nd})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    need = int(np.prod(dims)) + 4 + 4 * nd
    if len(raw) != need:
        raise ValueError(
            f"{path}: {len(raw)} bytes, expected {need} for dimensions {dims} "
            "(truncated or corrupt)"
        )
    arr = np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)
    return torch.from_numpy(arr.copy())


def _idx_path(folder: Path, name: str) -> Path:
    """``folder/name`` (``.gz``), or the uncompressed file when only that one exists."""
    p = folder / name
    if not p.is_file() and (folder / name.removesuffix(".gz")).is_file():
        return folder / name.removesuffix(".gz")
    return p


def read_mnist(
    folder: str | Path, split: str, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST / Fashion-MNIST ``split`` ("train"/"test") from the official idx files in
    ``folder`` (gzipped or not): uint8 images (N, 1, 28, 28) and int64 labels."""
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder)
    xf, yf = (_idx_path(folder, n) for n in MNIST_FILES[split])
    x, y = read_idx(xf), read_idx(yf)
    if x.dim() != 3:
        raise ValueError(f"{xf}: dimensions {list(x.shape)}, expected 3 (N, H, W) for images")
    if y.dim() != 1:
        raise ValueError(f"{yf}: dimensions {list(y.shape)}, expected 1 (N,) for labels")
    if len(x) != len(y):
        raise ValueError(f"{xf}: {len(x)} images but {yf.name} has {len(y)} labels")
    return x[:, None], _labels(y, num_classes, yf)


def _labels(y: torch.Tensor | np.ndarray, num_classes: int, path: Path) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y)).long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{path}: labels in [{int(y.min())}, {int(y.max())}], expected [0, {num_classes - 1}]"
        )
    return y


def read_cifar(
    folder: str | Path, files: list[str], label_key: bytes = b"labels", num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) and int64 labels from CIFAR python batch files in
    ``folder`` (``label_key`` b"labels" for CIFAR-10, b"fine_labels" for CIFAR-100)."""
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
            raise ValueError(
                f"{p}: not a readable CIFAR batch with keys b'data' and {label_key!r} "
                f"({type(e).__name__}: {e})"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
            raise ValueError(
                f"{p}: data of shape {data.shape} with {labels.shape} labels, "
                "expected (N, 3072) data and N labels"
            )
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        ys.append(_labels(labels, num_classes, p))
    return torch.cat(xs), torch.cat(ys)


def read_cifar10(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` from the official ``cifar-10-batches-py`` folder."""
    if split not in CIFAR10_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return read_cifar(folder, CIFAR10_FILES[split])


def read_cifar100(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 ``split`` (fine labels) from the official ``cifar-100-python`` folder."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return read_cifar(folder, [split], label_key=b"fine_labels", num_classes=100)


def verify_files(dataset: str, root: str | Path, split: str | None = None) -> None:
    """Check the official MD5 of ``dataset``'s files under ``root`` (only ``split``'s files if
    given); raises ChecksumError naming the file and both checksums on a mismatch."""
    from tdcompress.data.download import SOURCES, ChecksumError, md5sum

    if dataset not in SOURCES:
        raise ValueError(f"dataset={dataset!r} has no official checksums; valid: {sorted(SOURCES)}")
    src = SOURCES[dataset]
    folder = Path(root) / src.folder
    sums = src.members if src.archive else src.files
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    if split is not None:
        wanted = {
            "mnist": MNIST_FILES.get(split, ()),
            "fashion_mnist": MNIST_FILES.get(split, ()),
            "cifar10": CIFAR10_FILES.get(split, ()),
            "cifar100": (split,),
        }[dataset]
        sums = {k: v for k, v in sums.items() if k in wanted}
    for name, md5 in sums.items():
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: file not found (expected the official {name})")
        got = md5sum(p)
        if got != md5:
            raise ChecksumError(
                f"{p}: checksum mismatch: md5 {got}, expected the official {md5} "
                "(corrupt or modified file)"
            )


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
    # Free Spoken Digit Dataset as spectrogram sequences (data.speech): MAX_STEPS steps of
    # 8 frames x 128 bins, plus the valid-step channel; normalised when it is read
    "fsdd": DatasetInfo(num_classes=10, input_shape=(16, 1025), mean=None, std=None),
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
    name: str, root: str | Path | None, split: str, *, verify: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, C, H, W), labels int64)`` of ``split`` ("train"/"test").

    ``root`` holds ``mnist/``, ``fashion-mnist/``, ``cifar-10-batches-py/`` or
    ``cifar-100-python/`` in their official formats (unused for "digits" and "synthetic").
    ``verify`` checks the files' official MD5s first (see :func:`verify_files`).
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        x, y = _digits(split)
        return torch.from_numpy(x), torch.from_numpy(y).long()
    if name == "fsdd":
        raise ValueError(
            "dataset 'fsdd' is read as feature sequences by tdcompress.data.load_fsdd(root, "
            "protocol, speaker), not as images"
        )
    if name == "synthetic":
        from tdcompress.data.synthetic import synthetic_dataset

        return synthetic_dataset(split)
    if root is None or str(root) == "":
        raise ValueError(
            f"dataset {name!r} needs a data root (data.root, --data-root or "
            f"$TDCOMPRESS_DATA_ROOT), got root={root!r}; get the data with "
            f"`{download_command(name, 'DIR')}` and pass --data-root DIR"
        )
    root = Path(root)
    try:
        if verify:
            verify_files(name, root, split)
        if name in ("mnist", "fashion_mnist"):
            return read_mnist(root / name.replace("_", "-"), split)
        if name == "cifar10":
            return read_cifar10(root / "cifar-10-batches-py", split)
        return read_cifar100(root / "cifar-100-python", split)
    except FileNotFoundError as e:
        raise type(e)(
            f"{e}; dataset {name!r} is not under data root {str(root)!r}: download it with "
            f"`{download_command(name, root)}`"
        ) from None
    except ValueError as e:  # corrupt, truncated or not the official file (same type kept)
        raise type(e)(
            f"{e}; download dataset {name!r} again with `{download_command(name, root)} --force`"
        ) from None


def download_command(name: str, root: str | Path) -> str:
    """The command that downloads dataset ``name`` into ``root``."""
    import shlex

    return shlex.join(["tdcompress", "download", name, "--data-root", str(root)])
