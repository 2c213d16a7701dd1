"""A fixed pixel permutation of every image (the paper's Sec. 5 locality test).

`swaps` random transpositions, applied one after the other to the identity: each picks a pixel
uniformly and a partner uniformly among the other pixels at most `distance` away (max-norm;
0 = anywhere in the image). Few swaps at a small distance keep the image almost local; as many
swaps as pixels at any distance scramble it. The permutation is a function of (H, W, swaps,
distance, seed) only, so train, val and test, and `pixtok eval` later, all see the same one.
"""
from __future__ import annotations

import numpy as np
import torch


def pixel_permutation(h: int, w: int, swaps: int, distance: int = 0, seed: int = 0) -> torch.Tensor:
    """perm (H*W,) int64: output pixel k takes input pixel perm[k] (row-major indices)."""
    rng = np.random.default_rng([seed, h, w, swaps, distance])
    perm = np.arange(h * w)
    if h * w < 2:
        return torch.from_numpy(perm)
    for _ in range(swaps):
        i = int(rng.integers(h * w))
        if distance <= 0:
            j = int(rng.integers(h * w - 1))
            j += j >= i                                   # any pixel but i
        else:
            y, x = divmod(i, w)
            ys = np.arange(max(0, y - distance), min(h, y + distance + 1))
            xs = np.arange(max(0, x - distance), min(w, x + distance + 1))
            near = (ys[:, None] * w + xs[None, :]).ravel()
            near = near[near != i]
            j = int(near[rng.integers(len(near))])
        perm[i], perm[j] = perm[j], perm[i]
    return torch.from_numpy(perm)


class PermutedPixels:
    """A data set whose images all have their pixels permuted by `perm` (H*W,); in-memory sets
    are permuted once, as a whole."""

    def __init__(self, base, perm: torch.Tensor):
        self.base, self.perm = base, perm
        images = getattr(base, "images", None)
        if images is not None:
            n, c, h, w = images.shape
            self.images = images.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w).contiguous()

    def __getattr__(self, name):
        if name in ("base", "perm"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, *rest = self.base[i]
        c, h, w = image.shape
        return (image.reshape(c, h * w)[:, self.perm].reshape(c, h, w), *rest)
