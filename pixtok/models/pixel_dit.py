"""PixelDiT: a class-conditional diffusion Transformer over latents, any patch size p (DiT/1: a
token per latent pixel).

Follows Peebles & Xie's DiT (adaLN-Zero blocks, hybrid loss with learned sigma) with the pixel
transformer's change (Nguyen et al., arXiv 2406.09415): p=1 and, by default, a *learned* position
embedding instead of the fixed sin-cos locality prior. Built on diffusers' ModelMixin/ConfigMixin so
save_pretrained / from_pretrained work offline. The null (unconditional) class is index
num_classes, so classifier-free guidance works for any class count.

Self-contained (torch, diffusers and its sibling pixel_layers.py only, imported relatively): a
generator's pipeline folder carries both files in transformer/ and names this one in
model_index.json, so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` builds
the model without pixtok. pixtok.models.dit adds the named sizes.
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .pixel_layers import Attention, patchify, sincos_pos_embed, unpatchify


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (N, L, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> vectors (N, D): sinusoidal frequencies, then a 2-layer MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                      # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, freq_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class indices (N,) -> vectors (N, D); row num_classes is the null class used for CFG."""

    def __init__(self, num_classes: int, width: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, width)

    def drop(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace random labels (or those with force_drop_ids == 1) by the null class."""
        if force_drop_ids is None:
            dropped = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        else:
            dropped = force_drop_ids.to(y.device) == 1
        return torch.where(dropped, torch.full_like(y, self.num_classes), y)

    def forward(self, y: torch.Tensor, train: bool, force_drop_ids=None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            y = self.drop(y, force_drop_ids)
        return self.table(y)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning sets shift, scale and a residual gate."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Tokens (N, L, D) -> patches (N, L, p*p*C_out), with an adaLN-modulated final norm."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PixelDiT(ModelMixin, ConfigMixin):
    """Class-conditional DiT/p: (latents, timesteps, labels) -> eps (and variance) predictions."""

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 4,
        patch_size: int = 1,
        width: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        pos_embed: str = "learned",
    ):
        super().__init__()
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"patch size {patch_size} must divide the latent size {h}x{w}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', not {pos_embed!r}")
        self.grid = (h // patch_size, w // patch_size)
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        num_tokens = self.grid[0] * self.grid[1]

        # (the config key pos_embed names the kind; the tensor is position_embedding)
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, width)
        if pos_embed == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(1, num_tokens, width))
        else:
            # persistent, so a meta-device init (accelerate's low_cpu_mem_usage) still loads it
            self.register_buffer("position_embedding", sincos_pos_embed(width, self.grid)[None])
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width, class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.position_embedding, nn.Parameter):
            nn.init.trunc_normal_(self.position_embedding, std=0.02)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model predicts zeros
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) latents, (N,) timesteps, (N,) labels -> (N, C or 2C, H, W)."""
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(n)
        p = self.config.patch_size
        tokens = self.x_embedder(patchify(x, p)) + self.position_embedding  # (N, L, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final_layer(tokens, c), p, self.grid)        # (N, C_out, H, W)

    def no_weight_decay(self) -> set[str]:
        return {"position_embedding"}
