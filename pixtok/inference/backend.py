"""The inference core: a model folder -> a batched, validated predictor. No TorchServe imports.

The same code runs inside a TorchServe worker (shipped in the .mar as pixtok_model/) and in
process (tests, `pixtok bench serve`). Model code is passed in (build_model, resize_image) rather
than imported, so an archive carries its own copy and needs no pixtok install.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .images import MAX_PIXELS, decode_image
from .validate import check_image_request


def pick_device(gpu_id=None) -> torch.device:
    """TorchServe's gpu_id (None on CPU hosts) -> the torch device this worker runs on."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


class TorchBackend:
    """Runs an nn.Module on float (N, C, H, W) numpy batches; bf16 autocast on CUDA."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(x).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            out = self.model(batch)
        return out.float().cpu().numpy()


class OnnxBackend:
    """Runs an ONNX file with ONNX Runtime; the CUDA provider first when the worker has a GPU."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: torch.device):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def onnx_runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class ImageClassifier:
    """Image bytes -> {"label", "index", "score", "top_k"}: decode, resize as in training, batch."""

    def __init__(self, backend: Callable[[np.ndarray], np.ndarray], config: dict,
                 resize_image: Callable, top_k: int = 5, max_pixels: int = MAX_PIXELS):
        self.backend = backend
        self.labels = list(config["labels"])
        spec = config["input"]
        self.size = tuple(spec["image_size"])          # (H, W)
        self.channels = int(spec["channels"])
        self.resize_mode = spec.get("resize", "bicubic")
        self.resize_image = resize_image
        self.top_k = min(top_k, len(self.labels))
        self.max_pixels = max_pixels

    def preprocess(self, body, content_type: str | None = None) -> np.ndarray:
        """One request body -> float32 (C, H, W) in [0, 1], or a RequestError."""
        data = check_image_request(body, content_type)
        pixels = decode_image(data, self.channels, self.max_pixels)     # (h, w, C) uint8
        pixels = self.resize_image(pixels[..., 0] if self.channels == 1 else pixels,
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


def load_backend(model_dir, build_model: Callable[[dict], torch.nn.Module],
                 device: torch.device | str = "cpu", prefer_onnx: bool = True):
    """A folder with config.json and model.safetensors (and maybe model.onnx) -> (backend, config).

    ONNX Runtime runs the model when the folder has model.onnx and onnxruntime imports;
    otherwise PyTorch does, with the weights from model.safetensors (never a pickle).
    """
    from safetensors.torch import load_file

    model_dir, device = Path(model_dir), torch.device(device)
    config = json.loads((model_dir / "config.json").read_text())
    onnx_path = model_dir / "model.onnx"
    if prefer_onnx and onnx_path.is_file() and onnx_runtime_available():
        return OnnxBackend(onnx_path, device), config
    model = build_model(config["model"])
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return TorchBackend(model, device), config


def load_classifier(model_dir, build_model: Callable[[dict], torch.nn.Module],
                    resize_image: Callable, device: torch.device | str = "cpu",
                    prefer_onnx: bool = True) -> ImageClassifier:
    """A classifier's model folder -> ImageClassifier (ONNX Runtime or PyTorch: load_backend)."""
    backend, config = load_backend(model_dir, build_model, device, prefer_onnx)
    return ImageClassifier(backend, config, resize_image)


def load(model_dir, device: torch.device | str = "cpu") -> ImageClassifier:
    """The classify task's runner (pixtok/tasks.py): its ImageClassifier, with this core's own
    model code and resize."""
    from pixtok.models import build_model
    from pixtok.resize import resize_image

    return load_classifier(model_dir, build_model, resize_image, device)
