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
    # a flipped byte inside the deflate stream: zlib's own error, named as corrupt too
    _write_idx(tmp_path / "ok.gz", a)
    good = bytearray((tmp_path / "ok.gz").read_bytes())
    hits = 0
    for k in range(12, len(good) - 8):
        flipped = bytearray(good)
        flipped[k] ^= 0xFF
        (tmp_path / "flip.gz").write_bytes(bytes(flipped))
        try:
            read_idx(tmp_path / "flip.gz")
        except ValueError as e:
            assert "flip.gz" in str(e)
            hits += 1
    assert hits > 0


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
        TensorLoader(x.long(), torch.zeros(8), 4)
    with pytest.raises(ValueError, match="float inputs"):  # features are used as given
        TensorLoader(x.float(), torch.zeros(8), 4, augment=Augment(0, flip=False))
    with pytest.raises(ValueError, match="float inputs"):
        TensorLoader(x.float(), torch.zeros(8), 4, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="8 images but 7 labels"):
        TensorLoader(x, torch.zeros(7), 4)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", None, "train")


def _mnist_folder(folder, n=6, labels=None, images_shape=None, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, images_shape or (n, 28, 28), dtype=np.uint8)
    labs = np.asarray(labels if labels is not None else rng.integers(0, 10, n), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", imgs, compress=gz)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labs, compress=gz)
    return imgs, labs


def test_mnist_folder_reader_uncompressed_fallback_and_dims_errors(tmp_path):
    imgs, labs = _mnist_folder(tmp_path / "mnist", gz=False)
    x, y = load_dataset("mnist", tmp_path, "test")
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(imgs)[:, None]) and y.tolist() == labs.tolist()
    assert isinstance(read_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte"), torch.Tensor)
    _mnist_folder(tmp_path / "a" / "mnist", n=6, labels=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: 6 images but .* 5 labels"):
        load_dataset("mnist", tmp_path / "a", "test")
    _mnist_folder(tmp_path / "b" / "mnist", images_shape=(6, 784))
    with pytest.raises(ValueError, match=r"dimensions \[6, 784\], expected 3"):
        load_dataset("mnist", tmp_path / "b", "test")
    _mnist_folder(tmp_path / "c" / "fashion-mnist", n=3, labels=[0, 10, 2])
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte.gz: labels in \[0, 10\], expected"):
        load_dataset("fashion_mnist", tmp_path / "c", "test")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz: file not found"):
        load_dataset("mnist", tmp_path, "train")
    with pytest.raises(ValueError, match="needs a data root.*root=None"):
        load_dataset("cifar10", None, "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_dataset("mnist", tmp_path, "val")


def test_cifar100_folder_reader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.random.default_rng(2).integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": [0, 99, 42, 7], b"coarse_labels": [0] * 4}, f)
    x, y = load_dataset("cifar100", tmp_path, "test")
    assert torch.equal(x, torch.from_numpy(data).view(4, 3, 32, 32)) and y.tolist() == [
        0,
        99,
        42,
        7,
    ]
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": [0, 100, 1, 2]}, f)
    with pytest.raises(ValueError, match=r"train: labels in \[0, 100\], expected \[0, 99\]"):
        load_dataset("cifar100", tmp_path, "train")
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": data[:, :100], b"fine_labels": [0, 1, 1, 2]}, f)
    with pytest.raises(ValueError, match=r"data of shape \(4, 100\).*expected \(N, 3072\)"):
        load_dataset("cifar100", tmp_path, "train")


def test_verify_checksum_mismatch_names_the_file(tmp_path):
    from tdcompress.data.download import ChecksumError

    _mnist_folder(tmp_path / "mnist")  # right format, but not the official bytes
    load_dataset("mnist", tmp_path, "test")  # reads fine without verification
    with pytest.raises(ChecksumError, match=r"t10k-images-idx3-ubyte.gz: checksum mismatch.*9fb6"):
        load_dataset("mnist", tmp_path, "test", verify=True)


def test_verify_refuses_an_unknown_split(tmp_path):
    from tdcompress.data.readers import verify_files

    with pytest.raises(ValueError, match=r"split must be None, 'train' or 'test', got 'val'"):
        verify_files("mnist", tmp_path, split="val")


def test_verify_real_files(data_root):
    x, y = load_dataset("mnist", data_root, "test", verify=True)
    assert x.shape == (10000, 1, 28, 28) and len(y) == 10000


def test_to_float_and_normalize_match_the_formula():
    from tdcompress.data.augment import normalize, to_float

    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    ref = (x.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(
        std
    ).double().view(1, 3, 1, 1)
    torch.testing.assert_close(to_float(x, mean, std, torch.float64), ref)
    torch.testing.assert_close(normalize(x.double() / 255, mean, std), ref)
    torch.testing.assert_close(to_float(x), (x.double() / 255).float())
    with pytest.raises(ValueError, match=r"mean=\(0.1, 0.2\) has 2 values, expected 1 or one"):
        to_float(x, (0.1, 0.2), (1.0,))
    with pytest.raises(ValueError, match="std must be > 0"):
        normalize(x.float(), (0.0,), (0.0,))
    with pytest.raises(TypeError, match="x must be uint8"):
        to_float(x.float())
    with pytest.raises(ValueError, match="padding must be an int >= 0, got -1"):
        random_crop(x, -1)
    with pytest.raises(ValueError, match=r"x must be a \(N, C, H, W\) tensor, got \(3, 4, 4\)"):
        random_flip(x[0])


def test_loader_batches_equal_per_sample_augmentation_oracle():
    """Every batch equals: permutation from the epoch generator, then per sample a padded
    slice at the drawn offsets, a torch.flip where drawn, and (x/255 - mean)/std."""
    n, bs, pad = 10, 4, 2
    x = torch.randint(0, 256, (n, 3, 5, 6), dtype=torch.uint8)
    y = torch.arange(n) % 3
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    ld = TensorLoader(x, y, bs, seed=7, augment=Augment(pad, True), mean=mean, std=std)
    ld.set_epoch(4)
    batches = list(ld)
    assert len(batches) == len(ld) == 3
    g = torch.Generator().manual_seed(7 * 100_003 + 4)
    perm = torch.randperm(n, generator=g)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for b, (xb, yb) in enumerate(batches):
        sel = perm[b * bs : (b + 1) * bs]
        k = len(sel)
        oy = torch.randint(0, 2 * pad + 1, (k,), generator=g)
        ox = torch.randint(0, 2 * pad + 1, (k,), generator=g)
        flip = torch.rand(k, generator=g) < 0.5
        assert torch.equal(yb, y[sel])
        xp = torch.nn.functional.pad(x[sel].double(), (pad,) * 4)
        for i in range(k):
            crop = xp[i, :, oy[i] : oy[i] + 5, ox[i] : ox[i] + 6]
            crop = crop.flip(-1) if flip[i] else crop
            torch.testing.assert_close(xb[i], ((crop / 255 - m) / s).float())
    ld64 = TensorLoader(x, y, bs, seed=7, augment=Augment(pad, True), dtype=torch.float64)
    ld64.set_epoch(4)
    assert next(iter(ld64))[0].dtype == torch.float64


def test_loader_ddp_shards_partition_the_padded_permutation_and_drop_last():
    n, ws = 10, 4
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    y = torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 100_003 + 1))
    padded = torch.cat([perm, perm[: 12 - n]])  # ceil(10 / 4) = 3 per rank
    for drop_last in (False, True):
        for r in range(ws):
            ld = TensorLoader(x, y, 2, seed=3, rank=r, world_size=ws, drop_last=drop_last)
            ld.set_epoch(1)
            got = torch.cat([b for _, b in ld])
            assert len(ld) == (1 if drop_last else 2)
            expect = padded[r::ws]
            assert torch.equal(got, expect[:2] if drop_last else expect)
    # world_size dividing N: the shares are disjoint and cover the data set exactly once
    shares = []
    for r in range(5):
        ld = TensorLoader(x, y, 3, seed=3, rank=r, world_size=5)
        shares.append(torch.cat([b for _, b in ld]).tolist())
    flat = sum(shares, [])
    assert sorted(flat) == list(range(n)) and all(len(s) == 2 for s in shares)
    # fewer samples than ranks: every rank still gets its padded share (len() says so)
    for n_small, ws in ((1, 4), (3, 8)):
        xs, ys = x[:n_small], y[:n_small]
        for r in range(ws):
            ld = TensorLoader(xs, ys, 2, seed=3, rank=r, world_size=ws)
            got = [b for _, b in ld]
            assert len(got) == len(ld) == 1 and len(got[0]) == 1
            assert int(got[0]) < n_small
    with pytest.raises(ValueError, match="rank must be in \\[0, world_size=2\\), got 2"):
        TensorLoader(x, y, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        TensorLoader(x, y, 0)


def test_digits_split_is_fixed_disjoint_and_lossless():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    xtr, ytr = load_dataset("digits", None, "train")
    xte, yte = load_dataset("digits", None, "test")
    assert (len(xtr), len(xte)) == (1437, 360)
    x2, y2 = load_dataset("digits", "/nonexistent", "train")  # root is ignored
    assert torch.equal(xtr, x2) and torch.equal(ytr, y2)
    # 0..16 -> 0..255 is invertible: recover sklearn's values and compare the multisets
    back = torch.cat([xtr, xte]).double().mul(16 / 255).round().view(-1, 64)
    rows = sorted(map(tuple, torch.cat([back, torch.cat([ytr, yte])[:, None]], 1).tolist()))
    ref = np.concatenate([d.data, d.target[:, None]], 1)
    assert rows == sorted(map(tuple, ref.astype(float).tolist()))


def test_unpadded_eval_shards_see_every_sample_exactly_once():
    n = 10
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    y = torch.arange(n)
    for ws in (1, 3, 4, 7):
        shares = []
        for r in range(ws):
            ld = TensorLoader(x, y, 3, shuffle=False, rank=r, world_size=ws, pad=False)
            got = [b for _, b in ld]
            assert len(got) == len(ld)
            shares.append(torch.cat(got).tolist() if got else [])
            assert len(shares[-1]) == ld.num_samples
        assert sorted(sum(shares, [])) == list(range(n))  # no sample twice, none missing
    # make_loaders builds its test loader this way
    from tdcompress.config import DataConfig
    from tdcompress.data import make_loaders

    _, test, _ = make_loaders(DataConfig(dataset="synthetic"), device="cpu", rank=1, world_size=3)
    assert test.pad is False and test.num_samples == len(range(1, len(test.images), 3))
