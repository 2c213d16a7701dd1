"""What every data set module shares (imported by the package and by each loader, so no loader
imports the package that loads it): the error, the in-memory split, the image size rule."""
from __future__ import annotations

import numpy as np
import torch

from pixtok.errors import UserError
from pixtok.resize import resize_batch


class DataError(UserError):
    """A data set that is missing, truncated or not in the expected layout."""


class InMemoryDataset:
    """A whole split held as one uint8 tensor (N, C, H, W) plus int64 labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str],
                 image_size: tuple[int, int] | None, resize: str, source: str):
        # images arrive as (N, H, W, C) uint8, the layout PIL and the file formats share
        if len(images) != len(labels):
            raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{source}: labels range {labels.min()}..{labels.max()}, expected "
                            f"0..{len(classes) - 1} for {len(classes)} classes")
        if image_size is not None:
            images = resize_batch(images, image_size, resize)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.images = self.images.contiguous()  # (N, C, H, W)
        self.labels = torch.from_numpy(labels)  # (N,)
        self.classes = list(classes)
        self.in_channels = self.images.shape[1]
        self.image_size = tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def parse_image_size(image_size) -> tuple[int, int] | None:
    """None, an int S or a pair (H, W) -> (H, W) or None."""
    if image_size is None:
        return None
    ints = (int, np.integer)
    size = (image_size, image_size) if isinstance(image_size, ints) else image_size
    pair = isinstance(size, (list, tuple)) and len(size) == 2
    if not pair or not all(isinstance(s, ints) and not isinstance(s, bool) and s > 0 for s in size):
        raise DataError(f"image_size {image_size!r}: expected a positive int or a pair (H, W)")
    return int(size[0]), int(size[1])
