"""DepthViT: a ViT/p encoder with a dense head that regresses metric depth from every token.

Each token predicts its p*p pixels' depths; unpatchify puts them back in place, so a ViT/1
predicts one depth per pixel token. The head predicts log-depth and the model returns
exp(log-depth): depth is positive by construction, a unit of error is relative (1 cm at 1 m
counts like 10 cm at 10 m, as in rel, delta and the SILog loss), and the head's bias starts at
log(init_depth), so an untrained model already predicts the data's typical depth.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pixtok.models.vit import ViT, ViTConfig, unpatchify


@dataclass
class DepthHeadConfig:
    """Dense head options; stored under args["head"] in config.json."""
    hidden: int = 0             # 0 -> one linear layer per token; else a GELU MLP of this width
    init_depth: float = 3.0     # metres: the constant depth the untrained model predicts

    def __post_init__(self):
        if self.hidden < 0 or self.init_depth <= 0:
            raise ValueError(f"depth head: hidden {self.hidden} must be >= 0 and init_depth "
                             f"{self.init_depth} > 0")


class DepthHead(nn.Module):
    """Tokens (N, L, D) -> log-depths (N, L, p*p)."""

    def __init__(self, width: int, pixels: int, cfg: DepthHeadConfig):
        super().__init__()
        layers = [nn.Linear(width, cfg.hidden), nn.GELU()] if cfg.hidden else []
        self.mlp = nn.Sequential(*layers, nn.Linear(cfg.hidden or width, pixels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens)


class DepthViT(nn.Module):
    """Images (N, C, H, W) in [0, 1] -> depth (N, 1, H, W) in metres, > 0."""

    def __init__(self, cfg: ViTConfig, head: DepthHeadConfig | None = None):
        super().__init__()
        if cfg.num_classes:
            raise ValueError("DepthViT's encoder takes num_classes=0 (it has a dense head)")
        self.cfg, self.head_cfg = cfg, head or DepthHeadConfig()
        self.encoder = ViT(cfg)
        self.head = DepthHead(cfg.width, cfg.patch_size ** 2, self.head_cfg)
        self.initialize_weights()

    @classmethod
    def from_args(cls, args: dict) -> DepthViT:
        """config.json's model args (ViTConfig fields plus "head") -> DepthViT."""
        args = dict(args)
        head = DepthHeadConfig(**args.pop("head", {}))
        return cls(ViTConfig(**args), head)

    def args(self) -> dict:
        """The inverse of from_args, for config.json."""
        return {**self.cfg.to_dict(), "head": asdict(self.head_cfg)}

    def initialize_weights(self):
        # the encoder initialises itself; the last layer starts at 0 so every pixel predicts
        # init_depth, and the first steps learn corrections to a sensible constant
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = self.head.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, math.log(self.head_cfg.init_depth))

    def forward_log(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) -> natural log of depth (N, 1, H, W); with keep_ids (N, K) (token
        dropout in training) only those tokens run, and the result is theirs: (N, K, p*p)."""
        tokens = self.encoder.forward_features(x, keep_ids)   # (N, [1 +] L or K, D)
        if self.encoder.cls_token is not None:
            tokens = tokens[:, 1:]                            # dense output: pixel tokens only
        log_depth = self.head(tokens)                         # (N, L or K, p*p)
        if keep_ids is not None:
            return log_depth
        return unpatchify(log_depth, self.cfg.patch_size, self.cfg.grid)

    def forward(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        # fp32: bf16 would round depths to ~0.4%
        return self.forward_log(x, keep_ids).float().exp()

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: the encoder's, and depth + 1 for the head."""
        if name.startswith("encoder."):
            return self.encoder.layer_id(name[len("encoder."):])
        return self.cfg.depth + 1


def valid_mask(target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels with a measured depth: target > 0 and finite (and `valid`, when given)."""
    mask = torch.isfinite(target) & (target > 0)
    return mask if valid is None else mask & valid.bool()


def log_error_moments(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Per image (first dimension) with a valid pixel, over its valid pixels (`mask`), the mean
    and mean square of d = ln pred - ln target -> (mean (K,), mean_sq (K,), has (N,) bool).
    pred > 0; the silog loss here and the silog metric are both made of these."""
    mask = mask.flatten(1)
    count = mask.sum(dim=1)
    has = count > 0
    # where() before log: invalid targets (0, NaN) must not reach the graph, not even times 0
    safe_target = torch.where(mask, target.flatten(1), 1.0)
    d = torch.where(mask, pred.flatten(1).log() - safe_target.log(), 0.0)[has]
    n = count[has].to(d.dtype)
    return d.sum(dim=1) / n, d.pow(2).sum(dim=1) / n, has


def depth_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
               kind: str = "l1", silog_lambda: float = 0.85) -> torch.Tensor:
    """Loss over valid pixels (target > 0 and finite, and `valid`); pred, target (N, 1, H, W).

    "l1": mean |pred - target| in metres over all valid pixels of the batch.
    "silog": Eigen et al.'s scale-invariant log loss, per image i with d = log pred - log gt
    over its n_i valid pixels: mean(d^2) - lambda * mean(d)^2, then averaged over the images
    that have valid pixels. lambda = 1 ignores a global scale entirely, 0 is plain log-MSE.
    """
    mask = valid_mask(target, valid)
    if kind == "l1":
        if not mask.any():
            return pred.sum() * 0.0
        return (pred[mask] - target[mask]).abs().mean()
    if kind != "silog":
        raise ValueError(f"depth loss {kind!r}: expected 'l1' or 'silog'")
    mean, mean_sq, has = log_error_moments(pred.clamp_min(1e-6), target, mask)
    if not has.any():
        return pred.sum() * 0.0
    return (mean_sq - silog_lambda * mean ** 2).mean()
