"""FLOPs of one forward pass written out by hand (a multiply-add counts 2): the oracles the FLOP
counter (training/flops.py) is checked against. The project itself only counts."""
from __future__ import annotations


def vit_flops(cfg) -> int:
    """A ViT (pixtok/models/vit.py ViTConfig): embedding, blocks, head."""
    d, n = cfg.width, cfg.num_tokens + (cfg.pool == "cls")
    hidden = int(d * cfg.mlp_ratio)
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    p2c = cfg.patch_size ** 2 * cfg.in_channels
    embed = 2 * cfg.num_tokens * p2c * d if cfg.embed == "linear" else 0
    if cfg.embed == "dictionary" and p2c * (cfg.dict_dim or d // cfg.in_channels) != d:
        embed = 2 * cfg.num_tokens * p2c * (cfg.dict_dim or d // cfg.in_channels) * d
    return embed + cfg.depth * per_block + 2 * d * cfg.num_classes


def dit_flops(cfg: dict) -> int:
    """A PixelDiT (pixtok/models/dit.py, its keyword arguments): patch and timestep embedding,
    blocks with their adaLN modulation, the final layer."""
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
