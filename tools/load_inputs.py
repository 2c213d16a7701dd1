"""Request images for `pixtok bench load` / `pixtok bench drill`: real Fashion-MNIST test images
and scenes rendered by training/data/scenes.py, as PNG bytes.

The benches make them once, in their own process, before any load starts (the load process of
`pixtok bench load`, tools/load_users.py, reads them from files and imports no training code).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import DataError
from training.data.fashion_mnist import find_idx, read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SCENE_SIZE = (48, 64)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def load_inputs(routes, count: int = 64, scenes: int = 16,
                fashion_dir: Path = FASHION_DIR) -> dict[str, list[bytes]]:
    """{"classify": [PNG, ...], "depth": [PNG, ...]} for the image routes among `routes`."""
    out = {}
    if "classify" in routes:
        try:
            images = read_idx(find_idx(Path(fashion_dir), "t10k-images-idx3-ubyte"), 3)
        except DataError as e:
            raise DataError(f"no Fashion-MNIST test images for the classify route ({e}); "
                            "install dataset-fashion-mnist") from None
        pick = np.random.default_rng(0).choice(len(images), min(count, len(images)),
                                               replace=False)
        out["classify"] = [png(images[i]) for i in pick]
    if "depth" in routes:
        from training.data.scenes import render_scene

        out["depth"] = [png(render_scene((2026, 22, i), SCENE_SIZE)[0]) for i in range(scenes)]
    return out
