"""Shared fixtures: tiny classifier checkpoints, and ONE real TorchServe for the whole session.

The server is started by the code `pixtok serve` runs (serving.launcher.start) on a temporary run
folder and free ports, so it never meets a user's server or the default ports. Its keys expire
every 6 seconds, so every test also exercises the client's key renewal.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import save_weights, write_json
from training.models.vit import ViT, vit_config

LABELS = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
          "boot"]


def make_classifier(folder: Path, image_size=(8, 8), channels: int = 1, seed: int = 0,
                    resize: str = "bicubic") -> Path:
    """A random-weight ViT-F/1 classifier checkpoint folder, as `pixtok train` lays it out."""
    torch.manual_seed(seed)
    cfg = vit_config("ViT-F/1", image_size=image_size, in_channels=channels,
                     num_classes=len(LABELS))
    model = ViT(cfg)
    write_json(folder / "config.json", {
        "format": "pixtok-checkpoint/1", "task": "classify",
        "model": {"arch": "vit", "name": "ViT-F/1", "args": cfg.to_dict()},
        "labels": LABELS,
        "input": {"image_size": list(image_size), "channels": channels, "resize": resize},
        "data": {"name": "generated"}, "recipe": {}, "git_commit": None, "step": 0})
    save_weights(folder / "model.safetensors", model.state_dict())
    return folder


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("ckpt") / "tiny-cls")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A running TorchServe with tiny-cls (PyTorch, built by the launcher from its checkpoint
    folder) and tiny-cls-onnx (the same weights through ONNX Runtime)."""
    from export.archive import export_archive
    from serving import launcher

    store = tmp_path_factory.mktemp("model_store")
    ckpt = make_classifier(store / "tiny-cls")
    export_archive(ckpt, store, name="tiny-cls-onnx", onnx=True, log=lambda *_: None)
    run_dir = tmp_path_factory.mktemp("run")
    srv = launcher.start(store, run_dir=run_dir, timeout=120, log=lambda *_: None,
                         ports=launcher.free_ports(), token_expiration_min=0.1)
    srv.checkpoint = ckpt
    yield srv
    launcher.stop(run_dir, log=lambda *_: None)
