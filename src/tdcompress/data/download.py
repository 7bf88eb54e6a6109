"""Optional download of MNIST, Fashion-MNIST and CIFAR-10/100 from their official locations,
with MD5 verification and atomic writes (a failed or corrupt download leaves nothing behind).

Layout under ``root`` (what :func:`tdcompress.data.load_dataset` reads)::

    root/mnist/*.gz   root/fashion-mnist/*.gz   root/cifar-10-batches-py/   root/cifar-100-python/

The CIFAR archives are kept next to the extracted folder (``root/cifar-10-python.tar.gz``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["download", "ChecksumError", "SOURCES", "md5sum"]

_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A downloaded or present file does not have its official MD5."""


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from: mirrors (tried in order), files with their MD5s, and for
    archives the folder they extract to and the files (with MD5s) expected in it."""

    folder: str
    urls: tuple[str, ...]
    files: dict[str, str]
    archive: bool = False
    members: dict[str, str] = field(default_factory=dict)


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_KRIZ = ("https://www.cs.toronto.edu/~kriz/", "https://cave.cs.toronto.edu/kriz/")

SOURCES: dict[str, Source] = {
    "mnist": Source(
        "mnist",
        ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        dict(
            zip(
                _MNIST_FILES,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            )
        ),
    ),
    "fashion_mnist": Source(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        dict(
            zip(
                _MNIST_FILES,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            )
        ),
    ),
    "cifar10": Source(
        "cifar-10-batches-py",
        _KRIZ,
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        archive=True,
        members={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
    "cifar100": Source(
        "cifar-100-python",
        _KRIZ,
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        archive=True,
        members={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
}
_BUNDLED = ("digits", "synthetic")  # ship with the package / generated: nothing to download


def md5sum(path: str | Path) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, expected: str, timeout: float) -> None:
    """Stream ``url`` into a temp file beside ``dest``, check its MD5, rename into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != expected:
            raise ChecksumError(
                f"{dest}: checksum mismatch for the file downloaded from {url}: md5 {got}, "
                f"expected {expected}; the download was discarded"
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe_extract(archive: Path, into: Path) -> None:
    """Extract a tar.gz, refusing absolute paths, ``..``, links and special files."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
                    raise ValueError(
                        f"{archive}: refusing to extract member {m.name!r} "
                        "(absolute path, '..', link or special file)"
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(into, members)
    except tarfile.TarError as e:
        raise ValueError(f"{archive}: not a readable tar archive ({e})") from None


def _members_ok(folder: Path, members: Mapping[str, str], sums: Mapping[str, str]) -> bool:
    return folder.is_dir() and all(
        (folder / n).is_file() and md5sum(folder / n) == sums.get(n, md5)
        for n, md5 in members.items()
    )


def download(
    dataset: str,
    root: str | Path,
    *,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    force: bool = False,
) -> Path | None:
    """Download ``dataset`` ("mnist", "fashion_mnist", "cifar10", "cifar100") under ``root``
    unless already present with the right checksums; returns the dataset folder.

    Each file is streamed to a temporary file in the target folder, its MD5 compared to the
    official one, and only then renamed into place; on a mismatch the temporary file is
    removed and :class:`ChecksumError` names the file, the URL and both checksums. CIFAR
    archives are extracted to a temporary folder that is renamed to the official folder name.
    ``base_url`` replaces the official mirrors (e.g. a local server); ``checksums`` overrides
    the MD5 of the files named in it. "digits" and "synthetic" need no download (returns
    None).
    """
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a str, got {type(dataset).__name__}")
    if dataset in _BUNDLED:
        return None
    if dataset not in SOURCES:
        raise ValueError(
            f"dataset={dataset!r} cannot be downloaded; valid names are {sorted(SOURCES)}"
        )
    if root is None or str(root) == "":
        raise ValueError(
            f"root must be a directory path to download {dataset!r} into, got {root!r}"
        )
    if base_url is not None and not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, got {type(base_url).__name__}")
    src = SOURCES[dataset]
    sums = dict(checksums or {})
    root = Path(root)
    folder = root / src.folder
    urls = (base_url.rstrip("/") + "/",) if base_url else src.urls

    if src.archive:
        if not force and _members_ok(folder, src.members, sums):
            return folder
        root.mkdir(parents=True, exist_ok=True)
        (name,) = src.files
        archive = root / name
        _get(archive, name, src.files[name], sums, urls, timeout, force, dataset)
        tmp = Path(tempfile.mkdtemp(prefix=f".{src.folder}.", suffix=".extract", dir=root))
        try:
            _safe_extract(archive, tmp)
            out = tmp / src.folder
            missing = [n for n in src.members if not (out / n).is_file()]
            if missing:
                raise ValueError(
                    f"{archive}: archive lacks {src.folder}/{missing[0]} "
                    f"(expected files {sorted(src.members)})"
                )
            for n, md5 in src.members.items():  # what is kept must be what later checks pass
                want = sums.get(n, md5)
                got = md5sum(out / n)
                if got != want:
                    raise ChecksumError(
                        f"{archive}: extracted {src.folder}/{n} has md5 {got}, expected {want}"
                        " (pass its checksum in checksums= to accept other files)"
                    )
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(out, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    folder.mkdir(parents=True, exist_ok=True)
    for name, md5 in src.files.items():
        _get(folder / name, name, md5, sums, urls, timeout, force, dataset)
    return folder


def _get(
    dest: Path,
    name: str,
    md5: str,
    sums: Mapping[str, str],
    urls: tuple[str, ...],
    timeout: float,
    force: bool,
    dataset: str,
) -> None:
    """Make ``dest`` a verified copy of ``name``: keep it if its MD5 matches, else fetch it
    from the first mirror that serves the right bytes."""
    expected = sums.get(name, md5)
    if not force and dest.is_file() and md5sum(dest) == expected:
        return
    errors: list[Exception] = []
    for base in urls:
        try:
            _fetch(base + name, dest, expected, timeout)
            return
        except (urllib.error.URLError, OSError, ChecksumError) as e:
            errors.append(e)
    bad = [e for e in errors if isinstance(e, ChecksumError)]
    if bad:
        raise bad[-1]
    raise OSError(
        f"{dest}: could not download {name} of dataset {dataset!r} from "
        f"{[b + name for b in urls]}: {'; '.join(str(e) for e in errors)}; check the "
        f"connection, or put the official files into {dest.parent} (or pass base_url / "
        "--base-url: a mirror holding them)"
    )
