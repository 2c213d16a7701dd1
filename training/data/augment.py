"""Batch augmentations: random crop + flip on uint8 images, MixUp / CutMix on float images.

Determinism: the training loop draws the random parameters for the *global* batch from a
torch.Generator seeded per step, and each DDP rank applies its slice of them, so one process and
two processes see the same augmentations. CropFlip's params are per sample (tensors (n,)) and
may be sliced like `{k: v[a:b] for k, v in params.items()}`.

MixUpCutMix follows timm's "batch" mode: one lambda for the batch, each image mixed with the
batch flipped. Its lambda and box come from the step's generator, so every rank uses the same
ones; the partner image is taken from the rank's own batch, as in timm.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class CropFlip:
    """Random crop of the image size from the zero-padded image, then a random horizontal flip."""

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise ValueError(f"padding {padding}: expected >= 0")
        self.padding = padding
        self.flip = flip

    def params(self, gen: torch.Generator, n: int, h: int, w: int) -> dict[str, torch.Tensor]:
        """Crop offsets into the padded image and flip flags for n images of size h x w."""
        # h and w do not change the draw (the crop is the image size); they let croppers that
        # depend on the size share this signature
        span = 2 * self.padding + 1
        top = torch.randint(0, span, (n,), generator=gen)
        left = torch.randint(0, span, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        return {"top": top, "left": left, "flip": flip & self.flip}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """x (n, C, H, W) -> the crops (n, C, H, W), one gather for the whole batch."""
        n, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p)) if p else x  # (n, C, H + 2p, W + 2p), zeros outside
        top, left, flip = (params[k].to(x.device) for k in ("top", "left", "flip"))
        rows = top[:, None] + torch.arange(h, device=x.device)  # (n, H)
        cols = left[:, None] + torch.arange(w, device=x.device)  # (n, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.params(gen, len(x), *x.shape[2:]))


def smooth_targets(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Labels (n,) -> targets (n, num_classes): 1 - smoothing + smoothing / K on the label,
    smoothing / K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((len(y), num_classes), off, device=y.device)
    return targets.scatter_(1, y[:, None], 1.0 - smoothing + off)


def cutmix_box(lam: float, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) of area about (1 - lam) h w, centred anywhere, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (1,), generator=gen))
    cx = int(torch.randint(0, w, (1,), generator=gen))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return top, bottom, left, right


class MixUpCutMix:
    """timm-style MixUp / CutMix on a batch, with label smoothing; soft targets (n, K)."""

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, *, num_classes: int):
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def beta(self, alpha: float, gen: torch.Generator) -> float:
        # torch's Beta takes no generator: seed numpy's from gen, so the draw follows gen
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        return float(np.random.default_rng(seed).beta(alpha, alpha))

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x float (n, C, H, W), y (n,) -> mixed x (n, C, H, W), soft targets (n, K)."""
        if not x.is_floating_point():
            raise TypeError(f"MixUpCutMix needs float images, got {x.dtype}")
        targets = smooth_targets(y, self.num_classes, self.label_smoothing)  # (n, K)
        use_mixup, use_cutmix = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if not (use_mixup or use_cutmix):
            return x, targets
        if use_mixup and use_cutmix:
            use_cutmix = bool(torch.rand(1, generator=gen) < self.switch_prob)
        lam = self.beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha, gen)
        partner = x.flip(0)
        if use_cutmix:
            h, w = x.shape[2:]
            top, bottom, left, right = cutmix_box(lam, h, w, gen)
            x = x.clone()
            x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # the area actually kept
        else:
            x = x * lam + partner * (1.0 - lam)
        return x, targets * lam + targets.flip(0) * (1.0 - lam)
