"""ImageFolder: root/train/<class>/*.jpg (and root/test or root/val), decoded lazily with PIL.

Every image becomes RGB (a GIF gives its first frame) and is resized to image_size. With a
cache_dir the whole split is decoded once into a uint8 .npy (N, 3, H, W), named by a hash of the
file list (paths, sizes, mtimes), image_size and resize mode, and read back memory-mapped: so
ImageNet at 28x28 is decoded once, and any change to the files makes a new cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pixtok.checkpoint import atomic_write
from pixtok.resize import resize_image

from .base import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CACHE_FORMAT = 1  # bump when decoding changes, so old caches are not reused
LAYOUT = ("expected ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (or ROOT/val), "
          f"images ending in {', '.join(EXTENSIONS)}")


def visible_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_split_dir(root: Path, split: str) -> Path:
    """root/train for "train"; root/test, or else root/val, for "test"."""
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root not found; {LAYOUT}")
    names = ["train"] if split == "train" else ["test", "val"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no {' or '.join(names)} folder; {LAYOUT}")


def list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files under each class folder (recursively, sorted) and their class indices."""
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in EXTENSIONS
                       and not p.name.startswith(".") and p.is_file())
        files += found
        labels += [label] * len(found)
    return files, labels


def decode_image(path: Path, size: tuple[int, int], resize: str) -> np.ndarray:
    """One image file -> RGB uint8 (H, W, 3) at size."""
    try:
        with Image.open(path) as img:
            img.seek(0)  # the first frame of a GIF or animated WebP
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e
    return resize_image(rgb, size, resize)


class ImageFolder:
    """Images in class folders; ds[i] -> (uint8 (3, H, W), label)."""

    def __init__(self, root, split: str, image_size: tuple[int, int] | None,
                 resize: str = "bicubic", cache_dir=None):
        if root is None:
            raise DataError(f"imagefolder needs a data folder: {LAYOUT}")
        if image_size is None:
            raise DataError(f"imagefolder {root}: give image_size, the (H, W) every image is "
                            f"resized to")
        root = Path(root)
        split_dir = find_split_dir(root, split)
        # class indices come from train/, so a test folder with fewer classes keeps the same ids
        class_root = root / "train" if (root / "train").is_dir() else split_dir
        self.classes = visible_dirs(class_root)
        if not self.classes:
            raise DataError(f"{class_root}: no class folders; {LAYOUT}")
        unknown = sorted(set(visible_dirs(split_dir)) - set(self.classes))
        if unknown:
            raise DataError(f"{split_dir}: class folders {unknown} are not in {class_root}")
        self.files, labels = list_images(split_dir, self.classes)
        if not self.files:
            raise DataError(f"{split_dir}: no images in its class folders; {LAYOUT}")
        self.split_dir = split_dir
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (N,)
        self.in_channels = 3
        self.image_size = tuple(image_size)
        self.resize = resize
        self.cache_path = None
        self.cache = None  # uint8 (N, 3, H, W), memory-mapped, once built
        if cache_dir is not None:
            self.cache_path = Path(cache_dir) / self.cache_name(split)
            self.cache = self.open_cache()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.cache is not None:
            image = torch.from_numpy(np.array(self.cache[i]))  # copy out of the read-only map
        else:
            image = torch.from_numpy(decode_image(self.files[i], self.image_size, self.resize))
            image = image.permute(2, 0, 1).contiguous()  # (3, H, W)
        return image, int(self.labels[i])

    def cache_name(self, split: str) -> str:
        """A file name that changes with any file, the size or the resize mode."""
        key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "classes": self.classes,
                                         "image_size": self.image_size,
                                         "resize": self.resize}).encode())
        for path in self.files:  # one line per file, fed as we go: ImageNet has 1.28M
            st = path.stat()
            line = [str(path.relative_to(self.split_dir)), st.st_size, st.st_mtime_ns]
            key.update(json.dumps(line).encode() + b"\n")
        h, w = self.image_size
        return f"imagefolder-{split}-{h}x{w}-{self.resize}-{key.hexdigest()[:16]}.npy"

    def open_cache(self) -> np.ndarray:
        """The cached split, decoding it first if no complete cache exists."""
        shape = (len(self.files), 3, *self.image_size)
        if self.cache_path.is_file():
            try:
                cache = np.load(self.cache_path, mmap_mode="r")
                if cache.shape == shape and cache.dtype == np.uint8:
                    return cache
            except (OSError, ValueError):
                pass  # unreadable: decode again and replace it
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cache_path, lambda tmp: self.write_cache(tmp, shape))
        except OSError as e:
            raise DataError(f"{self.cache_path}: cannot write the image cache ({e})") from e
        return np.load(self.cache_path, mmap_mode="r")

    def write_cache(self, tmp: str, shape: tuple[int, ...]) -> None:
        # written through a memory map, so a split larger than RAM never sits in memory
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for i, path in enumerate(tqdm(self.files, desc=f"decoding {self.split_dir}",
                                      disable=None, leave=False)):
            out[i] = decode_image(path, self.image_size, self.resize).transpose(2, 0, 1)
        out.flush()
        del out  # closes the map before atomic_write renames the file
