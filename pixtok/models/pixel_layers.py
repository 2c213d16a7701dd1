"""Building blocks the pixel transformers share: patches <-> tokens, the fixed 2D sin-cos
position embedding and multi-head self-attention.

Self-contained (it imports torch only): a generator's pipeline folder carries this file beside
pixel_dit.py in transformer/, so stock diffusers loads the DiT without pixtok installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order, pixels inside as (p, p, C)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); the inverse of patchify."""
    n, _, d = x.shape
    gh, gw = grid
    c = d // (p * p)
    x = x.reshape(n, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, c, gh * p, gw * p)


def sincos_pos_embed(width: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (the locality prior ViT/1 drops): (gh*gw, width)."""
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, not {width}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                            torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    out = [f(pos.reshape(-1, 1) * omega) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()


def attention(q, k, v, impl: str = "sdpa"):
    """(N, H, L, Dh) x3 -> (N, H, L, Dh). 'naive' is the textbook softmax(QK^T)V, for benchmarks."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5     # (N, H, L, L)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                     # (N, H, L, Dh) each
        x = attention(q, k, v, self.impl)
        return self.proj(x.transpose(1, 2).reshape(n, length, d))
