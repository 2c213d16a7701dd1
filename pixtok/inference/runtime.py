"""What runs a model: a model folder -> a backend that maps a float (N, C, H, W) batch to the
model's output, on ONNX Runtime where the folder has an ONNX file and onnxruntime imports, else
on PyTorch. No TorchServe imports.

The task runners (classifier.py, depth_estimator.py) put their pre- and postprocessing around a
backend; the handlers and the KServe server name the device and the backend with pick_device
and describe_backend.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pixtok.models import build_model


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
    """Runs an ONNX file with ONNX Runtime; the CUDA provider first when the worker has a GPU.

    Its intra-op threads are the worker's share of the cores, the same count torch was given
    (OMP_NUM_THREADS in a TorchServe worker; `threads` where the caller shares them out), so an
    ONNX Runtime worker never takes more cores than a PyTorch one would."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, threads: int | None = None,
                 name: str = "onnxruntime"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        self.threads = max(1, int(threads or torch.get_num_threads()))
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.name = name
        self.provider = self.session.get_providers()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def describe(self) -> str:
        """What the ready line says: the backend, its provider and its threads."""
        return (f"{self.name}, {torch.get_num_threads()} torch threads, {self.threads} "
                f"onnxruntime threads, {self.provider}")


def onnx_runtime_available(device: torch.device | str = "cpu") -> bool:
    """onnxruntime imports, and on a GPU worker it has the CUDA provider (a CPU-only
    onnxruntime on a GPU worker would be slower than PyTorch on the GPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if torch.device(device).type == "cuda":
        return "CUDAExecutionProvider" in ort.get_available_providers()
    return True


def describe_backend(backend) -> str:
    """A backend as the ready lines name it: `torch, 2 torch threads` or
    `onnxruntime, 2 torch threads, 2 onnxruntime threads, CPUExecutionProvider`."""
    if hasattr(backend, "describe"):
        return backend.describe()
    return f"{getattr(backend, 'name', 'custom')}, {torch.get_num_threads()} torch threads"


INT8_ONNX = "model.int8.onnx"    # `pixtok export --quantize int8`: passed its check at export


def pick_onnx(model_dir: Path, device: torch.device) -> tuple[Path, str] | None:
    """(ONNX file, backend name) the folder's model runs as, or None for PyTorch: the int8
    file on a CPU worker where the archive has one, else model.onnx; none without onnxruntime."""
    if not onnx_runtime_available(device):
        return None
    if device.type == "cpu" and (model_dir / INT8_ONNX).is_file():
        return model_dir / INT8_ONNX, "onnxruntime-int8"
    if (model_dir / "model.onnx").is_file():
        return model_dir / "model.onnx", "onnxruntime"
    return None


def load_backend(model_dir, device: torch.device | str = "cpu", prefer_onnx: bool = True,
                 threads: int | None = None):
    """A folder with config.json and model.safetensors (and maybe model.onnx) -> (backend, config).

    ONNX Runtime runs the model when the folder has model.onnx (or model.int8.onnx, on a CPU)
    and onnxruntime imports (on a GPU worker: with its CUDA provider); otherwise PyTorch does,
    with the weights from model.safetensors (never a pickle). `threads`: ONNX Runtime's intra-op
    threads (default: torch's count, the worker's share).
    """
    from safetensors.torch import load_file

    model_dir, device = Path(model_dir), torch.device(device)
    config = json.loads((model_dir / "config.json").read_text())
    onnx = pick_onnx(model_dir, device) if prefer_onnx else None
    if onnx is not None:
        return OnnxBackend(onnx[0], device, threads, onnx[1]), config
    model = build_model(config["model"])
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return TorchBackend(model, device), config
