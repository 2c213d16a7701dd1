"""`make gpu-check`'s CPU dry run: the script a lent GPU runs, end to end at tiny sizes (KServe
server on tiny models, real requests, bf16 training steps with FlopCounterMode), so that the
15 minutes of a GPU are never spent finding a bug in it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_classifier, make_depth, make_generator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import peak_flops  # noqa: E402


@pytest.mark.serve
def test_gpu_check_dry_run_measures_every_step_it_can_on_a_cpu(tmp_path):
    store = tmp_path / "store"
    make_classifier(store / "tiny-cls")
    make_depth(store / "tiny-depth")
    make_generator(store / "tiny-gen")
    out = tmp_path / "out"
    env = {**os.environ, "PIXTOK_GPU_CHECK_INSTALL": "0", "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run",
                           "--store", str(store)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["dry_run"] is True and results["steps"]["env"]["cuda"] is False
    served = results["steps"]["serve-kserve"]
    assert "error" not in served, served
    models = served["models"]
    assert {m: r["task"] for m, r in models.items()} == {
        "tiny-cls": "classify", "tiny-depth": "depth", "tiny-gen": "generate"}
    # the image models' archives were built with their ONNX files and run on ONNX Runtime
    assert models["tiny-cls"]["backend"] == models["tiny-depth"]["backend"] == "onnxruntime"
    assert models["tiny-gen"]["backend"] == "torch"
    for r in models.values():
        assert 0 < r["batch1_p50_ms"] <= r["batch1_p99_ms"] and r["batch1_n"] == 3
        assert r["clients16"]["clients"] == 16 and r["clients16"]["images_per_s"] > 0
    assert any("tiny-cls (classify) ready on cpu (onnxruntime" in line
               for line in served["ready_lines"]), served["ready_lines"]
    for kind in ("vit", "dit"):
        mfu = results["steps"][f"mfu-{kind}"]
        assert mfu["flops_per_step"] > 0 and mfu["seconds_per_step"] > 0
        assert mfu["mfu"] is None and "no peak" in mfu["note"]          # a CPU has none here
    assert "needs CUDA" in results["skipped"]["study"]
    assert "pixtok study patch-size-fashion-28 scale=gpu" in results["skipped"]["study"]
    assert "serve-torchserve" in results["skipped"]


def test_peak_is_read_from_the_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some CPU") is None
