"""A held-out sample of a checkpoint's own data, for export's int8 check (`pixtok export
--quantize int8`, export/quantize.py). The CLI hands held_out_sample to export, which imports no
training code.

The sample is the test split the checkpoint's config.json names (what `pixtok eval` reads),
never a training image: up to n images, picked with a fixed seed.
"""
from __future__ import annotations

import numpy as np

from pixtok.errors import UserError
from training.data import DataError

SAMPLE = {"classify": 1000, "depth": 100}    # images per check: the depth model is 4x slower


def pick(count: int, n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(count, min(n, count), replace=False))


def held_out_sample(config: dict,
                    n: int | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(images float32 (N, C, H, W) in [0, 1], targets: class indices (N,) or depths
    (N, 1, H, W) in metres, a description of the sample)."""
    data, task = config.get("data") or {}, config.get("task")
    n = n or SAMPLE.get(task, 100)
    if not data.get("dataset"):
        raise UserError("the int8 check needs the checkpoint's data set, and its config.json "
                        "names none")
    try:
        if task == "classify":
            from training.tasks.classify import load_split

            dataset = load_split(data, "test")
        elif task == "depth":
            from training.tasks.depth import load_split

            dataset = load_split({**data, "n_test": min(n, data.get("n_test") or n)}, "test")
        else:
            raise UserError(f"task {task!r} has no int8 check")
    except (DataError, OSError) as e:
        raise UserError(f"the int8 check needs the held-out data of {data['dataset']}: "
                        f"{e}") from None
    rows = pick(len(dataset), n)
    images = np.stack([dataset[int(i)][0].numpy() for i in rows]).astype(np.float32) / 255.0
    targets = np.stack([np.asarray(dataset[int(i)][1]) for i in rows])
    return images, targets, f"{len(rows)} {data['dataset']} test images"
