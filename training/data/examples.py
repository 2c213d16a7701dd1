"""Example inputs for the Gradio page: a few Fashion-MNIST test images and rendered RGB-D scenes,
written as PNG files into the page's examples folder by `pixtok serve` before the page starts (the
page itself reads only those files, never a data set)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_EXAMPLES = 6
SCENE_EXAMPLES, SCENE_SIZE = 3, (96, 128)
SCENE_SEED = 7    # a seed stream of its own: SceneDataset's splits use streams 0, 1, 2


def write_fashion_examples(folder: Path, data_dir: Path = FASHION_DIR) -> list[Path]:
    """The first test image of each of the first FASHION_EXAMPLES classes, as PNG files."""
    if not data_dir.is_dir():
        return []
    from training.data import DataError
    from training.data.fashion_mnist import find_idx, read_idx

    try:
        images = read_idx(find_idx(data_dir, "t10k-images-idx3-ubyte"), 3)   # (N, 28, 28)
        labels = read_idx(find_idx(data_dir, "t10k-labels-idx1-ubyte"), 1)   # (N,)
    except DataError as e:
        print(f"pixtok ui: no Fashion-MNIST examples ({e})", file=sys.stderr)
        return []
    paths = []
    for k in range(min(FASHION_EXAMPLES, int(labels.max()) + 1)):
        i = int(np.flatnonzero(labels == k)[0])
        path = folder / f"fashion-test-{k}-{i:05d}.png"     # class k, test image i
        Image.fromarray(images[i]).save(path)
        paths.append(path)
    return paths


def write_scene_examples(folder: Path) -> list[Path]:
    """A few rendered RGB-D scenes (the RGB part) of training/data/scenes.py, as PNG files."""
    from training.data.scenes import render_scene

    paths = []
    for i in range(SCENE_EXAMPLES):
        rgb, _ = render_scene((SCENE_SEED, i), SCENE_SIZE)     # (H, W, 3) uint8
        path = folder / f"scene-{i}.png"
        Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def write_examples(folder: Path) -> dict[str, list[Path]]:
    """{"classify": [...], "depth": [...]}: example files, written once into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    fashion = sorted(folder.glob("fashion-test-*.png")) or write_fashion_examples(folder)
    scenes = sorted(folder.glob("scene-*.png")) or write_scene_examples(folder)
    return {"classify": fashion, "depth": scenes}
