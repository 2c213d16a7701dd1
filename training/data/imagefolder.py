"""ImageFolder: root/train/<class>/*.jpg (and root/test or root/val), decoded with PIL.

Class names are the class folders' names, sorted. Every image becomes `channels` channels: 1
(grey) or 3 (RGB); channels=0 takes what the training images are (a sample of their headers: all
grey modes gives 1, else 3), and images of the other kind are converted with a warning (a GIF
gives its first frame). Each is resized to image_size. A split is decoded once: into memory when
it fits (MEMORY_LIMIT), else into a uint8 .npy in cache_dir, named by a hash of the file list
(paths, sizes, mtimes), image_size, resize mode and channels, and read back memory-mapped (so
ImageNet at 28x28 is decoded once, and any change to the files makes a new cache). Files that
cannot be decoded are skipped and counted, with a warning. Without a cache_dir, a split too large
for memory is decoded item by item (its statistics then default to ImageNet's).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pixtok.checkpoint import atomic_write
from pixtok.resize import resize_image

from .base import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CACHE_FORMAT = 2  # bump when decoding changes, so old caches are not reused
LAYOUT = ("expected ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (or ROOT/val), "
          f"images ending in {', '.join(EXTENSIONS)}")
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
MEMORY_LIMIT = 2 << 30     # bytes of decoded uint8 pixels a split may hold in memory
SAMPLE = 2000              # image headers read to tell a folder's channels and typical size
MAX_TOKENS = 1024          # the automatic image size keeps a ViT/1 at most this many tokens


def visible_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_split_dir(root: Path, split: str) -> Path:
    """root/train for "train"; root/test, or else root/val, for "test"; root/val for "val"."""
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root not found; {LAYOUT}")
    names = {"train": ["train"], "val": ["val"]}.get(split, ["test", "val"])
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


def headers(files: list[Path], limit: int = SAMPLE) -> list[tuple[str, int, int]]:
    """(mode, H, W) of an even sample of at most `limit` files (headers only; unreadable ones
    are left out)."""
    out = []
    for path in files[::max(1, len(files) // limit)]:
        try:
            with Image.open(path) as img:
                out.append((img.mode, img.height, img.width))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return out


def modes_channels(modes) -> int:
    """1 when every mode is grey, else 3."""
    return 1 if modes and all(m in GREY_MODES for m in modes) else 3


def describe_folder(root, patch_size: int = 1, max_tokens: int = MAX_TOKENS) -> dict:
    """What a folder's training images are: {"channels": 1 or 3, "image_size": [H, W]}, the
    size being the sample's median, shrunk (aspect kept, multiples of patch_size) to at most
    max_tokens patches, so a ViT on it stays affordable."""
    split_dir = find_split_dir(Path(root), "train")
    files, _ = list_images(split_dir, visible_dirs(split_dir))
    found = headers(files)
    if not found:
        raise DataError(f"{split_dir}: no readable images in its class folders; {LAYOUT}")
    h, w = (int(np.median([f[i] for f in found])) for i in (1, 2))
    scale = min(1.0, (max_tokens * patch_size ** 2 / (h * w)) ** 0.5)
    size = [max(patch_size, int(v * scale) // patch_size * patch_size) for v in (h, w)]
    return {"channels": modes_channels([f[0] for f in found]), "image_size": size}


def decode_image(path: Path, size: tuple[int, int], resize: str,
                 channels: int = 3) -> tuple[np.ndarray, bool]:
    """One image file -> (uint8 (H, W, channels) at size, whether its mode was converted from
    the other kind: grey to RGB or colour to grey)."""
    try:
        with Image.open(path) as img:
            img.seek(0)  # the first frame of a GIF or animated WebP
            grey = img.mode in GREY_MODES
            pixels = img.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e
    out = resize_image(pixels, size, resize)
    return out.reshape(*out.shape[:2], channels), grey != (channels == 1)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class ImageFolder:
    """Images in class folders; ds[i] -> (uint8 (C, H, W), label)."""

    def __init__(self, root, split: str, image_size: tuple[int, int] | None,
                 resize: str = "bicubic", cache_dir=None, channels: int = 0):
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
        if channels == 0:       # what the training images are, for every split alike
            train_files = self.files if class_root == split_dir else \
                list_images(class_root, self.classes)[0]
            channels = modes_channels([m for m, _, _ in headers(train_files)])
        self.split_dir = split_dir
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (N,)
        self.in_channels = channels
        self.image_size = tuple(image_size)
        self.resize = resize
        self.cache_path = None
        self.cache = None  # uint8 (N, C, H, W): in memory or memory-mapped, once decoded
        if cache_dir is not None:
            self.cache_path = Path(cache_dir) / self.cache_name(split)
            self.cache = self.open_cache()
        elif len(self.files) * channels * int(np.prod(self.image_size)) <= MEMORY_LIMIT:
            self.cache = self.decode_into(np.empty(self.shape(), dtype=np.uint8))

    def shape(self) -> tuple[int, ...]:
        return (len(self.files), self.in_channels, *self.image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.cache is not None:
            image = torch.from_numpy(np.array(self.cache[i]))  # copy out of the read-only map
        else:
            pixels, _ = decode_image(self.files[i], self.image_size, self.resize,
                                     self.in_channels)
            image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (C, H, W)
        return image, int(self.labels[i])

    def decode_into(self, out: np.ndarray) -> np.ndarray:
        """Decode every file into out's first rows, in order, leaving out (and dropping from
        files and labels) the ones that cannot be decoded; returns the rows filled."""
        kept, bad, converted = [], [], 0
        for i, path in enumerate(tqdm(self.files, desc=f"decoding {self.split_dir}",
                                      disable=None, leave=False)):
            try:
                pixels, changed = decode_image(path, self.image_size, self.resize,
                                               self.in_channels)
            except DataError as e:
                bad.append(str(e))
                continue
            out[len(kept)] = pixels.transpose(2, 0, 1)
            kept.append(i)
            converted += changed
        self.note(kept, bad, converted)
        return out[:len(kept)]

    def note(self, kept: list[int], bad: list[str], converted: int) -> None:
        """Keep the decoded files only, and say what was skipped or converted."""
        if not kept:
            raise DataError(f"{self.split_dir}: none of its {len(self.files)} images can be "
                            f"decoded (first: {bad[0]})")
        if bad:
            warn(f"{self.split_dir}: skipped {len(bad)} of {len(self.files)} images that cannot "
                 f"be decoded (first: {bad[0]})")
        if converted:
            kind = "colour images to grey" if self.in_channels == 1 else "grey images to RGB"
            warn(f"{self.split_dir}: converted {converted} of {len(self.files)} {kind} "
                 f"(channels={self.in_channels}; the folder holds both kinds)")
        self.files = [self.files[i] for i in kept]
        self.labels = self.labels[kept]

    def cache_name(self, split: str) -> str:
        """A file name that changes with any file, the size, the resize mode or the channels."""
        key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "classes": self.classes,
                                         "image_size": self.image_size, "resize": self.resize,
                                         "channels": self.in_channels}).encode())
        for path in self.files:  # one line per file, fed as we go: ImageNet has 1.28M
            st = path.stat()
            line = [str(path.relative_to(self.split_dir)), st.st_size, st.st_mtime_ns]
            key.update(json.dumps(line).encode() + b"\n")
        h, w = self.image_size
        return f"imagefolder-{split}-{h}x{w}-{self.resize}-{key.hexdigest()[:16]}.npy"

    def open_cache(self) -> np.ndarray:
        """The cached split, decoding it first if no complete cache exists. The files that could
        not be decoded are listed beside it (NAME.skipped.json), written before the .npy."""
        skipped_path = self.cache_path.with_suffix(".skipped.json")
        if self.cache_path.is_file() and skipped_path.is_file():
            try:
                skipped = set(json.loads(skipped_path.read_text()))
                kept = [i for i, p in enumerate(self.files)
                        if str(p.relative_to(self.split_dir)) not in skipped]
                cache = np.load(self.cache_path, mmap_mode="r")
                if cache.shape == (len(kept), *self.shape()[1:]) and cache.dtype == np.uint8:
                    self.files = [self.files[i] for i in kept]
                    self.labels = self.labels[kept]
                    return cache
            except (OSError, ValueError):
                pass  # unreadable: decode again and replace it
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cache_path, lambda tmp: self.write_cache(tmp, skipped_path))
        except OSError as e:
            raise DataError(f"{self.cache_path}: cannot write the image cache ({e})") from e
        return np.load(self.cache_path, mmap_mode="r")

    def write_cache(self, tmp: str, skipped_path: Path) -> None:
        # written through a memory map, so a split larger than RAM never sits in memory
        full = Path(tmp).with_name(Path(tmp).name + ".all")
        try:
            self.write_rows(tmp, full, skipped_path)
        finally:
            full.unlink(missing_ok=True)

    def write_rows(self, tmp: str, full: Path, skipped_path: Path) -> None:
        """Decode into `full`, list the skipped files, then make `tmp` the decoded rows alone."""
        before = list(self.files)
        out = np.lib.format.open_memmap(full, mode="w+", dtype=np.uint8, shape=self.shape())
        rows = len(self.decode_into(out))
        skipped = sorted(set(map(str, before)) - set(map(str, self.files)))
        text = json.dumps([str(Path(p).relative_to(self.split_dir)) for p in skipped])
        atomic_write(skipped_path, lambda t: Path(t).write_text(text))
        if rows == len(out):
            out.flush()
            del out  # closes the map before atomic_write renames the file
            full.replace(tmp)
            return
        kept = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                         shape=(rows, *self.shape()[1:]))
        for start in range(0, rows, 4096):           # copied a chunk at a time
            stop = min(start + 4096, rows)
            kept[start:stop] = out[start:stop]
        kept.flush()
        del kept, out
