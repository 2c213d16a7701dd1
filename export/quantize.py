"""`pixtok export --quantize int8`: ONNX Runtime's dynamic int8 quantization, kept only when it
passes a check against the fp32 ONNX file on held-out data.

Dynamic quantization stores the weights of every MatMul / Gemm as int8 and quantizes the
activations per batch at run time; on a CPU it runs the transformer's matrix products on int8
kernels. The check runs both files on a held-out sample of the checkpoint's own data:

- classifier: the int8 file's top-1 class agrees with the fp32 file's on >= 99.5 % of the images;
- depth model: the int8 file's RMSE against the ground truth is within 1 % of the fp32 file's.

The result is recorded in the archive as quantization.json; a failed check is an ExportError
(one line) and no archive is written.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from pixtok.errors import UserError

SCHEMES = ("int8",)
MIN_AGREEMENT = 0.995      # classifier: top-1 agreement with fp32
MAX_RMSE_RATIO = 1.01      # depth model: int8 RMSE / fp32 RMSE
RECORD = "quantization.json"
INT8_FILE = "model.int8.onnx"     # pixtok/inference/runtime.py INT8_ONNX


class QuantizationRefused(UserError):
    """The quantized model failed its check against fp32 (or could not be checked)."""


def quantize_int8(fp32: Path, out: Path) -> None:
    """ONNX Runtime's dynamic quantization of fp32 into out: int8 weights (signed, one scale per
    output channel) for MatMul and Gemm, activations quantized at run time. Per channel: one
    scale per tensor flipped 0.7 % of the shipped classifier's top-1 answers, per channel 0.4 %."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)    # it advises "pre-processing" on the root logger
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.getLogger().setLevel(quiet)


def run_onnx(path: Path, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The model's output over images (N, C, H, W) float32, in batches, on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def rmse(depth: np.ndarray, truth: np.ndarray) -> float:
    """RMSE in metres over the measured pixels (ground truth > 0), as `pixtok eval` counts."""
    valid = truth > 0
    return float(np.sqrt(np.mean((depth[valid] - truth[valid]) ** 2)))


def check_classifier(fp32_out: np.ndarray, int8_out: np.ndarray, labels) -> dict:
    top_fp32, top_int8 = fp32_out.argmax(1), int8_out.argmax(1)
    record = {"metric": "top1_agreement", "value": float((top_fp32 == top_int8).mean()),
              "threshold": MIN_AGREEMENT}
    if labels is not None:
        record["acc1_fp32"] = float((top_fp32 == labels).mean())
        record["acc1_int8"] = float((top_int8 == labels).mean())
    record["passed"] = record["value"] >= MIN_AGREEMENT
    return record


def check_depth(fp32_out: np.ndarray, int8_out: np.ndarray, truth: np.ndarray) -> dict:
    fp32_rmse, int8_rmse = rmse(fp32_out, truth), rmse(int8_out, truth)
    ratio = int8_rmse / fp32_rmse if fp32_rmse > 0 else float("inf")
    return {"metric": "rmse_ratio", "value": ratio, "threshold": MAX_RMSE_RATIO,
            "rmse_fp32": fp32_rmse, "rmse_int8": int8_rmse, "passed": ratio <= MAX_RMSE_RATIO}


def check_int8(task: str, fp32: Path, int8: Path, sample: tuple[np.ndarray, np.ndarray | None],
               source: str) -> dict:
    """Both files on the held-out sample -> the record quantization.json keeps; raises
    QuantizationRefused when the int8 file fails."""
    images, targets = sample
    start = time.perf_counter()
    fp32_out, int8_out = run_onnx(fp32, images), run_onnx(int8, images)
    if task == "classify":
        check = check_classifier(fp32_out, int8_out, targets)
    else:
        if targets is None:
            raise QuantizationRefused("the depth check needs ground-truth depths")
        check = check_depth(fp32_out, int8_out, targets)
    record = {"scheme": "int8", "method": "onnxruntime dynamic quantization (QInt8 "
              "weights per channel, MatMul and Gemm)", "file": int8.name, "held_out": source,
              "n": len(images),
              "seconds": round(time.perf_counter() - start, 2), **check,
              "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size}
    if not check["passed"]:
        want = (f">= {MIN_AGREEMENT:.1%} top-1 agreement" if task == "classify"
                else f"RMSE within {MAX_RMSE_RATIO - 1:.0%} of fp32")
        raise QuantizationRefused(f"int8 quantization refused: {check['metric']} "
                                  f"{check['value']:.4f} on {len(images)} held-out images "
                                  f"({source}); the check asks {want}; no archive written")
    return record


def write_record(record: dict, folder: Path) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
