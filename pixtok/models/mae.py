"""Masked autoencoder (He et al. 2021) on a ViT/p encoder; with p=1 it masks single pixels.

The encoder is a plain ViT (embed, position embedding, blocks, norm) that sees only the visible
tokens, plus [cls] when the ViT has one; a light Transformer decoder fills in mask tokens and
predicts every token's pixels. The loss is the MSE on masked tokens only.

norm_pix_loss normalises each target patch by its own mean and variance over its p*p*C values.
For p=1 a patch is one pixel, so the target becomes the pixel's colour with its brightness
removed (zero mean, unit variance over its C channels): the model is asked for chroma only, and
near-grey pixels, whose channel variance is tiny, have their quantisation noise blown up. With
C=1 (p=1) every normalised target is 0, so that combination is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pixtok.errors import UserError
from pixtok.models.vit import (
    Block,
    ViT,
    ViTConfig,
    gather_tokens,
    patchify,
    shuffle_tokens,
    sincos_pos_embed,
    unpatchify,
)


class MAEConfigError(UserError, ValueError):
    """An MAE configuration that cannot work (a recipe mistake)."""


@dataclass
class MAEConfig:
    """Encoder (a ViTConfig, or its dict from config.json) and decoder arguments."""
    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    decoder_pos_embed: str = "learned"   # "learned" | "sincos"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = ViTConfig(**self.encoder)
        enc = self.encoder
        if enc.num_classes:
            raise MAEConfigError(f"MAE encoder has num_classes={enc.num_classes}; pre-training "
                                 f"takes num_classes=0 (the head is added for fine-tuning)")
        if self.decoder_pos_embed not in ("learned", "sincos"):
            raise MAEConfigError(f"decoder_pos_embed {self.decoder_pos_embed!r}: expected "
                                 f"'learned' or 'sincos'")
        if self.decoder_width % self.decoder_heads:
            raise MAEConfigError(f"decoder width {self.decoder_width} is not divisible by "
                                 f"{self.decoder_heads} heads")
        if not 0 <= self.mask_ratio < 1:
            raise MAEConfigError(f"mask_ratio {self.mask_ratio}: expected 0 <= ratio < 1")
        if self.norm_pix_loss and enc.patch_size ** 2 * enc.in_channels == 1:
            raise MAEConfigError("norm_pix_loss with 1x1 patches of 1 channel normalises every "
                                 "target to 0; use norm_pix_loss=false for grey ViT/1")

    @property
    def depth(self) -> int:
        return self.encoder.depth

    def to_dict(self) -> dict:
        return {"encoder": self.encoder.to_dict(), "decoder_width": self.decoder_width,
                "decoder_depth": self.decoder_depth, "decoder_heads": self.decoder_heads,
                "decoder_mlp_ratio": self.decoder_mlp_ratio,
                "decoder_pos_embed": self.decoder_pos_embed, "mask_ratio": self.mask_ratio,
                "norm_pix_loss": self.norm_pix_loss}


def masking_ids(n: int, length: int, mask_ratio: float,
                generator: torch.Generator | None = None, device=None):
    """Keep round(L * (1 - ratio)) random tokens per sample -> (keep_ids (N, K), mask (N, L)
    with 1 = masked, ids_restore (N, L))."""
    ids_shuffle, keep = shuffle_tokens(n, length, mask_ratio, generator, device)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], mask.gather(1, ids_restore), ids_restore


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
    """x (N, L, D) -> (visible tokens (N, K, D), mask (N, L) 1 = masked, ids_restore)."""
    keep_ids, mask, ids_restore = masking_ids(len(x), x.shape[1], mask_ratio, generator, x.device)
    return gather_tokens(x, keep_ids), mask, ids_restore


class MAE(nn.Module):
    """Masked autoencoder: forward(imgs, mask_ratio) -> (loss, pred (N, L, p*p*C), mask (N, L))."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        enc, dw = cfg.encoder, cfg.decoder_width
        self.encoder = ViT(enc)
        self.has_cls = self.encoder.cls_token is not None
        self.decoder_embed = nn.Linear(enc.width, dw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dw))
        tokens = enc.num_tokens + self.has_cls
        if cfg.decoder_pos_embed == "learned":
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, tokens, dw))
        else:   # [cls] gets a zero position, as in the MAE reference
            table = sincos_pos_embed(dw, enc.grid)
            if self.has_cls:
                table = torch.cat([torch.zeros(1, dw), table])
            self.register_buffer("decoder_pos_embed", table[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dw, cfg.decoder_heads, cfg.decoder_mlp_ratio, 0.0)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dw, eps=1e-6)
        self.decoder_pred = nn.Linear(dw, enc.patch_size ** 2 * enc.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # the encoder initialised itself in ViT(); the decoder follows the same scheme
        for name, m in self.named_modules():
            if name.startswith("decoder") and isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if isinstance(self.decoder_pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.cfg.encoder.patch_size)      # (N, L, p*p*C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.cfg.encoder.patch_size, self.cfg.encoder.grid)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float,
                        generator: torch.Generator | None = None):
        """(N, C, H, W) -> (latent (N, [1 +] K, D), mask (N, L), ids_restore (N, L)): the ViT's
        own forward_features on the visible tokens (the same path as its token dropout)."""
        keep_ids, mask, ids_restore = masking_ids(len(imgs), self.cfg.encoder.num_tokens,
                                                  mask_ratio, generator, imgs.device)
        return self.encoder.forward_features(imgs, keep_ids), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Visible latents -> predicted pixels of every token (N, L, p*p*C)."""
        x = self.decoder_embed(latent)                          # (N, [1 +] K, Dd)
        cls, x = (x[:, :1], x[:, 1:]) if self.has_cls else (x[:, :0], x)
        n, length = ids_restore.shape
        fill = self.mask_token.expand(n, length - x.shape[1], -1)
        x = torch.cat([x, fill], dim=1)                         # (N, L, Dd) in shuffled order
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))   # back in place
        x = torch.cat([cls, x], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:] if self.has_cls else x

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder must predict: pixels in [0, 1], or per-patch normalised pixels."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked tokens only; visible tokens add nothing."""
        per_token = (pred - self.target(imgs)).pow(2).mean(dim=-1)   # (N, L)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None):
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
        return names | {"mask_token", "decoder_pos_embed"}


def encoder_state_dict(mae: MAE) -> dict[str, torch.Tensor]:
    """The encoder's weights under ViT names: load with vit.load_state_dict(sd, strict=False);
    only the classifier's head is then missing."""
    return {k: v.detach().clone() for k, v in mae.encoder.state_dict().items()}


@torch.no_grad()
def mae_grid(model: MAE, images: torch.Tensor, path, seed: int = 0, scale: int = 4) -> Path:
    """Write a PNG grid: rows input / masked (grey) / reconstruction with visible pixels pasted
    back; one column per image (N, C, H, W) in [0, 1]. With norm_pix_loss the prediction is
    un-normalised with each patch's true mean and variance, as the MAE demo does."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    _, pred, mask = model(images, generator=generator)
    model.train(was_training)
    if model.cfg.norm_pix_loss:
        patches = model.patchify(images)
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    pixels = model.cfg.encoder.patch_size ** 2 * model.cfg.encoder.in_channels
    masked_img = model.unpatchify(mask[..., None].expand(-1, -1, pixels))   # (N, C, H, W), 1 = hid
    masked = images * (1 - masked_img) + 0.5 * masked_img
    recon = images * (1 - masked_img) + model.unpatchify(pred).clamp(0, 1) * masked_img
    rows = [torch.cat(list(row), dim=2) for row in (images, masked, recon)]   # (C, H, N*W) each
    grid = torch.cat(rows, dim=1)                                         # (C, 3H, N*W)
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    array = (grid.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
