"""Where each dataset's published files live, and the md5 each must have.

URLs and md5s are the ones torchvision pins (pytorch/vision, torchvision/datasets/mnist.py,
cifar.py, svhn.py): MNIST from the ossci-datasets S3 mirror (yann.lecun.com has refused
downloads since 2023), Fashion-MNIST from Zalando's S3 bucket, CIFAR-10 from cs.toronto.edu,
SVHN from ufldl.stanford.edu.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MIRROR_ENV = "MEMKERN_DATA_MIRROR"


@dataclass(frozen=True)
class Source:
    """One dataset's download location: ``base_url + name`` for each ``name`` in ``md5``."""

    base_url: str
    md5: dict[str, str]


SOURCES: dict[str, Source] = {
    "mnist": Source(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": Source(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": Source(
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    ),
    "svhn": Source(
        "http://ufldl.stanford.edu/housenumbers/",
        {
            "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        },
    ),
}


def file_url(dataset: str, name: str, *, mirror: str | None = None) -> str:
    """URL of one published file. A mirror (argument, else $MEMKERN_DATA_MIRROR) replaces every
    dataset's base URL and holds one folder per dataset key: ``<mirror>/mnist/<name>``; the
    folder keeps MNIST and Fashion-MNIST, whose file names are the same, apart."""
    mirror = mirror or os.environ.get(MIRROR_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{dataset}/{name}"
    return SOURCES[dataset].base_url + name
