"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, gzipped or plain.

The Debian package `dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist:
train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz. 60,000 training and 10,000 test images, 28x28 grey, 10 classes.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .base import DataError, InMemoryDataset

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PREFIX = {"train": "train", "test": "t10k"}
UBYTE = 0x08  # IDX type code of unsigned bytes, the only one Fashion-MNIST uses
LAYOUT = ("expected train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
          "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (or the same without .gz), "
          "as in the Debian package dataset-fashion-mnist")


def find_idx(data_dir: Path, name: str) -> Path:
    """data_dir/name.gz, or else the plain data_dir/name."""
    for path in (data_dir / f"{name}.gz", data_dir / name):
        if path.is_file():
            return path
    raise DataError(f"{data_dir / name}.gz: not found; {LAYOUT}")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions as a uint8 array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); {LAYOUT}") from e
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, shorter than its header)")
    magic = int.from_bytes(raw[:4], "big")
    expected = (UBYTE << 8) | ndim
    if magic != expected:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected:08x} "
                        f"(an IDX file of unsigned bytes with {ndim} dimensions); {LAYOUT}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims))
    data = raw[4 + 4 * ndim:]
    if len(data) < count:
        raise DataError(f"{path}: truncated IDX file: header says {'x'.join(map(str, dims))} = "
                        f"{count} bytes, found {len(data)}")
    return np.frombuffer(data, np.uint8, count).reshape(dims).copy()


def load_fashion_mnist(data_dir, split: str, image_size, resize: str) -> InMemoryDataset:
    """One split of Fashion-MNIST, images (N, 1, H, W) uint8, resized if image_size is given."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DIR
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: Fashion-MNIST folder not found; {LAYOUT}")
    prefix = PREFIX[split]
    images_path = find_idx(data_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, 3)  # (N, H, W)
    labels = read_idx(labels_path, 1)  # (N,)
    source = f"{images_path} and {labels_path}"
    return InMemoryDataset(images[..., None], labels, CLASSES, image_size, resize, source)
