"""ONNX by default and the int8 variant behind its check (export/quantize.py): real exports,
real ONNX Runtime sessions, real held-out data where the project has it."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import pixtok

from export.archive import ExportError, build_missing_archives, export_archive
from export.quantize import MIN_AGREEMENT, QuantizationRefused, check_classifier
from pixtok.checkpoint import load_model
from pixtok.inference.depth_estimator import load_depth_estimator
from pixtok.inference.runtime import load_backend
from training.held_out import held_out_sample

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *_: None}


def depth_sample(ckpt: Path, exact: bool = False, n: int = 64):
    """Noise images and a 'ground truth': the model's own depths, with 10 % noise on them
    (exact: without, so that fp32 is perfect and no int8 file can stay within 1 % of it)."""
    model, _ = load_model(ckpt)
    rng = np.random.default_rng(3)
    images = rng.random((n, 3, 12, 16), dtype=np.float32)
    with torch.inference_mode():
        depth = model(torch.from_numpy(images)).numpy()
    if not exact:
        depth = depth * (1 + 0.1 * rng.standard_normal(depth.shape)).astype(np.float32)
    return lambda config: (images, depth, f"{n} noise images")


def test_the_default_models_archive_carries_onnx_and_runs_on_onnxruntime(tmp_path):
    """What `pixtok serve` builds for the default store: the shipped classifier's archive holds
    model.onnx, and its model folder (as the KServe server unpacks it) runs on ONNX Runtime
    with the same top-1 classes as PyTorch."""
    store = tmp_path / "store"
    shutil.copytree(ROOT / "model_store" / "fashion-vit1", store / "fashion-vit1")
    [mar] = build_missing_archives(store, **QUIET)
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z:
        assert {"model.onnx", "model.safetensors", "config.json"} <= set(z.namelist())
        z.extractall(folder)
    onnx, config = load_backend(folder)
    torch_backend, _ = load_backend(folder, prefer_onnx=False)
    assert (onnx.name, torch_backend.name) == ("onnxruntime", "torch")
    assert onnx.threads == torch.get_num_threads()          # the worker's share, as torch's
    images, labels, _ = held_out_sample(config, n=64)
    np.testing.assert_array_equal(onnx(images).argmax(1), torch_backend(images).argmax(1))


def test_held_out_sample_is_the_checkpoints_test_split():
    config = json.loads((ROOT / "model_store" / "fashion-vit1" / "config.json").read_text())
    images, labels, source = held_out_sample(config, n=50)
    assert images.shape == (50, 1, 28, 28) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.max() > 0.5
    assert labels.shape == (50,) and set(labels) <= set(range(10)) and len(set(labels)) > 3
    assert "test" in source
    with pytest.raises(Exception, match="names none"):
        held_out_sample({"task": "classify", "data": {"name": "generated"}})


def test_int8_archive_passes_its_check_and_is_served_as_int8(tiny_depth, tmp_path):
    mar = export_archive(tiny_depth, tmp_path, name="d8", quantize="int8",
                         held_out=depth_sample(tiny_depth), **QUIET)
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z:
        assert {"model.onnx", "model.int8.onnx", "quantization.json"} <= set(z.namelist())
        z.extractall(folder)
    record = json.loads((folder / "quantization.json").read_text())
    assert record["scheme"] == "int8" and record["passed"] is True and record["n"] == 64
    assert record["metric"] == "rmse_ratio" and record["value"] <= 1.01
    assert record["rmse_int8"] == pytest.approx(record["rmse_fp32"], rel=0.01)
    int8 = load_depth_estimator(folder)
    fp32 = load_depth_estimator(folder, prefer_onnx=False)
    assert int8.backend.name == "onnxruntime-int8" and fp32.backend.name == "torch"
    x = np.random.default_rng(0).random((4, 3, 12, 16), dtype=np.float32)
    np.testing.assert_allclose(int8.backend(x), fp32.backend(x), rtol=0.1)
    # a rebuild (stale archive) keeps the int8 flavour and checks it again
    store = tmp_path / "store"
    shutil.copytree(tiny_depth, store / "d8")
    shutil.copy2(mar, store / "d8.mar")
    os.utime(store / "d8.mar", (1, 1))                       # older than its checkpoint
    [rebuilt] = build_missing_archives(store, held_out=depth_sample(tiny_depth), **QUIET)
    with zipfile.ZipFile(rebuilt) as z:
        assert "model.int8.onnx" in z.namelist()


def test_int8_that_fails_its_check_is_refused_and_no_archive_is_written(tiny_depth, tmp_path):
    with pytest.raises(QuantizationRefused) as refused:
        export_archive(tiny_depth, tmp_path, name="d8", quantize="int8",
                       held_out=depth_sample(tiny_depth, exact=True), **QUIET)
    message = str(refused.value)
    assert "\n" not in message and "int8 quantization refused: rmse_ratio" in message
    assert "no archive written" in message
    assert not (tmp_path / "d8.mar").exists()


def test_classifier_check_asks_995_agreement():
    rng = np.random.default_rng(0)
    fp32 = rng.standard_normal((1000, 10))
    labels = fp32.argmax(1)

    def flip(k: int) -> np.ndarray:          # the top-1 answer of the first k images changes
        out = fp32.copy()
        for i in range(k):
            out[i, fp32[i].argmin()] = fp32[i].max() + 1
        return out

    refused, passed = check_classifier(fp32, flip(6), labels), check_classifier(fp32, flip(5),
                                                                                labels)
    assert refused["passed"] is False and refused["value"] == pytest.approx(0.994)
    assert passed["passed"] is True and passed["value"] == pytest.approx(MIN_AGREEMENT)
    assert passed["acc1_fp32"] == 1.0 and passed["acc1_int8"] == pytest.approx(0.995)


def test_cli_quantize_errors_are_one_line(tiny_classifier, tmp_path):
    done = pixtok("export", tiny_classifier, "--out", tmp_path, "--quantize", "int8",
                  "--no-onnx", check=False)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "--quantize needs the ONNX file" in done.stderr
    # a checkpoint whose config names no data set cannot be checked, so it is not quantized
    done = pixtok("export", tiny_classifier, "--out", tmp_path, "--quantize", "int8",
                  check=False)
    assert done.returncode == 2 and "names none" in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert not list(tmp_path.glob("*.mar"))
    with pytest.raises(ExportError, match="image models"):
        export_archive(ROOT / "model_store" / "fashion-dit1", tmp_path, quantize="int8",
                       held_out=lambda c: None, **QUIET)
