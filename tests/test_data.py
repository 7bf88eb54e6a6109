"""Dataset readers (real files when present, corrupt fixtures always), augmentation, loader."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from tdcompress.data import Augment, TensorLoader, load_dataset, random_crop, random_flip, read_idx
from tdcompress.data.readers import read_cifar


def _write_idx(path, arr: np.ndarray, magic=None, truncate=0, compress=True):
    header = bytes([0, 0, 8, arr.ndim]) if magic is None else magic
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - truncate]
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_read_idx_round_trip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "ok.gz"), a)
    _write_idx(tmp_path / "raw", a, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw"), a)
    _write_idx(tmp_path / "magic.gz", a, magic=bytes([0, 0, 9, 3]))
    with pytest.raises(ValueError, match=r"magic.gz: wrong magic number 00000903"):
        read_idx(tmp_path / "magic.gz")
    _write_idx(tmp_path / "short.gz", a, truncate=5)
    with pytest.raises(ValueError, match=r"short.gz: 35 bytes, expected 40"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(FileNotFoundError, match="missing.gz: file not found"):
        read_idx(tmp_path / "missing.gz")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="bad.gz: corrupt gzip"):
        read_idx(tmp_path / "bad.gz")


def test_read_cifar_fixture_and_errors(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (5, 3072), dtype=np.uint8)
    with open(tmp_path / "b1", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 1, 2, 3, 4]}, f)
    x, y = read_cifar(tmp_path, ["b1"])
    assert x.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(x[2, 1].ravel(), data[2, 1024:2048])  # green plane
    (tmp_path / "b2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="b2: not a readable CIFAR batch"):
        read_cifar(tmp_path, ["b2"])
    with pytest.raises(FileNotFoundError, match="b3: file not found"):
        read_cifar(tmp_path, ["b3"])


def test_real_datasets(data_root):
    x, y = load_dataset("mnist", data_root, "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    x, y = load_dataset("fashion_mnist", data_root, "test")
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10
    x, y = load_dataset("cifar10", data_root, "train")
    assert x.shape == (50000, 3, 32, 32)
    mean = x.float().div(255).mean((0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-4, rtol=0)


def test_digits_embedded():
    pytest.importorskip("sklearn")
    xtr, ytr = load_dataset("digits", None, "train")
    xte, yte = load_dataset("digits", None, "test")
    assert len(xtr) + len(xte) == 1797 and xtr.shape[1:] == (1, 8, 8)
    assert int(xtr.max()) == 255


def test_random_crop_equals_padded_slices():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 5, 7)
    out = random_crop(x, 2, torch.Generator().manual_seed(3))
    oy = torch.randint(0, 5, (6,), generator=g)
    ox = torch.randint(0, 5, (6,), generator=g)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        torch.testing.assert_close(out[i], xp[i, :, oy[i] : oy[i] + 5, ox[i] : ox[i] + 7])


def test_random_flip_flips_the_chosen_samples():
    x = torch.randn(64, 2, 4, 4)
    out = random_flip(x, torch.Generator().manual_seed(1))
    chosen = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    torch.testing.assert_close(out[chosen], x[chosen].flip(-1))
    torch.testing.assert_close(out[~chosen], x[~chosen])
    assert 10 < int(chosen.sum()) < 54


def test_loader_order_resumable_and_ddp_shards_disjoint():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    full = TensorLoader(x, y, 3, seed=5)
    full.set_epoch(2)
    a = torch.cat([b for _, b in full])
    again = TensorLoader(x, y, 3, seed=5)
    again.set_epoch(2)
    assert torch.equal(a, torch.cat([b for _, b in again]))
    assert sorted(a.tolist()) == list(range(10))
    full.set_epoch(3)
    assert not torch.equal(a, torch.cat([b for _, b in full]))
    shards = []
    for r in range(3):
        ld = TensorLoader(x, y, 4, seed=5, rank=r, world_size=3)
        ld.set_epoch(2)
        shards.append(torch.cat([b for _, b in ld]))
    assert all(len(s) == 4 for s in shards)  # 10 samples padded to 12
    assert set(torch.cat(shards).tolist()) == set(range(10))
    xb, _ = next(iter(TensorLoader(x, y, 10, shuffle=False, mean=(0.5,), std=(0.25,))))
    torch.testing.assert_close(xb[:, 0, 0, 0], (torch.arange(10) / 255 - 0.5) / 0.25)


def test_loader_augment_keeps_values_and_rejects_bad_input():
    x = torch.randint(0, 255, (8, 3, 6, 6), dtype=torch.uint8)
    xb, _ = next(iter(TensorLoader(x, torch.zeros(8), 8, augment=Augment(0, flip=False))))
    torch.testing.assert_close(xb.sum(), x.float().div(255).sum())
    with pytest.raises(ValueError, match="images must be uint8"):
        TensorLoader(x.float(), torch.zeros(8), 4)
    with pytest.raises(ValueError, match="8 images but 7 labels"):
        TensorLoader(x, torch.zeros(7), 4)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", None, "train")
