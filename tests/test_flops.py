"""Our FLOP counter against by-hand formulas and against a real (non-meta) CPU forward."""
from __future__ import annotations

import pytest
import torch
from flop_formulas import dit_flops, vit_flops
from torch import nn

from pixtok.models.vit import ViT, vit_config
from training.flops import FlopCounter, count_forward_flops


@pytest.mark.parametrize("name, side, pool", [("ViT-T/1", 32, "cls"), ("ViT-S/2", 32, "mean"),
                                              ("ViT-B/1", 28, "cls")])
def test_counter_matches_the_vit_formula_on_paper_sizes(name, side, pool):
    cfg = vit_config(name, image_size=(side, side), num_classes=100, pool=pool)
    counted = count_forward_flops(lambda: ViT(cfg), (lambda: torch.rand(1, 3, side, side),))
    assert counted == vit_flops(cfg)


@pytest.mark.parametrize("name, side", [("DiT-L/1", 32), ("DiT-L/2", 32), ("DiT-S/1", 8)])
def test_counter_matches_the_dit_formula(name, side):
    """The DiT FLOPs that tools/capacity.py and docs/capacity.md quote: the counter agrees
    with the formula, adaLN modulation and the timestep MLP included."""
    from pixtok.models import build_model
    from pixtok.models.dit import dit_config

    cfg = dit_config(name, sample_size=side, in_channels=4, num_classes=1000)
    y = torch.zeros(1, dtype=torch.long)
    counted = count_forward_flops(lambda: build_model({"arch": "dit", "args": cfg}),
                                  (lambda: torch.rand(1, 4, side, side), lambda: y, lambda: y))
    assert counted == dit_flops(cfg)


def test_counter_on_a_real_forward_with_the_cpu_attention_kernel():
    cfg = vit_config("ViT-F/1", image_size=(8, 8), num_classes=10)
    model = ViT(cfg)
    with FlopCounter() as fc, torch.no_grad():
        model(torch.rand(3, 3, 8, 8))
    assert fc.total == 3 * vit_flops(cfg)
    assert any("attention" in op for op in fc.by_op)          # SDPA counted, not skipped


def test_counter_on_convolutions_by_hand():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)               # 16x16 -> 8x8
    up = nn.ConvTranspose2d(8, 4, 2, stride=2)                   # 8x8 -> 16x16
    with FlopCounter() as fc, torch.no_grad():
        up(conv(torch.rand(2, 3, 16, 16)))
    assert fc.total == 2 * 2 * 8 * 8 * 8 * 3 * 9 + 2 * 2 * 8 * 8 * 8 * 4 * 4
