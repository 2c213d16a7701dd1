"""export.model_card: a run folder becomes a shipped model with its card and learning curve."""
from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def run_folder(tmp_path, task="classify", metrics=((1, 0.5), (2, 0.7), (3, 0.8))):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "format": "pixtok-checkpoint/1", "task": task, "step": 300, "epoch": 3.0,
        "recipe_name": "vit1-fashion", "git_commit": "abc123",
        "recipe": {"model": "ViT-P/1", "dataset": "fashion-mnist", "batch_size": 128,
                   "source": "a paper"}}))
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "train_state.pt").write_bytes(b"optimizer state")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 100 * e, "epoch": e, "acc1": a, "loss": 1 - a}) + "\n"
        for e, a in metrics))
    (tmp_path / "eval.json").write_text(json.dumps({"acc1": 0.81, "n": 10000}))
    return run


def card(tmp_path, *extra):
    out = subprocess.run([sys.executable, "-m", "export.model_card", str(tmp_path / "run"),
                          "--name", "my-model", "--store", str(tmp_path / "store"),
                          "--eval", str(tmp_path / "eval.json"), "--hours", "1.5",
                          "--command", "pixtok train vit1-fashion --out runs/x", *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tmp_path / "store" / "my-model"


def test_card_carries_commands_metrics_and_curve(tmp_path):
    run_folder(tmp_path)
    dst = card(tmp_path, "--notes", "Trained while other work ran.")
    assert sorted(p.name for p in dst.iterdir()) == [
        "README.md", "config.json", "curve.png", "metrics.jsonl", "model.safetensors"]
    text = (dst / "README.md").read_text()
    assert "pixtok train vit1-fashion --out runs/x" in text
    assert '"acc1": 0.81' in text and "1.50 hours" in text and "3.00 epochs" in text
    assert "![learning curve](curve.png)" in text and "Trained while other work ran." in text
    assert Image.open(dst / "curve.png").size == (500, 320)
    assert "(no GPU), one torch thread, niced and shared with other work;" in text
    dst = card(tmp_path, "--compute", "two torch threads for its last 4 epochs")
    assert "(no GPU), two torch threads for its last 4 epochs;" in (dst / "README.md").read_text()
    dst = card(tmp_path, "--machine", "one NVIDIA H200 GPU", "--compute", "bf16 autocast")
    assert "hours of wall time on one NVIDIA H200 GPU, bf16 autocast;" in \
        (dst / "README.md").read_text()


def test_curve_from_another_file_with_two_metrics(tmp_path):
    run_folder(tmp_path, task="dit")
    curve = tmp_path / "snapshots.jsonl"
    curve.write_text("".join(json.dumps({"epoch": e, "class_agreement": c, "fid_proxy": f}) + "\n"
                             for e, c, f in ((1, 0.4, 9.0), (2, 0.6, 5.0))))
    dst = card(tmp_path, "--curve", str(curve), "--key", "class_agreement", "--key", "fid_proxy")
    assert (dst / "curve.jsonl").read_text() == curve.read_text()
    assert Image.open(dst / "curve.png").format == "PNG"


def test_a_run_without_evaluations_says_so(tmp_path):
    run_folder(tmp_path, metrics=())
    dst = card(tmp_path)
    assert not (dst / "curve.png").exists()
    assert "No evaluation during training yet" in (dst / "README.md").read_text()
