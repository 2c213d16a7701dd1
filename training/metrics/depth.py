"""Depth metrics (Eigen et al. 2014 conventions), over valid pixels only.

rmse (m), rel = mean |pred - gt| / gt (the paper's "RAE"), log10 = mean |log10 pred - log10 gt|,
delta_k = share of pixels with max(pred/gt, gt/pred) < 1.25**k. Pixels are pooled over the whole
set: every valid pixel weighs the same, whatever its image or batch (rmse is the root of the
pooled mean square, not a mean of per-image roots).

A monocular model may get a scene's layout right and its overall size wrong; two more numbers
split the error that way. The first dimension of pred/target is the image:
- rmse_scaled: rmse after each predicted map is multiplied by median(gt) / median(pred) over
  its valid pixels (the median scaling of scale-ambiguous evaluation), pixels pooled as above;
  rmse - rmse_scaled is what a wrong global scale per image costs.
- silog: the KITTI benchmark's scale-invariant log error, 100 * sqrt(mean(d^2) - mean(d)^2)
  with d = ln pred - ln gt over an image's valid pixels, averaged over the images.
"""
from __future__ import annotations

import math

import torch

from pixtok.models.depth import log_error_moments, valid_mask

MIN_DEPTH = 1e-3   # predictions are clamped to 1 mm so that log and ratios stay finite
KEYS = ("rmse", "rel", "delta1", "delta2", "delta3", "log10", "rmse_scaled", "silog", "n",
        "images")


class DepthMetrics:
    """Accumulates exact sums over batches; compute() gives the pooled metrics."""

    def __init__(self):
        self.sums = dict.fromkeys(("sq", "rel", "log10", "d1", "d2", "d3", "sq_scaled", "silog",
                                   "images"), 0.0)
        self.n = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None):
        mask = valid_mask(target, valid)
        pred = pred.detach().double().clamp_min(MIN_DEPTH)
        target = target.detach().double()
        p, t = pred[mask], target[mask]                          # (M,) valid pixels
        ratio = torch.maximum(p / t, t / p)
        self.sums["sq"] += ((p - t) ** 2).sum().item()
        self.sums["rel"] += ((p - t).abs() / t).sum().item()
        self.sums["log10"] += (torch.log10(p) - torch.log10(t)).abs().sum().item()
        for k in (1, 2, 3):
            self.sums[f"d{k}"] += (ratio < 1.25 ** k).sum().item()
        self.n += int(mask.sum())
        self.per_image(pred, target, mask)
        return self

    def per_image(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """Add rmse_scaled's and silog's sums over the images (first dimension) of a batch,
        batched: invalid pixels are NaN for the medians and 0 in the sums."""
        mean, mean_sq, has = log_error_moments(pred, target, mask)   # has: a valid pixel
        mask, pred, target = (x.flatten(1)[has] for x in (mask, pred, target))
        # nanquantile interpolates as numpy's median does: an even count averages the middle two
        scale = (torch.where(mask, target, math.nan).nanquantile(0.5, dim=1)
                 / torch.where(mask, pred, math.nan).nanquantile(0.5, dim=1))
        err = torch.where(mask, pred * scale[:, None] - target, 0.0)
        self.sums["sq_scaled"] += (err * err).sum().item()
        self.sums["silog"] += (100 * (mean_sq - mean ** 2).clamp_min(0).sqrt()).sum().item()
        self.sums["images"] += int(has.sum())

    def compute(self) -> dict:
        if self.n == 0:
            return {key: (0 if key in ("n", "images") else math.nan) for key in KEYS}
        s, n = self.sums, self.n
        return {"rmse": math.sqrt(s["sq"] / n), "rel": s["rel"] / n, "delta1": s["d1"] / n,
                "delta2": s["d2"] / n, "delta3": s["d3"] / n, "log10": s["log10"] / n,
                "rmse_scaled": math.sqrt(s["sq_scaled"] / n), "silog": s["silog"] / s["images"],
                "n": n, "images": int(s["images"])}


def depth_metrics(pred: torch.Tensor, target: torch.Tensor,
                  valid: torch.Tensor | None = None) -> dict:
    """Metrics of one batch: pred, target, valid of one shape, e.g. (N, 1, H, W)."""
    return DepthMetrics().update(pred, target, valid).compute()


def mean_depth_baseline(train_depths: torch.Tensor, chunk: int = 4096) -> float:
    """The constant depth a trivial model predicts: the mean over valid training pixels (m).

    Score it with depth_metrics(torch.full_like(test_depths, baseline), test_depths). Summed in
    float64 `chunk` maps (first dimension) at a time, so that memory stays bounded for large sets.
    """
    total, count = 0.0, 0
    for part in torch.as_tensor(train_depths).split(chunk):
        values = part[valid_mask(part)]
        total += values.double().sum().item()
        count += values.numel()
    if count == 0:
        raise ValueError("mean_depth_baseline: no valid (positive, finite) training depths")
    return total / count
