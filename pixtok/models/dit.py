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


if __name__ == "__main__":   # quick look (FLOPs: python -m tools.capacity)
    for size in DIT_SIZES:
        cfg = dit_config(f"DiT-{size}/1", sample_size=32, in_channels=4)
        with torch.device("meta"):   # count parameters without allocating them
            model = PixelDiT(**cfg)
        print(f"DiT-{size}/1", f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params")
