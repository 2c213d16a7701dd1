"""The one in-memory form every depth data set takes (training/data/depth.py's NYU-v2 and
folders, training/data/scenes.py's rendered scenes): RGB-D pairs as tensors."""
from __future__ import annotations

import torch


class DepthDataset:
    """RGB-D pairs held as uint8 images (N, 3, H, W) and float32 depths (N, 1, H, W).

    Invalid depths (NaN, inf, <= 0) become 0, in a copy; `own=True` says the caller hands its
    arrays over, so float32 depths are cleaned in place (no second copy of a large set)."""

    def __init__(self, images: torch.Tensor, depths: torch.Tensor, own: bool = False):
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if depths.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(f"depths {tuple(depths.shape)} do not match images "
                             f"{tuple(images.shape)}")
        if not (own and depths.dtype == torch.float32):
            depths = depths.to(torch.float32, copy=True)
        # one marker for NaN, inf and depths <= 0: 0, set in place (no temporaries)
        depths.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
        self.images = images.contiguous()
        self.depths = depths.contiguous()
        self.image_size = tuple(images.shape[2:])
        self.in_channels = 3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.depths[i]
