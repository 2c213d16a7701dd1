"""The classifier's inference core: image bytes -> the top classes with their scores. No
TorchServe imports.

An upload is decoded, resized to the model's input with the resize its training data went
through (pixtok/resize.py) and batched; the model runs on a backend of runtime.py.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from pixtok.resize import resize_image

from .images import MAX_PIXELS, decode_image
from .runtime import load_backend
from .validate import check_image_request


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class ImageClassifier:
    """Image bytes -> {"label", "index", "score", "top_k"}: decode, resize as in training, batch."""

    def __init__(self, backend: Callable[[np.ndarray], np.ndarray], config: dict,
                 top_k: int = 5, max_pixels: int = MAX_PIXELS):
        self.backend = backend
        self.labels = list(config["labels"])
        spec = config["input"]
        self.size = tuple(spec["image_size"])          # (H, W)
        self.channels = int(spec["channels"])
        self.resize_mode = spec.get("resize", "bicubic")
        self.top_k = min(top_k, len(self.labels))
        self.max_pixels = max_pixels

    def preprocess(self, body, content_type: str | None = None) -> np.ndarray:
        """One request body -> float32 (C, H, W) in [0, 1], or a RequestError."""
        data = check_image_request(body, content_type)
        pixels = decode_image(data, self.channels, self.max_pixels)     # (h, w, C) uint8
        pixels = resize_image(pixels[..., 0] if self.channels == 1 else pixels,
                              self.size, self.resize_mode)
        pixels = pixels.reshape(*self.size, self.channels)              # (H, W, C)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 255.0

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        """A batch of preprocessed images -> one answer each, in order."""
        return [self.postprocess(row) for row in self.probabilities(images)]

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """A batch of preprocessed images -> float64 (N, classes) class probabilities."""
        logits = self.backend(np.stack(images))          # (N, classes)
        return softmax(logits.astype(np.float64))

    def postprocess(self, probs: np.ndarray) -> dict:
        order = np.argsort(-probs, kind="stable")[: self.top_k]
        top = [{"label": self.labels[i], "index": int(i), "score": float(probs[i])}
               for i in order]
        if not all(math.isfinite(t["score"]) for t in top):
            raise FloatingPointError("the model produced non-finite scores")
        return {**top[0], "top_k": top}


def load_classifier(model_dir, device: torch.device | str = "cpu", prefer_onnx: bool = True,
                    threads: int | None = None) -> ImageClassifier:
    """A classifier's model folder -> ImageClassifier (ONNX Runtime or PyTorch: load_backend)."""
    backend, config = load_backend(model_dir, device, prefer_onnx, threads)
    return ImageClassifier(backend, config)


def load(model_dir, device: torch.device | str = "cpu") -> ImageClassifier:
    """The classify task's runner (pixtok/tasks.py): its ImageClassifier on device."""
    return load_classifier(model_dir, device)
