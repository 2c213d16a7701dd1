"""Resize an image to (H, W) exactly as training did: "bicubic" or "nearest" (single-pixel).

This file imports nothing from the project: the serving archive ships it next to the model code,
so a served model resizes an upload with the very function its training data went through.

"nearest" is the paper's Appendix G "single-pixel" resize (Nguyen et al., arXiv 2406.09415):
every output pixel is one input pixel, taken at the centre of the output pixel's footprint, so
no new intensities appear. "bicubic" is PIL's antialiased BICUBIC, run per channel.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

MODES = ("bicubic", "nearest")


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Input index of each output pixel's centre: floor((i + 0.5) * n_in / n_out), in integers."""
    return (2 * np.arange(n_out) + 1) * n_in // (2 * n_out)


def as_uint8_array(img) -> np.ndarray:
    """A PIL image or array as a uint8 array (H, W) or (H, W, C); odd PIL modes become RGB."""
    if isinstance(img, Image.Image):
        if img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGB")
        return np.asarray(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 array (H, W) or (H, W, C), got {arr.dtype} "
                         f"{arr.shape}")
    return arr


def resize_image(img, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """Resize a PIL image or a uint8 array (H, W) / (H, W, C) to size (H, W); keeps the rank."""
    if mode not in MODES:
        raise ValueError(f"resize mode {mode!r}: expected one of {', '.join(MODES)}")
    arr = as_uint8_array(img)
    h_out, w_out = int(size[0]), int(size[1])
    if h_out < 1 or w_out < 1:
        raise ValueError(f"resize size {size}: expected two positive integers (H, W)")
    h_in, w_in = arr.shape[:2]
    if (h_in, w_in) == (h_out, w_out):
        return np.ascontiguousarray(arr)
    if mode == "nearest":
        rows, cols = nearest_index(h_in, h_out), nearest_index(w_in, w_out)
        return np.ascontiguousarray(arr[rows][:, cols])
    # per channel in mode "L": PIL would premultiply RGBA by alpha, and L works for any C
    planes = arr[..., None] if arr.ndim == 2 else arr
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c]))
                               .resize((w_out, h_out), Image.Resampling.BICUBIC))
                    for c in range(planes.shape[2])], axis=-1)
    return out[..., 0] if arr.ndim == 2 else out


def resize_batch(images: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """resize_image over a uint8 batch (N, H, W, C) -> (N, H', W', C)."""
    h_in, w_in = images.shape[1:3]
    if (h_in, w_in) == tuple(size):
        return images
    if mode == "nearest":  # one gather for the whole batch, same pixels as resize_image
        rows, cols = nearest_index(h_in, size[0]), nearest_index(w_in, size[1])
        return np.ascontiguousarray(images[:, rows][:, :, cols])
    out = np.empty((len(images), size[0], size[1], images.shape[3]), np.uint8)
    for i, img in enumerate(images):
        out[i] = resize_image(img, size, mode)
    return out
