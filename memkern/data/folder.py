"""The user's images in the ImageFolder layout: ``ROOT/train/<class>/*.png|jpg`` and
``ROOT/test/<class>/...``.

Classes are the train split's folder names sorted by name (label 0 is the first); a split's
dataset indices follow that class order, then file names sorted within each class, so the same
folder always gives the same indices. All images share one square size (nothing is resized
behind the user's back). Channels are decided once for the whole dataset: 1 when every image is
single-band (grey or black-and-white), else 3 (RGB; alpha dropped, palettes expanded).
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from memkern.data.file_limits import MAX_IMAGE_PIXELS, check_image_pixels
from memkern.data.splits import RawSplits
from memkern.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L")  # single-band 8-bit modes; anything else is converted to RGB


def _image_files(class_dir: Path) -> list[Path]:
    files = []
    for path in sorted(class_dir.iterdir()):
        if path.name.startswith("."):  # .DS_Store and friends
            continue
        if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path} is not a .png/.jpg image; the folder dataset holds only "
                            f"images in ROOT/<split>/<class>/: move it out")
        files.append(path)
    if not files:
        raise DataError(f"{class_dir} holds no .png/.jpg images; remove the empty class folder "
                        f"or add its images")
    return files


def _class_dirs(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        raise DataError(f"folder dataset: {split_dir} is missing; expected "
                        f"{split_dir.parent}/train/<class>/*.png and {split_dir.parent}/test/"
                        f"<class>/*.png")
    dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"folder dataset: {split_dir} has no class folders; put each class's "
                        f"images in {split_dir}/<class>/")
    return dirs


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                check_image_pixels(path, image.size)
                image.load()
                return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path} declares more pixels than memkern reads per image (at most "
                        f"{MAX_IMAGE_PIXELS:,}); resize it") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable image ({type(e).__name__}); replace or "
                        f"remove it") from None


def _split(split_dir: Path, classes: list[str]) -> tuple[list, list[int]]:
    images, labels = [], []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in classes:
            raise DataError(f"folder dataset: class {class_dir.name!r} of {split_dir} has no "
                            f"folder in train/ (classes: {', '.join(classes)}); rename or "
                            f"remove it")
        label = classes.index(class_dir.name)
        for path in _image_files(class_dir):
            images.append((path, _open(path)))
            labels.append(label)
    return images, labels


def _to_array(images: list, channels: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[N, C, S, S]``; every image checked to have ``size``."""
    out = np.empty((len(images), channels, size[1], size[0]), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, (path, image) in enumerate(images):
        if image.size != size:
            raise DataError(f"{path} is {image.size[0]}x{image.size[1]} but most of the "
                            f"dataset's images are {size[0]}x{size[1]}; resize all images to "
                            f"one size")
        pixels = np.asarray(image.convert(mode), dtype=np.uint8)
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out


def load_image_folder(root: str | Path) -> RawSplits:
    """The train and test splits of the folder ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder dataset {root} does not exist or is not a directory; pass "
                        f"--dataset folder:PATH with PATH/train/<class>/ and PATH/test/<class>/")
    classes = [d.name for d in _class_dirs(root / "train")]
    if len(classes) < 2:
        raise DataError(f"folder dataset {root}: train/ has one class folder ({classes[0]}); a "
                        f"classifier needs at least 2, one folder per class")
    train, train_labels = _split(root / "train", classes)
    test, test_labels = _split(root / "test", classes)
    size = Counter(image.size for _, image in train + test).most_common(1)[0][0]
    if size[0] != size[1]:
        raise DataError(f"folder dataset {root}: the images are {size[0]}x{size[1]}, but "
                        f"memkern's models take square images; crop or resize them to SxS")
    channels = 1 if all(image.mode in GREY_MODES for _, image in train + test) else 3
    return RawSplits(
        name=f"folder:{root}",
        train_images=torch.from_numpy(_to_array(train, channels, size)),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=torch.from_numpy(_to_array(test, channels, size)),
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
        num_classes=len(classes),
    )
