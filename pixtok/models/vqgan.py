"""VQGAN (Esser et al., taming-transformers) at run time: diffusers.VQModel; plus the pieces a
training loop calls: losses, codebook usage, dead-code restarts, a PatchGAN and an LPIPS loss.

Conventions, as in latent diffusion (LDM): images are in [-1, 1]; `vq.encode(x).latents` is the
latent *before* quantisation (diffusion runs there) and `vq.decode(z)` quantises first. Codes are
VQ-VAE's: codebook loss ||sg(z) - e||^2 plus beta * commitment ||z - sg(e)||^2. VQModel's own
quantiser returns taming's `legacy` loss, which puts beta on the codebook term instead; we ignore
that number and compute the two terms ourselves.
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import nn

from pixtok.errors import UserError


def vqmodel_kwargs(*, in_channels: int, out_channels: int, ch: int, ch_mult, num_res_blocks: int,
                   attn_levels, z_channels: int, embed_dim: int, n_embed: int,
                   sample_size: int, norm_num_groups: int = 32) -> dict:
    """taming-style architecture numbers -> diffusers.VQModel keyword arguments.

    attn_levels: indices of the resolution levels (0 = full resolution) with attention after
    every res block; taming names them by resolution (attn_resolutions)."""
    levels = range(len(ch_mult))
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if i in attn_levels
                             else "DownEncoderBlock2D" for i in levels],
        # the decoder runs the levels from the lowest resolution up
        "up_block_types": ["AttnUpDecoderBlock2D" if i in attn_levels
                           else "UpDecoderBlock2D" for i in reversed(levels)],
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": num_res_blocks,
        "latent_channels": z_channels,
        "vq_embed_dim": embed_dim,
        "num_vq_embeddings": n_embed,
        "sample_size": sample_size,
        "norm_num_groups": norm_num_groups,
        # LDM trains diffusion on VQ latents unscaled (scale_factor 1.0); a loop may re-estimate it
        "scaling_factor": 1.0,
    }


# name -> taming-style numbers. f4/f8 are LDM's VQ-f4 / VQ-f8 (256x256 RGB -> 64x64x3 / 32x32x4);
# the -small ones train on 2 CPU cores (f4-small: 32x32 grayscale Fashion-MNIST -> 8x8x4).
VQGAN_SIZES = {
    "f4": dict(in_channels=3, out_channels=3, ch=128, ch_mult=[1, 2, 4], num_res_blocks=2,
               attn_levels=[], z_channels=3, embed_dim=3, n_embed=8192, sample_size=256),
    "f8": dict(in_channels=3, out_channels=3, ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2,
               attn_levels=[3], z_channels=4, embed_dim=4, n_embed=16384, sample_size=256),
    "f4-small": dict(in_channels=1, out_channels=1, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                     attn_levels=[], z_channels=4, embed_dim=4, n_embed=512, sample_size=32,
                     norm_num_groups=16),
    "f8-small": dict(in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1,
                     attn_levels=[3], z_channels=4, embed_dim=4, n_embed=1024, sample_size=32,
                     norm_num_groups=16),
}


def vqgan_config(name: str, **kwargs) -> dict:
    """VQModel kwargs for a named size; kwargs override VQModel arguments, e.g. in_channels=1."""
    if name not in VQGAN_SIZES:
        raise UserError(f"unknown VQGAN {name!r}; expected one of {', '.join(VQGAN_SIZES)}")
    return {**vqmodel_kwargs(**VQGAN_SIZES[name]), **kwargs}


def build_vqgan(spec: str | dict, **kwargs) -> VQModel:
    """A fresh VQModel from a size name ('f8') or a dict of VQModel kwargs."""
    config = vqgan_config(spec, **kwargs) if isinstance(spec, str) else {**spec, **kwargs}
    return VQModel(**config)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2), per-image then averaged."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) ** 2).flatten(1).mean(1)   # (N,)
    return (10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean()


def perplexity(indices: torch.Tensor, num_codes: int) -> float:
    """exp(entropy) of the code histogram: the effective number of codes in use."""
    return counts_perplexity(torch.bincount(indices.flatten(), minlength=num_codes))


def counts_perplexity(counts: torch.Tensor) -> float:
    p = counts.double()[counts > 0]
    p = p / p.sum()
    return math.exp(-(p * p.log()).sum().item()) if len(p) else 0.0


def vqgan_losses(vq: VQModel, x: torch.Tensor, recon: str = "l1", beta: float = 0.25,
                 perceptual: nn.Module | None = None, perceptual_weight: float = 1.0) -> dict:
    """Autoencoder loss for images x (N, C, H, W) in [-1, 1] -> dict of
    loss (what to backprop: recon + perceptual + codebook + beta * commit), recon, perceptual,
    codebook, commit, psnr, perplexity, plus reconstruction (N, C, H, W), latents (pre-quantisation,
    for restart_dead_codes) and indices (N, h, w)."""
    if recon not in ("l1", "l2"):
        raise ValueError(f"recon must be 'l1' or 'l2', not {recon!r}")
    z = vq.encode(x).latents                                  # (N, D, h, w)
    z_st, _, (_, _, indices) = vq.quantize(z)                 # straight-through, flat indices
    codes = vq.quantize.embedding(indices).view(z.shape[0], z.shape[2], z.shape[3], -1)
    codes = codes.permute(0, 3, 1, 2)                         # (N, D, h, w), grads to the codebook
    codebook = F.mse_loss(codes, z.detach())
    commit = F.mse_loss(z, codes.detach())
    x_rec = vq.decode(z_st, force_not_quantize=True).sample   # (N, C, H, W)
    rec = (x_rec - x).abs().mean() if recon == "l1" else F.mse_loss(x_rec, x)
    perc = perceptual(x_rec, x).mean() if perceptual is not None else x.new_zeros(())
    loss = rec + perceptual_weight * perc + codebook + beta * commit
    indices = indices.view(z.shape[0], z.shape[2], z.shape[3])
    return {"loss": loss, "recon": rec, "perceptual": perc, "codebook": codebook,
            "commit": commit, "psnr": psnr(x_rec.detach(), x),
            "perplexity": perplexity(indices, vq.config.num_vq_embeddings),
            "reconstruction": x_rec, "latents": z, "indices": indices}


class CodebookUsage:
    """Code counts over the last `window` batches: perplexity and the dead (unused) codes."""

    def __init__(self, num_codes: int, window: int = 100):
        self.num_codes = num_codes
        self.window = window
        self.counts = deque(maxlen=window)

    def update(self, indices: torch.Tensor):
        self.counts.append(torch.bincount(indices.flatten().cpu(), minlength=self.num_codes))

    @property
    def ready(self) -> bool:
        """True once a full window has been seen (before that, 'dead' may just mean 'not yet')."""
        return len(self.counts) == self.window

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.counts)).sum(0) if self.counts else torch.zeros(
            self.num_codes, dtype=torch.long)

    def used(self) -> int:
        return int((self.total() > 0).sum())

    def dead_codes(self) -> torch.Tensor:
        return (self.total() == 0).nonzero().flatten()

    def perplexity(self) -> float:
        return counts_perplexity(self.total())

    def reset(self):
        self.counts.clear()


@torch.no_grad()
def restart_dead_codes(vq: VQModel, latents: torch.Tensor, dead: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> int:
    """Re-seed dead codes with randomly chosen encoder outputs -> how many were re-seeded.

    latents: pre-quantisation latents (N, D, h, w) of a recent batch. dead: code indices (e.g.
    CodebookUsage.dead_codes()); by default the codes no latent in this batch picked. Without
    restarts a VQGAN tends to collapse onto a few codes. The optimizer's moments for the re-seeded
    rows are stale; with Adam that is harmless after a few steps."""
    codebook = vq.quantize.embedding.weight                   # (K, D)
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]).to(codebook)
    if dead is None:
        nearest = torch.cdist(flat, codebook).argmin(1)
        dead = (torch.bincount(nearest, minlength=codebook.shape[0]) == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pick = torch.randint(0, flat.shape[0], (len(dead),), generator=generator)
    # a little noise keeps two codes seeded from the same latent apart
    noise = torch.randn(len(dead), flat.shape[1], generator=generator) * 1e-3 * flat.std()
    codebook[dead.to(codebook.device)] = flat[pick.to(flat.device)] + noise.to(flat)
    return len(dead)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al., as in taming): images (N, C, H, W) -> real/fake logits per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1      # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)                                     # (N, 1, h', w')


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above 1 and fake ones below -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss, g_loss, last_layer: torch.Tensor, max_weight=1e4):
    """taming's balance: ||grad rec|| / ||grad gan|| at the decoder's last layer (detached)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, max_weight).detach()


# VGG16 convolutions as torchvision numbers them in `features`, and where LPIPS taps the ReLUs
_VGG16 = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
          (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
          (26, 512, 512), (28, 512, 512)]
_TAPS = (3, 8, 15, 22, 29)             # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def load_weight_files(paths) -> dict[str, torch.Tensor]:
    """Tensors from one or more .safetensors / .pt / .pth files (torch.load with weights_only)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    state = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"{path}: weights file not found (no downloads: give a local file)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state.update(load_file(path))
        else:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"{path}: not a weights-only torch file ({e})") from None
            state.update(loaded.get("state_dict", loaded))
    return state


class PerceptualLoss(nn.Module):
    """LPIPS-VGG distance (Zhang et al. 2018) between images in [-1, 1] -> (N,).

    Loads weights only from the user's files, never downloads: torchvision's VGG16 state dict
    (keys features.<i>.weight/bias; classifier.* is ignored) and LPIPS's linear layers for VGG
    (keys lin<k>.model.1.weight, k = 0..4), in one file or several (.safetensors or .pth)."""

    def __init__(self, paths):
        super().__init__()
        layers, previous = [], -1
        for index, c_in, c_out in _VGG16:
            if index - previous == 3:                           # a max-pool sits in between
                layers.append(nn.MaxPool2d(2, 2))
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            previous = index
        self.features = nn.Sequential(*layers)                  # indices match torchvision's
        self.lins = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in _TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.load_weights(paths)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, paths):
        state = load_weight_files(paths)
        wanted = {f"features.{i}.{p}": f"features.{i}.{p}" for i, _, _ in _VGG16
                  for p in ("weight", "bias")}
        wanted.update({f"lins.{k}": f"lin{k}.model.1.weight" for k in range(5)})
        missing = [src for src in wanted.values() if src not in state]
        if missing:
            raise UserError(f"{paths}: missing LPIPS/VGG16 weights {missing[:4]}"
                            f"{' ...' if len(missing) > 4 else ''}")
        self.load_state_dict({dst: state[src] for dst, src in wanted.items()}, strict=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:                                     # grayscale: as three equal channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _TAPS[tap]:
                hx, hy = h.chunk(2)
                hx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
                hy = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
                total = total + ((hx - hy) ** 2 * self.lins[tap]).sum(1).mean((1, 2))
                tap += 1
                if tap == len(_TAPS):
                    break
        return total
