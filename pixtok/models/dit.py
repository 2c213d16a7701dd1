"""DiT/p, the class-conditional diffusion Transformer over latents: its named sizes and FLOP
count. The model itself, PixelDiT, is in pixel_dit.py, which imports nothing of pixtok so that a
generator's pipeline folder can carry it (pixtok/pipeline.py)."""
from __future__ import annotations

import torch

from pixtok.models.pixel_dit import PixelDiT
from pixtok.models.sizes import lookup, registry

# the registry of named models, as in DiT's models.py: 'DiT-XL/2' -> (depth, width, heads, patch)
DIT_SIZES = ("F", "P", "N", "S", "B", "L", "XL")
DIT_MODELS = registry("DiT", DIT_SIZES, (1, 2, 4, 8))


def dit_config(name: str, **kwargs) -> dict:
    """PixelDiT arguments for a named size, e.g. dit_config('DiT-L/1', sample_size=32)."""
    depth, width, heads, p = lookup(DIT_MODELS, name, "DiT-XL/2")
    return {"depth": depth, "width": width, "heads": heads, "patch_size": p, **kwargs}


def flops_per_image(config) -> int:
    """Model FLOPs of one forward pass (a multiply-add counts 2); config: PixelDiT or its config."""
    cfg = dict(config.config if isinstance(config, PixelDiT) else config)
    size = cfg.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    p, d, c = cfg["patch_size"], cfg["width"], cfg.get("in_channels", 4)
    n = (h // p) * (w // p)
    hidden = int(d * cfg.get("mlp_ratio", 4.0))
    c_out = 2 * c if cfg.get("learn_sigma", True) else c
    per_block = (2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
                 + 2 * d * 6 * d)
    embed = 2 * n * p * p * c * d + 2 * 256 * d + 2 * d * d
    final = 2 * d * 2 * d + 2 * n * d * p * p * c_out
    return embed + cfg["depth"] * per_block + final


if __name__ == "__main__":   # quick look: python -m pixtok.models.dit
    for size in DIT_SIZES:
        cfg = dit_config(f"DiT-{size}/1", sample_size=32, in_channels=4)
        with torch.device("meta"):   # count parameters without allocating them
            model = PixelDiT(**cfg)
        print(f"DiT-{size}/1", f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params",
              f"{flops_per_image(cfg) / 1e9:.2f} GFLOPs on 32x32x4 latents")
