"""Download (against a local HTTP server on 127.0.0.1 only) and folder datasets."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import importlib
import io
import pickle
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from tdcompress.data.folders import image_folder, video_classes, video_frames_dataset
from tdcompress.data.readers import load_dataset

dl = importlib.import_module("tdcompress.data.download")

MNIST = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over ``tmp_path/srv``; yields (base_url, folder, request log)."""
    folder = tmp_path / "srv"
    folder.mkdir()
    log: list[str] = []

    class H(_Handler):
        def do_GET(self):
            log.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(H, directory=str(folder)))
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", folder, log
    httpd.shutdown()
    httpd.server_close()


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def _mnist_fixture(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    data = {
        MNIST[0]: rng.integers(0, 256, (6, 28, 28)),
        MNIST[1]: rng.integers(0, 10, 6),
        MNIST[2]: rng.integers(0, 256, (3, 28, 28)),
        MNIST[3]: rng.integers(0, 10, 3),
    }
    sums = {}
    for name, arr in data.items():
        raw = _idx(arr)
        (folder / name).write_bytes(raw)
        sums[name] = hashlib.md5(raw).hexdigest()
    return sums


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".")]


def test_download_mnist_good_files_saved_and_readable(server, tmp_path):
    url, srv, log = server
    sums = _mnist_fixture(srv)
    root = tmp_path / "data"
    out = dl.download("mnist", root, base_url=url, checksums=sums)
    assert out == root / "mnist"
    for name in MNIST:
        assert (out / name).read_bytes() == (srv / name).read_bytes()
    x, y = load_dataset("mnist", root, "train")
    want = gzip.decompress((srv / MNIST[0]).read_bytes())[16:]
    assert torch.equal(x.flatten(), torch.frombuffer(bytearray(want), dtype=torch.uint8))
    assert len(y) == 6 and _leftovers(root) == []
    n = len(log)
    dl.download("mnist", root, base_url=url, checksums=sums)  # present and verified: no request
    assert len(log) == n == 4


def test_download_corrupt_file_raises_and_leaves_nothing(server, tmp_path):
    url, srv, _ = server
    _mnist_fixture(srv)  # served bytes do not have the official MD5s
    root = tmp_path / "data"
    with pytest.raises(dl.ChecksumError) as e:
        dl.download("mnist", root, base_url=url)
    msg = str(e.value)
    assert MNIST[0] in msg and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg  # file and official md5
    assert list((root / "mnist").iterdir()) == []


def test_download_truncated_transfer_is_a_checksum_error(server, tmp_path):
    url, srv, _ = server
    sums = _mnist_fixture(srv)
    raw = (srv / MNIST[1]).read_bytes()
    (srv / MNIST[1]).write_bytes(raw[: len(raw) // 2])
    root = tmp_path / "data"
    with pytest.raises(dl.ChecksumError, match=MNIST[1]):
        dl.download("mnist", root, base_url=url, checksums=sums)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == [MNIST[0]]  # the good one


def test_download_missing_file_names_it(server, tmp_path):
    url, srv, _ = server
    sums = _mnist_fixture(srv)
    (srv / MNIST[2]).unlink()
    with pytest.raises(OSError, match=MNIST[2]):
        dl.download("mnist", tmp_path / "d", base_url=url, checksums=sums)
    assert _leftovers(tmp_path / "d") == []


def test_download_falls_back_to_the_next_mirror(server, tmp_path, monkeypatch):
    url, srv, log = server
    sub = srv / "mirror2"
    sub.mkdir()
    sums = _mnist_fixture(sub)
    src = dataclasses.replace(dl.SOURCES["mnist"], urls=(url + "gone/", url + "mirror2/"))
    monkeypatch.setitem(dl.SOURCES, "mnist", src)
    dl.download("mnist", tmp_path / "d", checksums=sums)
    assert all((tmp_path / "d" / "mnist" / n).is_file() for n in MNIST)
    assert log[0].startswith("/gone/") and log[1].startswith("/mirror2/")


def _pickle_batch(n: int, seed: int, label_key: str = "labels") -> bytes:
    rng = np.random.default_rng(seed)
    d = {
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        label_key.encode(): list(rng.integers(0, 10, n).tolist()),
    }
    return pickle.dumps(d)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_cifar10_extracts_official_folder(server, tmp_path):
    url, srv, _ = server
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    members = {f"cifar-10-batches-py/{n}": _pickle_batch(2, i) for i, n in enumerate(names)}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": []})
    raw = _tar(members)
    (srv / "cifar-10-python.tar.gz").write_bytes(raw)
    root = tmp_path / "data"
    sums = {"cifar-10-python.tar.gz": hashlib.md5(raw).hexdigest()}
    # the extracted files are checked too: these are not the official ones
    with pytest.raises(dl.ChecksumError, match=r"extracted cifar-10-batches-py/data_batch_1"):
        dl.download("cifar10", root, base_url=url, checksums=sums)
    assert not (root / "cifar-10-batches-py").exists() and _leftovers(root) == []
    sums.update(
        {n.split("/")[1]: hashlib.md5(d).hexdigest() for n, d in members.items()}
    )  # accepted when their checksums are given too
    out = dl.download("cifar10", root, base_url=url, checksums=sums)
    assert out == root / "cifar-10-batches-py"
    x, y = load_dataset("cifar10", root, "test")
    ref = pickle.loads(members["cifar-10-batches-py/test_batch"])
    assert torch.equal(x, torch.from_numpy(ref[b"data"].reshape(-1, 3, 32, 32)))
    assert y.tolist() == ref[b"labels"]
    assert _leftovers(root) == []  # no temp archive or extraction folder


def test_download_cifar_rejects_bad_archives(server, tmp_path):
    url, srv, _ = server
    root = tmp_path / "data"
    evil = _tar({"../escape": b"x", "cifar-100-python/train": b"y"})
    (srv / "cifar-100-python.tar.gz").write_bytes(evil)
    sums = {"cifar-100-python.tar.gz": hashlib.md5(evil).hexdigest()}
    with pytest.raises(ValueError, match="refusing to extract member '../escape'"):
        dl.download("cifar100", root, base_url=url, checksums=sums)
    assert not (tmp_path / "escape").exists() and not (root / "cifar-100-python").exists()
    partial_tar = _tar({"cifar-100-python/train": b"y"})  # lacks meta and test
    (srv / "cifar-100-python.tar.gz").write_bytes(partial_tar)
    sums = {"cifar-100-python.tar.gz": hashlib.md5(partial_tar).hexdigest()}
    with pytest.raises(ValueError, match="lacks cifar-100-python/test"):
        dl.download("cifar100", root, base_url=url, checksums=sums)
    assert not (root / "cifar-100-python").exists() and _leftovers(root) == []


def test_download_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset='imagenet'.*cifar10"):
        dl.download("imagenet", tmp_path)
    with pytest.raises(ValueError, match="root"):
        dl.download("mnist", None)
    assert dl.download("digits", tmp_path) is None
    assert dl.md5sum(Path(__file__)) == hashlib.md5(Path(__file__).read_bytes()).hexdigest()


def test_image_folder_without_torchvision_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"tdcompress\[vision\]"):
        image_folder(tmp_path, "train")
    with pytest.raises(ValueError, match="split.*'test'"):
        image_folder(tmp_path, "test")


def _write_video(folder: Path, names: list[str], colors: list[tuple[int, int, int]], hw=(6, 8)):
    from PIL import Image

    folder.mkdir(parents=True)
    for name, c in zip(names, colors):
        Image.fromarray(np.full((*hw, 3), c, np.uint8)).save(folder / name)


def test_video_frames_dataset_reads_samples_and_resizes(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "ucf"
    # frame names sort numerically: f2 before f10; colors encode the true frame number
    names = ["f1.png", "f2.png", "f3.png", "f10.png", "f11.png"]
    _write_video(root / "walk" / "v1", names, [(10 * k, 0, 255 - k) for k in (1, 2, 3, 10, 11)])
    _write_video(root / "biking" / "v1", ["a.png", "b.png"], [(1, 2, 3), (4, 5, 6)])
    x, y = video_frames_dataset(root, frames=3, size=(3, 4))
    assert video_classes(root) == ["biking", "walk"]
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 3, 3, 4)
    assert y.tolist() == [0, 1]
    # biking: 2 frames, 3 evenly spaced picks -> frames 0, 0 (round half to even), 1
    assert x[0, :, :, 0, 0].tolist() == [[1, 2, 3], [1, 2, 3], [4, 5, 6]]
    # walk: picks 0, 2, 4 of f1 f2 f3 f10 f11 -> f1, f3, f11
    assert x[1, :, :, 2, 3].tolist() == [[10, 0, 254], [30, 0, 252], [110, 0, 244]]
    assert bool((x[1] == x[1, :, :, :1, :1]).all())  # solid frames stay solid when resized
    xf, yf = video_frames_dataset(root, frames=3, size=(3, 4), flatten=True)
    assert torch.equal(xf, x.reshape(2, 3, 36)) and torch.equal(yf, y)


def test_video_frames_dataset_layout_at_native_size_and_greyscale(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    root = tmp_path / "v"
    (root / "c" / "v").mkdir(parents=True)
    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    pil.fromarray(img).save(root / "c" / "v" / "0.png")
    x, _ = video_frames_dataset(root, frames=1, size=(5, 7))
    assert torch.equal(x[0, 0], torch.from_numpy(img).permute(2, 0, 1))
    g, _ = video_frames_dataset(root, frames=1, size=(5, 7), mode="L")
    ref = np.asarray(pil.fromarray(img).convert("L"))
    assert g.shape == (1, 1, 1, 5, 7) and torch.equal(g[0, 0, 0], torch.from_numpy(ref.copy()))


def test_video_frames_dataset_errors(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        video_frames_dataset(tmp_path / "nowhere")
    (tmp_path / "r" / "cls" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty: no frames"):
        video_frames_dataset(tmp_path / "r")
    (tmp_path / "r" / "cls" / "empty" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"1\.png: not a readable image"):
        video_frames_dataset(tmp_path / "r")
    with pytest.raises(ValueError, match="frames.*0"):
        video_frames_dataset(tmp_path / "r", frames=0)
    with pytest.raises(ValueError, match="size"):
        video_frames_dataset(tmp_path / "r", size=(4,))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="Pillow"):
        video_frames_dataset(tmp_path / "r")


@pytest.mark.data
def test_official_checksums_match_the_real_files_and_skip_download(data_root, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although the files are present and verified")

    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)
    for name in ("mnist", "fashion_mnist", "cifar10"):
        src = dl.SOURCES[name]
        folder = data_root / src.folder
        if not folder.is_dir():
            continue
        for fname, md5 in (src.members if src.archive else src.files).items():
            assert dl.md5sum(folder / fname) == md5, fname
        if not src.archive:
            assert dl.download(name, data_root) == folder


def test_validation_split_is_one_fixed_held_out_draw() -> None:
    from tdcompress.config import DataConfig
    from tdcompress.data import make_loaders, validation_split

    x = torch.arange(100).view(100, 1, 1, 1).to(torch.uint8)
    y = torch.arange(100) % 7
    xtr, ytr, xv, yv = validation_split(x, y, 30)
    tr, va = set(xtr.flatten().tolist()), set(xv.flatten().tolist())
    assert len(tr) == 70 and len(va) == 30 and not tr & va and tr | va == set(range(100))
    assert xtr.flatten().tolist() == sorted(tr)  # original order kept
    torch.testing.assert_close(yv, xv.flatten().long() % 7)  # labels travel with their images
    assert validation_split(x, y, 30)[2].equal(xv)  # the same draw every time
    for bad in (0, 100, -1, 2.5, True):
        with pytest.raises(ValueError, match="data.validation must be an int in"):
            validation_split(x, y, bad)
    cfg = DataConfig(dataset="synthetic", validation=50, batch_size=16, eval_batch_size=64)
    full = make_loaders(DataConfig(dataset="synthetic"), device=torch.device("cpu"))
    train, held, info = make_loaders(cfg, device=torch.device("cpu"), seed=3)
    n = len(full[0].images)
    assert len(train.images) == n - 50 and len(held.images) == 50
    assert info["evaluated_on"].startswith("validation (50")
    # the held-out images are training images, not test images
    pool = {bytes(t.numpy()) for t in full[0].images}
    assert all(bytes(t.numpy()) in pool for t in held.images)
    assert full[2]["evaluated_on"] == "test"


def test_config_refuses_negative_validation() -> None:
    from tdcompress.config import load_config

    cfg = Path(__file__).resolve().parents[1] / "configs" / "mnist_lenet5_tt_small.yaml"
    assert load_config(cfg, ["data.validation=5000"]).data.validation == 5000
    with pytest.raises(ValueError, match="data.validation must be an int >= 0"):
        load_config(cfg, ["data.validation=-1"])
