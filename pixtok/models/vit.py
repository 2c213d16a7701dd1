"""ViT/p: a Vision Transformer for any patch size p. With p=1 every pixel is a token (ViT/1).

Follows Nguyen et al., "An Image is Worth More Than 16x16 Patches" (arXiv 2406.09415): the
locality-free variant uses 1x1 patches and a learned position embedding with no 2D prior.
The model takes images in [0, 1] and normalises them itself, so that exported models and the
dictionary embedding (which indexes raw 0..255 intensities) see the same input.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pixtok.models.pixel_layers import (  # noqa: F401  (unpatchify, attention: re-exported)
    Attention,
    attention,
    patchify,
    sincos_pos_embed,
    unpatchify,
)
from pixtok.models.sizes import lookup, registry

# the registry of named ViTs, as in DiT's models.py: 'ViT-T/1' -> (depth, width, heads, patch);
# the paper's sizes and the CPU ones, at every patch size that divides its image sizes
VIT_MODELS = registry("ViT", ("F", "P", "N", "T", "S", "B", "L"), (1, 2, 4, 7, 8, 14, 16, 32))


@dataclass
class ViTConfig:
    """Architecture arguments; stored verbatim in a checkpoint's config.json."""
    image_size: tuple[int, int] = (32, 32)     # (H, W); p must divide both
    in_channels: int = 3
    patch_size: int = 1
    width: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    embed: str = "linear"        # "linear" | "dictionary" (paper's Appendix F)
    dict_dim: int = 0            # dictionary width per channel; 0 -> width // in_channels
    pos_embed: str = "learned"   # "learned" | "sincos" | "none"
    pool: str = "cls"            # "cls" | "mean"
    drop_path: float = 0.0
    num_classes: int = 0         # 0 -> no classification head
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))

    def __post_init__(self):
        self.image_size = tuple(int(s) for s in self.image_size)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        h, w = self.image_size
        p = self.patch_size
        if p < 1 or h % p or w % p:
            raise ValueError(f"patch size {p} must divide the image size {h}x{w}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        for key, allowed in (("embed", ("linear", "dictionary")),
                             ("pos_embed", ("learned", "sincos", "none")),
                             ("pool", ("cls", "mean"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, not {getattr(self, key)!r}")
        if len(self.mean) not in (1, self.in_channels) or len(self.std) != len(self.mean):
            raise ValueError("mean/std need one value or one per input channel")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("image_size", "mean", "std"):
            d[key] = list(d[key])
        return d


def parse_name(name: str) -> tuple[int, int, int, int]:
    """'ViT-T/1' -> (depth, width, heads, patch_size)."""
    return lookup(VIT_MODELS, name, "ViT-T/1")


def vit_config(name: str, **kwargs) -> ViTConfig:
    """Config for a named size, e.g. vit_config('ViT-S/2', image_size=(32, 32), num_classes=100)."""
    depth, width, heads, p = parse_name(name)
    return ViTConfig(**{"depth": depth, "width": width, "heads": heads, "patch_size": p, **kwargs})


def resample_pos_embed(table: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int],
                       prefix: int = 0) -> torch.Tensor:
    """A position-embedding table (1, prefix + gh*gw, D) for another grid: (1, prefix + GH*GW, D).

    The gh x gw rows are laid out on their grid and interpolated bicubically (antialiased when
    the grid shrinks), as timm and DeiT resample a ViT for another resolution; the first `prefix`
    rows ([cls] and other extra tokens) are kept as they are. Works for a learned table and a
    sin-cos one alike; a table resampled to its own grid comes back unchanged.
    """
    (gh, gw), (nh, nw) = tuple(grid), tuple(new_grid)
    lead, rows = table[:, :prefix], table[:, prefix:]
    if rows.shape[1] != gh * gw:
        raise ValueError(f"position table has {rows.shape[1]} rows, not {gh}x{gw}")
    d = rows.shape[-1]
    x = rows.reshape(1, gh, gw, d).permute(0, 3, 1, 2).float()          # (1, D, gh, gw)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                      antialias=nh < gh or nw < gw)
    x = x.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(table.dtype)
    return torch.cat([lead, x], dim=1)


def adapt_embed_channels(weight: torch.Tensor, patch_size: int, channels: int,
                         new_channels: int) -> torch.Tensor:
    """A linear pixel embedding's weight (D, p*p*C) for another channel count (1 <-> 3).

    3 -> 1 sums the colour channels' columns, so a grey image gives the tokens the RGB model gave
    for the same image with r = g = b; 1 -> 3 repeats the grey column over r, g and b divided by
    3, so an image with r = g = b gives the tokens the grey model gave (up to normalisation).
    """
    d, k = weight.shape
    p2 = patch_size * patch_size
    if k != p2 * channels:
        raise ValueError(f"pixel embedding has {k} inputs, not {p2}x{channels}")
    w = weight.reshape(d, p2, channels)                  # patch layout (p, p, C)
    if new_channels == 1:
        w = w.sum(dim=2, keepdim=True)
    elif channels == 1:
        w = w.expand(d, p2, new_channels) / new_channels
    else:
        raise ValueError(f"cannot adapt {channels} channels to {new_channels}: only 1 <-> 3")
    return w.reshape(d, p2 * new_channels).contiguous()


class PixelEmbed(nn.Module):
    """Patches (N, L, p*p*C) in [0, 1] -> tokens (N, L, D): linear, or per-channel dictionaries."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.kind = cfg.embed
        c, p = cfg.in_channels, cfg.patch_size
        if self.kind == "linear":
            self.proj = nn.Linear(p * p * c, cfg.width)
            mean = torch.tensor(cfg.mean).expand(c)
            std = torch.tensor(cfg.std).expand(c)
            # patch layout is (p, p, C): repeat the per-channel statistics over the p*p pixels
            self.register_buffer("mean", mean.repeat(p * p).clone(), persistent=False)
            self.register_buffer("std", std.repeat(p * p).clone(), persistent=False)
        else:
            dim = cfg.dict_dim or cfg.width // c
            self.tables = nn.Parameter(torch.empty(c, 256, dim))   # one 256-entry table per channel
            self.register_buffer("channel", torch.arange(c).repeat(p * p), persistent=False)
            d_in = p * p * c * dim
            self.proj = nn.Identity() if d_in == cfg.width else nn.Linear(d_in, cfg.width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.proj((patches - self.mean) / self.std)
        # Intensity i/255 looks up entry i. Non-integer values (MixUp, resizing) interpolate between
        # the two neighbouring entries, which is exact on integers and keeps mixing meaningful.
        v = patches.clamp(0, 1) * 255                           # (N, L, K), K = p*p*C
        lo = v.floor().long().clamp(max=254)
        frac = (v - lo).unsqueeze(-1)
        table = self.tables[self.channel]                       # (K, 256, dim)
        k = torch.arange(table.shape[0], device=v.device)
        emb = table[k, lo] * (1 - frac) + table[k, lo + 1] * frac   # (N, L, K, dim)
        return self.proj(emb.flatten(2).to(patches.dtype))


def shuffle_tokens(n: int, length: int, drop: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """A random order of each sample's L token indices (N, L) on `device`, and how many to keep:
    the first round(L * (1 - drop)). Each sample ranks its tokens by its own uniform noise, drawn
    by `generator` on its own device (a seeded CPU generator repeats on any accelerator), or
    without one by torch's RNG on `device`; the ranking runs on `device`."""
    keep = int(round(length * (1 - drop)))
    if not 1 <= keep <= length:
        raise ValueError(f"dropping {drop} of {length} tokens keeps {keep}")
    noise = torch.rand(n, length, generator=generator,
                       device=generator.device if generator is not None else device)
    return noise.to(device).argsort(dim=1), keep


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, K) -> the tokens x[i, ids[i]] (N, K, D)."""
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), with drop path."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class ViT(nn.Module):
    """ViT/p encoder with an optional classification head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.embed = PixelEmbed(cfg)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        elif cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(d, cfg.grid)[None], persistent=False)
        else:
            self.pos_embed = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.pool == "cls" else None
        # drop path grows linearly with depth (no torch op here, so the model builds on "meta")
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.cfg.embed == "dictionary":
            nn.init.trunc_normal_(self.embed.tables, std=0.02)

    def set_attention(self, impl: str):
        """'sdpa' (default) or 'naive' (explicit L x L scores; benchmarks only)."""
        for block in self.blocks:
            block.attn.impl = impl

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] -> position-embedded patch tokens (N, L, D)."""
        t = self.embed(patchify(x, self.cfg.patch_size))
        return t if self.pos_embed is None else t + self.pos_embed

    def forward_features(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None):
        """(N, C, H, W) -> normalised tokens (N, L, D), preceded by [cls] when pooling on it.

        keep_ids (N, K), token indices, runs the blocks on those tokens only (token dropout in
        training, PatchDropout: Liu et al. 2022, arXiv 2208.07220): positions are added first,
        so each kept pixel still knows where it is; attention then costs (K/L)^2 as much.
        """
        t = self.tokens(x)
        if keep_ids is not None:
            t = gather_tokens(t, keep_ids)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def pool(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] if self.cls_token is not None else t.mean(dim=1)

    def forward(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, classes), or (N, D) without a head; keep_ids as in forward_features."""
        return self.head(self.pool(self.forward_features(x, keep_ids)))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 embeddings, 1..depth blocks, depth+1 the rest."""
        if name.startswith(("embed.", "pos_embed", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":   # quick look (FLOPs: python -m tools.capacity)
    for size in ("F", "P", "N", "T", "S", "B", "L"):
        cfg = vit_config(f"ViT-{size}/1", image_size=(32, 32), num_classes=100)
        print(f"ViT-{size}/1", f"{count_params(ViT(cfg)) / 1e6:.2f}M params",
              f"L={cfg.num_tokens}", f"{math.prod(cfg.image_size)} pixels")
