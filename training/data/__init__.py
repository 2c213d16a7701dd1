"""Classification data sets: Fashion-MNIST, CIFAR-100 (fine or coarse labels), ImageFolder.

Every data set has `classes`, `in_channels`, `image_size` (H, W), `len()` and `ds[i] -> (uint8
tensor (C, H, W), int label)`. The in-memory ones (Fashion-MNIST, CIFAR) also expose `images`
(uint8 (N, C, H, W)) and `labels` (int64 (N,)), so a training loop can index whole batches.
"""
from __future__ import annotations

from pixtok.resize import MODES as RESIZE_MODES
from training.data.base import DataError, parse_image_size

NAMES = ("fashion-mnist", "cifar100", "cifar100-coarse", "imagefolder")
SPLITS = ("train", "test")


def build_dataset(name: str, data_dir=None, split: str = "train", image_size=None,
                  resize: str = "bicubic", cache_dir=None, channels: int = 0):
    """The data set `name` ("fashion-mnist", "cifar100", "cifar100-coarse", "imagefolder").
    An ImageFolder also has a "val" split (its val/ folder) and takes `channels` (1, 3, or 0:
    what its training images are)."""
    if split not in SPLITS and not (name == "imagefolder" and split == "val"):
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if resize not in RESIZE_MODES:
        raise DataError(f"resize {resize!r}: expected one of {', '.join(RESIZE_MODES)}")
    size = parse_image_size(image_size)
    if name == "fashion-mnist":
        from .fashion_mnist import load_fashion_mnist
        return load_fashion_mnist(data_dir, split, size, resize)
    if name in ("cifar100", "cifar100-coarse"):
        from .cifar import load_cifar100
        return load_cifar100(data_dir, split, size, resize, coarse=name == "cifar100-coarse")
    if name == "imagefolder":
        from .imagefolder import ImageFolder
        return ImageFolder(data_dir, split, size, resize, cache_dir, channels)
    raise DataError(f"data set {name!r}: expected one of {', '.join(NAMES)}")


class Slice:
    """Items start..stop-1 of a data set, with its attributes (classes, image_size, ...) and its
    in-memory arrays (images, labels, depths, cache) cut to the same range, as views."""

    SLICED = ("images", "labels", "depths", "cache")

    def __init__(self, base, start: int, stop: int):
        self.base, self.start, self.stop = base, start, stop

    def __getattr__(self, name):
        if name in ("base", "start", "stop"):         # not set yet (unpickling): no recursion
            raise AttributeError(name)
        value = getattr(self.base, name)
        if name in self.SLICED and value is not None:
            return value[self.start:self.stop]
        return value

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.base[self.start + i]


def holdout(dataset, val_size: int, split: str):
    """The training set less its last `val_size` items ("train"), or those items ("val")."""
    n = len(dataset)
    if not 0 < val_size < n:
        raise DataError(f"val_size={val_size}: expected between 1 and {n - 1} (the training set "
                        f"has {n} items)")
    return Slice(dataset, 0, n - val_size) if split == "train" else Slice(dataset, n - val_size, n)
