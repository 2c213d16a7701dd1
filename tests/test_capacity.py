"""Capacity notes: the per-recipe arithmetic, checked against the model's own FLOP formula."""
from __future__ import annotations

from flop_formulas import vit_flops

from pixtok.models.vit import vit_config
from tools.capacity import H100_BF16, MFU, recipe_capacity


def test_vit_t1_cifar100_capacity_by_hand():
    r = recipe_capacity("vit-t1-cifar100")
    fwd = vit_flops(vit_config("ViT-T/1", image_size=(32, 32), num_classes=100))
    assert r["forward_flops_per_image"] == fwd
    assert r["flops_per_epoch"] == 3 * fwd * 50_000
    assert r["flops_total"] == 3 * fwd * 50_000 * 2400
    assert abs(r["gpu_hours"] - 3 * fwd * 50_000 * 2400 / (MFU * H100_BF16) / 3600) < 1e-9


def test_patch_size_scales_the_cost():
    """1x1 patches cost far more than 2x2 at the same size: the price the paper pays."""
    t1 = recipe_capacity("vit-t1-cifar100")["forward_flops_per_image"]
    t2 = recipe_capacity("vit-t2-cifar100")["forward_flops_per_image"]
    assert 4 < t1 / t2 < 16                  # 4x the tokens: linear parts x4, attention x16
    l1 = recipe_capacity("dit-l1-imagenet")["forward_flops_per_image"]
    l2 = recipe_capacity("dit-l2-imagenet")["forward_flops_per_image"]
    assert 4 < l1 / l2 < 16
