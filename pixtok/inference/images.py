"""Decode uploaded image bytes safely into the uint8 pixels a model expects.

Only five formats are opened (PNG, JPEG, WebP, BMP, GIF's first frame), so no rarely used decoder
ever sees a stranger's bytes. The pixel count is read from the header and checked before any pixel
is decoded: a 100-byte PNG can claim 20000 x 20000 pixels (a decompression bomb).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .validate import RequestError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_PIXELS = int(os.environ.get("PIXTOK_MAX_PIXELS", 4096 * 4096))    # 16 megapixels


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, refusing other formats, bombs and truncated files."""
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:   # PIL's own, far larger limit
        raise RequestError(413, "image_too_large", "the image has more pixels than the limit "
                           f"of {max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(400, "bad_image", "the body is not a PNG, JPEG, WebP, BMP or GIF "
                           "image") from None
    w, h = img.size
    if w * h > max_pixels:
        raise RequestError(413, "image_too_large", f"the image is {w}x{h} = {w * h} pixels; "
                           f"the limit is {max_pixels}")
    if w < 1 or h < 1:
        raise RequestError(400, "bad_image", f"the image is {w}x{h} pixels")
    try:
        img.load()    # a GIF opens on its first frame, which is the one we use
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise RequestError(400, "bad_image",
                           f"the {img.format} image is truncated or corrupt ({e})") from None
    return img


def to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Any decoded mode -> uint8 (H, W, channels): 1 channel is luminance L, 3 is RGB.

    Alpha is dropped as training's convert("RGB") drops it; 16-bit images are scaled to 8 bits
    (PIL's own I;16 -> L conversion clips everything above 255 to white).
    """
    if img.mode.startswith("I"):            # I;16, I;16B, I: 16-bit grey PNGs
        wide = np.asarray(img).astype(np.int64)
        grey = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
        img = Image.fromarray(grey)
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def decode_image(data: bytes, channels: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 (H, W, channels), or a RequestError saying what was wrong."""
    if channels not in (1, 3):
        raise ValueError(f"a model with {channels} input channels cannot take images")
    return to_array(open_image(data, max_pixels), channels)
