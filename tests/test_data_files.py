"""Dataset file loaders on tiny files in the real published formats, and verified downloads."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from formats import MNIST_NAMES, idx_bytes, random_mnist, write_mnist

from memkern.data import sources
from memkern.data.cifar10 import load_cifar10
from memkern.data.download import fetch
from memkern.data.mnist import load_mnist
from memkern.data.svhn import load_svhn
from memkern.errors import ConfigError, DataError



@pytest.fixture
def rng(request):
    # One stream per test, reproducible from the test's name.
    return np.random.default_rng(int.from_bytes(hashlib.md5(request.node.nodeid.encode()).digest()[:4], "little"))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- file writers


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str the way Python 2's cPickle wrote its str: as (SHORT_)BINSTRING.

    Real CIFAR-10 batches come from Python 2, so their keys and the array's raw data are
    BINSTRINGs. Python 3's protocol 2 writes bytes as a call to _codecs.encode instead, a
    global no real batch references (and the loader refuses).
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its own module; the real files name numpy 1's (GLOBAL is text, no length).
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(rng, n: int) -> dict:
    """A batch with exactly the keys and types of a real one (bytes keys once loaded)."""
    return {
        "batch_label": "training batch 1 of 5",
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(folder: Path, rng, n=4) -> dict:
    batches = {name: cifar_batch(rng, n) for name in CIFAR_FILES}
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    for name, batch in batches.items():
        (folder / "cifar-10-batches-py" / name).write_bytes(py2_dumps(batch))
    return batches


def tar_folder(src: Path, archive: Path, arcname: str = "cifar-10-batches-py") -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=arcname)


def random_svhn(rng, n):
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10  # always exercise the 10 -> 0 mapping
    return x, y


def write_svhn(folder: Path, rng) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    mats = {"train": random_svhn(rng, 6), "test": random_svhn(rng, 3)}
    for split, (x, y) in mats.items():
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return mats


# ----------------------------------------------------------------------------------- MNIST


def assert_mnist_equal(splits, arrays):
    assert str(splits.train_images.dtype) == "torch.uint8" and str(splits.test_labels.dtype) == "torch.int64"
    np.testing.assert_array_equal(splits.train_images.numpy(), arrays["train_x"][:, None])
    np.testing.assert_array_equal(splits.train_labels.numpy(), arrays["train_y"])
    np.testing.assert_array_equal(splits.test_images.numpy(), arrays["test_x"][:, None])
    np.testing.assert_array_equal(splits.test_labels.numpy(), arrays["test_y"])
    assert splits.num_classes == 10 and splits.in_channels == 1 and splits.image_size == 28


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["", "mnist", "mnist/raw", "MNIST/raw"])
def test_mnist_round_trip(tmp_path, rng, gz, layout):
    arrays = random_mnist(rng)
    write_mnist(tmp_path / layout, arrays, gz=gz)
    assert_mnist_equal(load_mnist(tmp_path), arrays)


def test_fashion_mnist_not_confused_with_mnist_in_same_dir(tmp_path, rng):
    digits, fashion = random_mnist(rng), random_mnist(rng, n_train=5, n_test=2)
    write_mnist(tmp_path, digits, gz=True)
    write_mnist(tmp_path / "FashionMNIST" / "raw", fashion, gz=False)
    assert_mnist_equal(load_mnist(tmp_path), digits)
    out = load_mnist(tmp_path, variant="fashion-mnist")
    assert out.name == "fashion-mnist"
    assert_mnist_equal(out, fashion)


def test_mnist_unknown_variant(tmp_path):
    with pytest.raises(ConfigError, match="unknown MNIST variant 'kmnist'"):
        load_mnist(tmp_path, variant="kmnist")


def test_mnist_missing_dir(tmp_path):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist.*--download"):
        load_mnist(tmp_path / "nowhere")


def test_mnist_missing_file(tmp_path, rng):
    write_mnist(tmp_path, random_mnist(rng), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"mnist files not found.*t10k-labels-idx1-ubyte.*--download"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_truncated(tmp_path, rng, gz):
    arrays = random_mnist(rng)
    write_mnist(tmp_path, arrays, gz=False)
    raw = idx_bytes(arrays["train_x"])
    path = tmp_path / MNIST_NAMES["train_x"]
    path.unlink()
    cut = raw[:-100]
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(cut))
    else:
        path.write_bytes(cut)
    with pytest.raises(DataError, match=rf"truncated: .*implies {len(raw)} bytes, it has {len(cut)}"):
        load_mnist(tmp_path)


def test_mnist_truncated_header(tmp_path, rng):
    arrays = random_mnist(rng)
    write_mnist(tmp_path, arrays, gz=False)
    (tmp_path / MNIST_NAMES["test_x"]).write_bytes(idx_bytes(arrays["test_x"])[:10])
    with pytest.raises(DataError, match="truncated: a 3-d idx header needs 16 bytes, it has 10"):
        load_mnist(tmp_path)


def test_mnist_huge_header_dims(tmp_path, rng):
    arrays = random_mnist(rng)
    write_mnist(tmp_path, arrays, gz=False)
    raw = bytearray(idx_bytes(arrays["train_x"]))
    raw[4:16] = b"\xff" * 12  # dims 2^32-1 each: their product overflows int64
    (tmp_path / MNIST_NAMES["train_x"]).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"truncated: .*implies {16 + (2**32 - 1) ** 3} bytes"):
        load_mnist(tmp_path)


def test_mnist_trailing_bytes(tmp_path, rng):
    arrays = random_mnist(rng)
    write_mnist(tmp_path, arrays, gz=False)
    with open(tmp_path / MNIST_NAMES["test_y"], "ab") as f:
        f.write(b"\x01\x02")
    with pytest.raises(DataError, match="has 2 bytes beyond"):
        load_mnist(tmp_path)


def test_mnist_wrong_magic(tmp_path, rng):
    arrays = random_mnist(rng)
    arrays["train_x"] = arrays["train_y"]  # a labels file where the images belong
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match="expected magic 0x00000803, found 0x00000801"):
        load_mnist(tmp_path)


def test_mnist_corrupt_gz(tmp_path, rng):
    write_mnist(tmp_path, random_mnist(rng), gz=True)
    path = tmp_path / (MNIST_NAMES["train_y"] + ".gz")
    raw = bytearray(path.read_bytes())
    raw[12:20] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()  # inside the deflate stream
    path.write_bytes(bytes(raw[:-6]))
    with pytest.raises(DataError, match="not a valid gzip file"):
        load_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path, rng):
    arrays = random_mnist(rng)
    arrays["test_y"][1] = 10
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match=r"t10k labels hold 10, outside 0\.\.9"):
        load_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path, rng):
    arrays = random_mnist(rng)
    arrays["train_y"] = arrays["train_y"][:-1]
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match="train split has 7 images but 6 labels"):
        load_mnist(tmp_path)


# -------------------------------------------------------------------------------- CIFAR-10


def assert_cifar_equal(splits, batches):
    train = [batches[n] for n in CIFAR_FILES[:5]]
    want_x = np.concatenate([b["data"] for b in train]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(splits.train_images.numpy(), want_x)
    np.testing.assert_array_equal(splits.train_labels.numpy(), sum((b["labels"] for b in train), []))
    np.testing.assert_array_equal(splits.test_images.numpy(), batches["test_batch"]["data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(splits.test_labels.numpy(), batches["test_batch"]["labels"])
    assert str(splits.train_images.dtype) == "torch.uint8" and str(splits.test_labels.dtype) == "torch.int64"
    assert splits.num_classes == 10 and splits.in_channels == 3 and splits.image_size == 32


def test_cifar_batch_pickle_references_only_numpy_globals(rng):
    # The test batches must look like real ones to the unpickler: no _codecs, numpy only.
    import pickletools

    names = {a for op, a, _ in pickletools.genops(py2_dumps(cifar_batch(rng, 2))) if op.name == "GLOBAL"}
    assert names == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


@pytest.mark.parametrize("layout", ["", "cifar10"])
def test_cifar_round_trip(tmp_path, rng, layout):
    batches = write_cifar(tmp_path / layout, rng)
    assert_cifar_equal(load_cifar10(tmp_path), batches)


def test_cifar_from_archive(tmp_path, rng):
    batches = write_cifar(tmp_path / "src", rng)
    (tmp_path / "data").mkdir()
    tar_folder(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "data" / "cifar-10-python.tar.gz")
    assert_cifar_equal(load_cifar10(tmp_path / "data"), batches)
    assert sorted(p.name for p in (tmp_path / "data" / "cifar-10-batches-py").iterdir()) == sorted(CIFAR_FILES)


def test_cifar_archive_cannot_escape(tmp_path, rng):
    batches = write_cifar(tmp_path / "src", rng)
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "cifar-10-python.tar.gz"
    tar_folder(tmp_path / "src" / "cifar-10-batches-py", archive)
    payload = b"escaped"
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for m, content in members:
            tar.addfile(m, io.BytesIO(content) if content is not None else None)
        for evil in ["../escaped.txt", "cifar-10-batches-py/../../escaped2.txt", str(tmp_path / "escaped3.txt")]:
            info = tarfile.TarInfo(evil)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert_cifar_equal(load_cifar10(data), batches)
    assert not any(tmp_path.glob("escaped*")) and not any(data.glob("escaped*"))


def test_cifar_archive_with_link_refused(tmp_path, rng):
    write_cifar(tmp_path / "src", rng)
    batch_dir = tmp_path / "src" / "cifar-10-batches-py"
    (batch_dir / "data_batch_1").unlink()
    (batch_dir / "data_batch_1").symlink_to("/etc/passwd")
    (tmp_path / "data").mkdir()
    tar_folder(batch_dir, tmp_path / "data" / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_1; it is not the CIFAR-10 python archive"):
        load_cifar10(tmp_path / "data")


def test_cifar_corrupt_archive(tmp_path, rng):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(gzip.compress(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())[:-20])
    with pytest.raises(DataError, match="is not a readable tar.gz"):
        load_cifar10(tmp_path)


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_never_runs(tmp_path, rng):
    write_cifar(tmp_path, rng)
    marker = tmp_path / "pwned"
    evil = dict(cifar_batch(rng, 4), labels=_RunsCommand(marker))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(py2_dumps(evil))
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR-10 batch \(refused global (posix|nt|os)\.system\)"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_cifar_wrong_structure(tmp_path, rng):
    write_cifar(tmp_path, rng)
    batch = cifar_batch(rng, 4)
    del batch["labels"]
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(py2_dumps(batch))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 batch: expected b'labels'"):
        load_cifar10(tmp_path)


def test_cifar_garbage_batch(tmp_path, rng):
    write_cifar(tmp_path, rng)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR-10 batch"):
        load_cifar10(tmp_path)


def test_cifar_missing(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 files not found.*cifar-10-batches-py/ or cifar-10-python.tar.gz"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------------ SVHN


def assert_svhn_equal(splits, mats):
    for split in ["train", "test"]:
        x, y = mats[split]
        images, labels = getattr(splits, f"{split}_images").numpy(), getattr(splits, f"{split}_labels").numpy()
        np.testing.assert_array_equal(images, x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
        np.testing.assert_array_equal(labels, y[:, 0] % 10)
        assert labels[0] == 0 and labels.dtype == np.int64
    assert splits.num_classes == 10 and splits.in_channels == 3 and splits.image_size == 32


@pytest.mark.parametrize("layout", ["", "svhn"])
def test_svhn_round_trip(tmp_path, rng, layout):
    mats = write_svhn(tmp_path / layout, rng)
    assert_svhn_equal(load_svhn(tmp_path), mats)


def test_svhn_not_a_mat(tmp_path, rng):
    write_svhn(tmp_path, rng)
    (tmp_path / "test_32x32.mat").write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(DataError, match="test_32x32.mat is not an SVHN MATLAB v5 file"):
        load_svhn(tmp_path)


def test_svhn_missing_keys(tmp_path, rng):
    write_svhn(tmp_path, rng)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"images": rng.integers(0, 256, (4, 4), dtype=np.uint8)})
    with pytest.raises(DataError, match="train_32x32.mat lacks the variables X and y"):
        load_svhn(tmp_path)


def test_svhn_missing_file(tmp_path, rng):
    write_svhn(tmp_path, rng)
    (tmp_path / "train_32x32.mat").unlink()
    with pytest.raises(DataError, match=r"svhn files not found.*train_32x32.mat"):
        load_svhn(tmp_path)


# -------------------------------------------------------------------------------- download


class _Handler(http.server.SimpleHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold the server thread forever

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requested.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server over tmp_path/served, set as the mirror. Yields (served_dir, requests)."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(served)))
    httpd.requested = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv(sources.MIRROR_ENV, f"http://127.0.0.1:{httpd.server_address[1]}")
    try:
        yield served, httpd.requested
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def publish(monkeypatch, dataset: str, folder: Path) -> None:
    """Point SOURCES[dataset] at the md5s of the files in ``folder`` (the served copies)."""
    names = list(sources.SOURCES[dataset].md5)
    monkeypatch.setitem(sources.SOURCES, dataset, sources.Source("http://unused.invalid/", {n: md5(folder / n) for n in names}))


def serve_dataset(dataset, served, rng):
    """Write ``dataset``'s published files into served/<dataset>/; returns the expected arrays."""
    folder = served / dataset
    if dataset in ("mnist", "fashion-mnist"):
        arrays = random_mnist(rng)
        write_mnist(folder, arrays, gz=True)
        return arrays
    if dataset == "cifar10":
        batches = write_cifar(served / "build", rng)
        folder.mkdir()
        tar_folder(served / "build" / "cifar-10-batches-py", folder / "cifar-10-python.tar.gz")
        return batches
    return write_svhn(folder, rng)


LOADERS = {
    "mnist": (load_mnist, assert_mnist_equal),
    "fashion-mnist": (functools.partial(load_mnist, variant="fashion-mnist"), assert_mnist_equal),
    "cifar10": (load_cifar10, assert_cifar_equal),
    "svhn": (load_svhn, assert_svhn_equal),
}


@pytest.mark.parametrize("dataset", list(LOADERS))
def test_download_fetches_verifies_and_loads(tmp_path, rng, server, monkeypatch, dataset):
    served, requested = server
    expected = serve_dataset(dataset, served, rng)
    publish(monkeypatch, dataset, served / dataset)
    load, check = LOADERS[dataset]
    data = tmp_path / "data"
    check(load(data, download=True), expected)
    names = list(sources.SOURCES[dataset].md5)
    assert sorted(requested) == sorted(f"/{dataset}/{n}" for n in names)
    for n in names:
        assert md5(data / dataset / n) == sources.SOURCES[dataset].md5[n]
    check(load(data, download=True), expected)  # everything present now: no second request
    assert len(requested) == len(names)


def test_download_fetches_only_missing(tmp_path, rng, server, monkeypatch):
    served, requested = server
    arrays = serve_dataset("mnist", served, rng)
    publish(monkeypatch, "mnist", served / "mnist")
    have = tmp_path / "mnist"
    have.mkdir()
    shutil.copy(served / "mnist" / "train-images-idx3-ubyte.gz", have)
    (have / "t10k-images-idx3-ubyte").write_bytes(gzip.decompress((served / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()))
    assert_mnist_equal(load_mnist(tmp_path, download=True), arrays)
    assert sorted(requested) == ["/mnist/t10k-labels-idx1-ubyte.gz", "/mnist/train-labels-idx1-ubyte.gz"]


def test_download_md5_mismatch_leaves_nothing(tmp_path, rng, server, monkeypatch):
    served, _ = server
    serve_dataset("svhn", served, rng)
    publish(monkeypatch, "svhn", served / "svhn")
    good = sources.SOURCES["svhn"].md5["test_32x32.mat"]
    wrong = hashlib.md5(rng.bytes(16)).hexdigest()
    monkeypatch.setitem(sources.SOURCES["svhn"].md5, "test_32x32.mat", wrong)
    data = tmp_path / "data"
    with pytest.raises(DataError, match=rf"test_32x32.mat: md5 {good} does not match the published {wrong}"):
        load_svhn(data, download=True)
    assert sorted(p.name for p in (data / "svhn").iterdir()) == ["train_32x32.mat"]  # no partial file


def test_download_404(tmp_path, rng, server, monkeypatch):
    served, _ = server
    serve_dataset("mnist", served, rng)
    publish(monkeypatch, "mnist", served / "mnist")
    (served / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    data = tmp_path / "data"
    with pytest.raises(DataError, match=r"could not download .*t10k-images-idx3-ubyte.gz \(HTTP 404 .*\); "
                       r"place these files in --data-dir by hand .*: t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"):
        load_mnist(data, download=True)
    assert not [p for p in (data / "mnist").iterdir() if p.name.endswith(".part")]


def test_fetch_connection_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request: nothing listens
    with pytest.raises(DataError, match=rf"could not download http://127.0.0.1:{port}/x.bin"):
        fetch(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_file_url_mirror_override(monkeypatch):
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    assert sources.file_url("svhn", "test_32x32.mat") == "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"
    monkeypatch.setenv(sources.MIRROR_ENV, "http://env.example/data/")
    assert sources.file_url("mnist", "a.gz") == "http://env.example/data/mnist/a.gz"
    assert sources.file_url("mnist", "a.gz", mirror="http://arg.example") == "http://arg.example/mnist/a.gz"
