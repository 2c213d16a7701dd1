"""Write a small ImageFolder from Fashion-MNIST: the folder docs/your-data.md measures on.

    python -m training.data.make_folder OUT [--classes 5] [--train 300] [--val 100] [--size 20]
                                            [--rgb] [--rotate-invert]

OUT/train/<class>/<n>.png and OUT/val/<class>/<n>.png, grey PNGs resized (bicubic) to size x
size, the first `train` and `val` images of each of the first `classes` classes of Fashion-MNIST's
training and test files, each class folder named after the class in lower case ("t-shirt",
"trouser", ...): the names a user's folder would have, not Fashion-MNIST's label strings.
--rgb saves the same grey images as RGB PNGs; --rotate-invert turns each image 90 degrees
counter-clockwise and inverts it (dark clothes on white): data a model trained on Fashion-MNIST
has not seen in that form.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from pixtok.errors import UserError

from .fashion_mnist import load_fashion_mnist


def folder_name(label: str) -> str:
    return label.split("/")[0].lower().replace(" ", "-")


def write_folder(out: Path, classes: int = 5, train: int = 300, val: int = 100, size: int = 20,
                 data_dir=None, rgb: bool = False, rotate_invert: bool = False) -> Path:
    """Write the folder (see the module's doc) and return `out`."""
    if not 1 < classes <= 10 or min(train, val, size) < 1:
        raise UserError("make_folder: expected 2..10 classes and positive counts and size")
    for split, source, count in (("train", "train", train), ("val", "test", val)):
        ds = load_fashion_mnist(data_dir, source, (size, size), "bicubic")
        labels = ds.labels.numpy()
        for k in range(classes):
            picked = np.flatnonzero(labels == k)[:count]
            folder = out / split / folder_name(ds.classes[k])
            folder.mkdir(parents=True, exist_ok=True)
            for n, i in enumerate(tqdm(picked, desc=f"{split}/{folder.name}", disable=None,
                                       leave=False)):
                img = Image.fromarray(ds.images[i, 0].numpy(), mode="L")
                if rotate_invert:
                    img = ImageOps.invert(img.rotate(90))
                (img.convert("RGB") if rgb else img).save(folder / f"{n:04d}.png")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.data.make_folder",
                                description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--train", type=int, default=300, help="training images per class")
    p.add_argument("--val", type=int, default=100, help="validation images per class")
    p.add_argument("--size", type=int, default=20)
    p.add_argument("--rgb", action="store_true", help="save the images as RGB")
    p.add_argument("--rotate-invert", action="store_true",
                   help="turn each image 90 degrees and invert it")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the package's)")
    a = p.parse_args(argv)
    try:
        write_folder(a.out, a.classes, a.train, a.val, a.size, a.data, a.rgb, a.rotate_invert)
    except UserError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
