"""Model registry: a checkpoint's config.json "model" entry -> nn.Module.

config["model"] = {"arch": "vit", "name": "ViT-T/1", "args": {...ViTConfig fields...}}
"""
from __future__ import annotations

from torch import nn


def build_model(spec: dict) -> nn.Module:
    arch = spec.get("arch")
    if arch == "vit":
        from pixtok.models.vit import ViT, ViTConfig
        return ViT(ViTConfig(**spec["args"]))
    elif arch == "dit":
        from pixtok.models.dit import PixelDiT
        return PixelDiT(**spec["args"])
    elif arch == "vit-depth":
        from pixtok.models.depth import DepthViT
        return DepthViT.from_args(spec["args"])
    elif arch == "mae":
        from pixtok.models.mae import MAE, MAEConfig
        return MAE(MAEConfig(**spec["args"]))
    raise ValueError(f"unknown model architecture {arch!r}")
