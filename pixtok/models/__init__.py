"""Model registry: a checkpoint's config.json "model" entry -> nn.Module.

config["model"] = {"arch": "vit", "name": "ViT-T/1", "args": {...ViTConfig fields...}}

MODELS maps each `arch` to the builder that takes its `args`; every builder imports its model
code when it is called (a classifier's archive never loads diffusers).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn


def vit_from_args(args: dict) -> nn.Module:
    from pixtok.models.vit import ViT, ViTConfig

    return ViT(ViTConfig(**args))


def dit_from_args(args: dict) -> nn.Module:
    from pixtok.models.dit import PixelDiT

    return PixelDiT(**args)


def depth_vit_from_args(args: dict) -> nn.Module:
    from pixtok.models.depth import DepthViT

    return DepthViT.from_args(args)


def mae_from_args(args: dict) -> nn.Module:
    from pixtok.models.mae import MAE, MAEConfig

    return MAE(MAEConfig(**args))


def vqgan_from_args(args: dict) -> nn.Module:
    """A diffusers VQModel from its keyword arguments (training/tasks/vqgan.py writes them)."""
    from diffusers import VQModel

    return VQModel(**args)


MODELS: dict[str, Callable[[dict], nn.Module]] = {
    "vit": vit_from_args, "dit": dit_from_args, "vit-depth": depth_vit_from_args,
    "mae": mae_from_args, "vqgan": vqgan_from_args,
}


def build_model(spec: dict) -> nn.Module:
    arch = spec.get("arch")
    if arch not in MODELS:
        raise ValueError(f"unknown model architecture {arch!r}")
    return MODELS[arch](spec["args"])
