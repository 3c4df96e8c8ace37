"""The user's data: ``folder:PATH`` (ImageFolder PNG/JPEG tree) and ``npz:FILE`` (arrays) load
exactly the images they were written from, train like the built-in datasets, and bad files get
one line."""
import json

import numpy as np
import pytest
import torch
from cli_checks import assert_one_line_error, run_cli
from PIL import Image

from memkern.data import load_dataset, prepare

CLASSES = ("cat", "ant", "bee")  # not in sorted order: labels follow the sorted names


def structured_images(n: int, channels: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 [n, channels, size, size]: a class-like gradient plus noise (not constant)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size)[None, None, None, :]
    return (ramp + rng.integers(0, 56, (n, channels, size, size))).astype(np.uint8)


def write_folder(root, images: dict, labels: dict, *, suffix=".png"):
    """``images[split]`` uint8 [N, C, S, S], ``labels[split]`` indices into CLASSES."""
    for split in images:
        for i, (x, y) in enumerate(zip(images[split], labels[split])):
            folder = root / split / CLASSES[y]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
            Image.fromarray(pixels).save(folder / f"img{i:03d}{suffix}")


def expected_order(images: np.ndarray, labels: np.ndarray):
    """The folder loader's order: classes by sorted name, files by name within each class."""
    names = sorted(CLASSES)
    order = sorted(range(len(labels)), key=lambda i: (names.index(CLASSES[labels[i]]), i))
    return images[order], np.array([names.index(CLASSES[labels[i]]) for i in order])


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_loads_the_pngs_it_was_written_from(tmp_path, channels):
    images = {"train": structured_images(13, channels),
              "test": structured_images(5, channels, seed=1)}
    labels = {"train": np.arange(13) % 3, "test": np.array([2, 0, 1, 0, 2])}
    write_folder(tmp_path / "data", images, labels)
    raw = load_dataset(f"folder:{tmp_path / 'data'}")
    assert raw.name == f"folder:{tmp_path / 'data'}" and raw.num_classes == 3
    for split in ("train", "test"):
        want_x, want_y = expected_order(images[split], labels[split])
        got_x, got_y = getattr(raw, f"{split}_images"), getattr(raw, f"{split}_labels")
        assert got_x.dtype == torch.uint8 and got_x.shape == (len(want_y), channels, 8, 8)
        assert np.array_equal(got_x.numpy(), want_x)
        assert np.array_equal(got_y.numpy(), want_y)


def test_folder_mixing_grey_and_colour_reads_all_as_rgb(tmp_path):
    grey = structured_images(4, 1)
    write_folder(tmp_path / "d", {"train": grey, "test": grey[:2]},
                 {"train": np.array([0, 1, 2, 0]), "test": np.array([0, 1])})
    rgb = structured_images(1, 3, seed=3)
    Image.fromarray(rgb[0].transpose(1, 2, 0)).save(tmp_path / "d" / "train" / "ant" / "z.png")
    raw = load_dataset(f"folder:{tmp_path / 'd'}")
    assert raw.in_channels == 3
    ant = raw.train_images[raw.train_labels == 0]  # "ant" sorts first
    assert np.array_equal(ant[-1].numpy(), rgb[0])  # z.png sorts last in its class
    assert all(torch.equal(x[0], x[1]) and torch.equal(x[0], x[2]) for x in ant[:-1])


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw", "float"])
def test_npz_loads_the_arrays_it_was_written_from(tmp_path, layout):
    channels = 1 if layout == "nhw" else 3
    x_train, x_test = structured_images(11, channels), structured_images(4, channels, seed=2)
    y_train, y_test = np.arange(11) % 4, np.array([3, 1, 0, 2])
    stored = {"nchw": lambda x: x, "nhwc": lambda x: x.transpose(0, 2, 3, 1),
              "nhw": lambda x: x[:, 0], "float": lambda x: x.astype(np.float64) / 255}[layout]
    np.savez(tmp_path / "d.npz", x_train=stored(x_train), y_train=y_train,
             x_test=stored(x_test), y_test=y_test)
    raw = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert raw.num_classes == 4 and raw.in_channels == channels and raw.image_size == 8
    scale = 255.0 if layout == "float" else 1.0
    for got, want in ((raw.train_images, x_train), (raw.test_images, x_test)):
        assert got.dtype == (torch.float32 if layout == "float" else torch.uint8)
        np.testing.assert_allclose(got.numpy().astype(np.float64) * scale, want, atol=1e-4)
    assert np.array_equal(raw.train_labels.numpy(), y_train)
    assert np.array_equal(raw.test_labels.numpy(), y_test)


def test_float_and_uint8_arrays_prepare_alike(tmp_path):
    """Standardization by the train split makes the images' scale irrelevant."""
    x, y = structured_images(20, 3), np.arange(20) % 2
    np.savez(tmp_path / "u.npz", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    np.savez(tmp_path / "f.npz", x_train=x / 255.0, y_train=y, x_test=x[:4] / 255.0, y_test=y[:4])
    a, b = (prepare(load_dataset(f"npz:{tmp_path / n}"), noise_rate=0.2, seed=3)
            for n in ("u.npz", "f.npz"))
    torch.testing.assert_close(a.train_images, b.train_images, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.train_labels, b.train_labels)
    assert torch.equal(a.noise.noisy_indices, b.noise.noisy_indices)


def test_train_and_evaluate_on_a_folder_dataset(tmp_path, monkeypatch):
    """Label noise, dataset indices and the run's config work as for the built-in datasets; the
    recorded spec is absolute, so later commands rebuild the data from any directory."""
    x = structured_images(30, 1)
    write_folder(tmp_path / "imgs", {"train": x, "test": x[:6]},
                 {"train": np.arange(30) % 3, "test": np.arange(6) % 3})
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", "--dataset", "folder:imgs", "--noise", "0.2", "--epochs", "2",
                     "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == f"folder:{tmp_path / 'imgs'}"
    noise = json.loads((tmp_path / "run" / "noise.json").read_text())
    assert noise["num_train"] == 30 and len(noise["noisy_indices"]) == 6
    monkeypatch.chdir(tmp_path / "run")
    result = run_cli("evaluate", "--ckpt", tmp_path / "run/checkpoints/epoch_002.safetensors",
                     "--json")
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["noisy_acc"] <= 1.0


def _folder(tmp_path, n=6):
    x = structured_images(n, 1)
    write_folder(tmp_path / "d", {"train": x, "test": x[:3]}, {"train": np.arange(n) % 3,
                                                              "test": np.arange(3)})
    return tmp_path / "d"


def _npz(tmp_path, **changes):
    x = structured_images(6, 3)
    arrays = {"x_train": x, "y_train": np.arange(6) % 2, "x_test": x[:2], "y_test": np.arange(2)}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(tmp_path / "d.npz", **arrays)
    return f"npz:{tmp_path / 'd.npz'}"


def _bad_folder(tmp_path, damage):
    root = _folder(tmp_path)
    if damage == "missing test":
        for p in sorted((root / "test").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "test").rmdir()
    elif damage == "other size":
        Image.fromarray(structured_images(1, 1, size=9)[0, 0]).save(root / "train/ant/big.png")
    elif damage == "not an image":
        (root / "train/ant/broken.png").write_bytes(b"not a png at all")
    elif damage == "other file":
        (root / "train/ant/notes.txt").write_text("x")
    elif damage == "unknown test class":
        (root / "test/wasp").mkdir()
        Image.fromarray(structured_images(1, 1)[0, 0]).save(root / "test/wasp/a.png")
    elif damage == "empty class":
        (root / "train/wasp").mkdir()
    return f"folder:{root}"


@pytest.mark.parametrize("damage,fragments", [
    ("no such folder", ["does not exist"]),
    ("missing test", ["test", "missing"]),
    ("other size", ["big.png", "9x9", "8x8"]),
    ("not an image", ["broken.png", "not a readable image"]),
    ("other file", ["notes.txt", "not a .png/.jpg"]),
    ("unknown test class", ["wasp", "no folder in train"]),
    ("empty class", ["wasp", "no .png/.jpg"]),
])
def test_bad_folder_dataset_is_one_line(tmp_path, damage, fragments):
    spec = (f"folder:{tmp_path / 'nowhere'}" if damage == "no such folder"
            else _bad_folder(tmp_path, damage))
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", spec, "--epochs", "1", "--out", out, "--no-progress")
    assert_one_line_error(result, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("changes,fragments", [
    ({"y_test": None}, ["lacks", "y_test"]),
    ({"x_train": structured_images(6, 8)}, ["x_train", "[6, 8, 8, 8]", "channels-first"]),
    ({"x_train": structured_images(6, 3)[:, :, :, :5]}, ["x_train", "square"]),
    ({"x_test": structured_images(2, 1)}, ["x_train", "x_test", "alike"]),
    ({"x_train": structured_images(6, 3).astype(np.int16)}, ["int16", "uint8 or float"]),
    ({"y_train": np.arange(5)}, ["y_train", "[6]"]),
    ({"y_train": np.array([0, 1, 0, -1, 0, 1])}, ["y_train", "non-negative integer"]),
    ({"y_train": np.arange(6) * 0.5}, ["y_train", "float64"]),
])
def test_bad_npz_dataset_is_one_line(tmp_path, changes, fragments):
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", _npz(tmp_path, **changes), "--epochs", "1",
                     "--out", out, "--no-progress")
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_npz_that_is_not_an_npz_or_holds_objects_is_one_line(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0],
             x_test=[0], y_test=[0])
    for name in ("junk.npz", "obj.npz", "absent.npz"):
        result = run_cli("train", "--dataset", f"npz:{tmp_path / name}", "--out",
                         tmp_path / "run", "--no-progress")
        assert_one_line_error(result, name)
        assert not (tmp_path / "run").exists()


def test_jpeg_files_load_as_pillow_decodes_them(tmp_path):
    x = structured_images(4, 3)
    write_folder(tmp_path / "d", {"train": x, "test": x[:2]},
                 {"train": np.array([0, 1, 2, 0]), "test": np.array([1, 2])}, suffix=".JPG")
    raw = load_dataset(f"folder:{tmp_path / 'd'}")
    decoded = np.asarray(Image.open(tmp_path / "d/train/ant/img001.JPG").convert("RGB"))
    assert np.array_equal(raw.train_images[0].numpy(), decoded.transpose(2, 0, 1))


@pytest.mark.parametrize("spec,fragments", [
    ("folder:", ["names no path"]),
    ("tiff:somewhere", ["tiff:somewhere", "folder:PATH"]),
])
def test_bad_dataset_spec_is_one_line(tmp_path, spec, fragments):
    result = run_cli("train", "--dataset", spec, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()
