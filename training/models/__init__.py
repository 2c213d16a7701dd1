"""Model registry: a checkpoint's config.json "model" entry -> nn.Module.

config["model"] = {"arch": "vit", "name": "ViT-T/1", "args": {...ViTConfig fields...}}
"""
from __future__ import annotations

from torch import nn


def build_model(spec: dict) -> nn.Module:
    arch = spec.get("arch")
    if arch == "vit":
        from training.models.vit import ViT, ViTConfig
        return ViT(ViTConfig(**spec["args"]))
    raise ValueError(f"unknown model architecture {arch!r}")
