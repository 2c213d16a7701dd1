"""Image model -> ONNX (dynamo exporter, dynamic batch axis), checked against PyTorch."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from pixtok.checkpoint import atomic_write

OPSET = 18
TOLERANCE = 1e-3     # compare_with_torch: fp32 reordering gives ~1e-6


class OnnxMismatch(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, int, int], path: Path,
                opset: int = OPSET, output_name: str = "logits") -> float:
    """Write model as ONNX to path (input "images" (N, C, H, W), one output named output_name:
    a classifier's "logits" (N, K), a depth model's "depth" (N, 1, H, W)).

    Returns the max difference against PyTorch over two batch sizes, and raises OnnxMismatch
    when it exceeds TOLERANCE. The file is written atomically and holds its weights inline.
    """
    model = model.eval().cpu()
    example = torch.rand(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = Path(path)
    # the exporter reports each stage at INFO and warns that torchvision ops are missing
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    checked = {}

    def write(tmp: str) -> None:     # a mismatch raises here, and the file never appears
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.export's own deprecations
            torch.onnx.export(model, (example,), tmp, dynamo=True, input_names=["images"],
                              output_names=[output_name], dynamic_shapes=({0: batch},),
                              opset_version=opset, external_data=False, verbose=False)
        checked["diff"] = compare_with_torch(model, tmp, input_shape)
        if not checked["diff"] <= TOLERANCE:
            raise OnnxMismatch(f"ONNX export of {path.name} differs from PyTorch by "
                               f"{checked['diff']:.3g} (tolerance {TOLERANCE})")

    atomic_write(path, write)
    return checked["diff"]


def compare_with_torch(model: torch.nn.Module, onnx_path, input_shape,
                       batch_sizes=(1, 5), seed: int = 0) -> float:
    """Max difference between onnxruntime and torch over random batches of several sizes (a
    dynamic batch axis): absolute for outputs up to 1, relative above (depths of tens of metres
    go through exp, and fp32 keeps about 1e-6 of a value, not of a metre)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batch_sizes:
        x = torch.rand(n, *input_shape, generator=gen)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        if got.shape != expected.shape:
            raise OnnxMismatch(f"ONNX output shape {got.shape} for batch {n}, expected "
                               f"{expected.shape}")
        error = np.abs(got - expected) / np.maximum(1.0, np.abs(expected))
        worst = max(worst, float(error.max()))
    return worst
