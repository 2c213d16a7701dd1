"""VQGAN training on diffusers.VQModel: L1/L2 reconstruction, codebook and commitment losses,
dead-code restarts, an optional PatchGAN hinge discriminator (from step gan_start) and an
optional LPIPS perceptual loss (only from weights the user has on disk).

The discriminator and its Adam optimizer belong to this task, not to the generic loop: it steps
them inside loss(), before the autoencoder's adversarial term is computed, and hands their state
(with the code-usage window) to the loop's train_state.pt through state_dict(), so a resumed run
is exact. Under DDP the code counts are summed over processes every step and restarts are made on
rank 0 and broadcast, so every process holds the same codebook.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.distributed
from diffusers import VQModel
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from pixtok.errors import UserError
from pixtok.models.vqgan import (
    CodebookUsage,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    counts_perplexity,
    hinge_d_loss,
    hinge_g_loss,
    restart_dead_codes,
    vqgan_config,
    vqgan_losses,
)
from training.data.augment import CropFlip
from training.distributed import Dist
from training.latents import prepare_images
from training.loader import crop_flip_batches, fetch_batches
from training.recipe import Recipe
from training.tasks.base import COMMON_KEYS, Task
from training.tasks.common import data_spec, load_split, load_splits


class LossVQModel(VQModel):
    """A diffusers VQModel whose forward returns the training losses (vqgan_losses), so that
    DDP sees the whole autoencoder step as one forward pass. Same weights and keys as VQModel."""

    def forward(self, x, recon: str = "l1", beta: float = 0.25, perceptual=None,
                perceptual_weight: float = 1.0) -> dict:
        return vqgan_losses(self, x, recon, beta, perceptual, perceptual_weight)


def padding(pad_to: int, image_size) -> int:
    """Pixels of zero padding per side that bring image_size (H, W) to pad_to (0: none)."""
    h, w = image_size
    if pad_to == 0 or (h, w) == (pad_to, pad_to):
        return 0
    if h != w or pad_to < h or (pad_to - h) % 2:
        raise UserError(f"pad_to={pad_to}: cannot pad {h}x{w} images evenly to "
                        f"{pad_to}x{pad_to}")
    return (pad_to - h) // 2


def vqmodel_args(recipe: Recipe, channels: int, size: int) -> dict:
    """VQModel arguments of a recipe: a named size with width and codebook overrides."""
    base = vqgan_config(recipe.model)
    kw = {"in_channels": channels, "out_channels": channels, "sample_size": size}
    if recipe.codebook_size:
        kw["num_vq_embeddings"] = recipe.codebook_size
    if recipe.vq_width:
        mult = [c // base["block_out_channels"][0] for c in base["block_out_channels"]]
        kw["block_out_channels"] = [recipe.vq_width * m for m in mult]
        kw["norm_num_groups"] = math.gcd(base["norm_num_groups"], recipe.vq_width)
    args = vqgan_config(recipe.model, **kw)
    factor = 2 ** (len(args["block_out_channels"]) - 1)
    if size % factor:
        raise UserError(f"VQGAN {recipe.model} downsamples by {factor}: the image size {size} "
                        f"is not a multiple of it (set pad_to=)")
    return args


def weights_hash(path: Path) -> str:
    """sha256 of a weights file: what a latent cache was encoded with."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_vqgan(path, device: str | torch.device = "cpu") -> tuple[VQModel, dict]:
    """A VQGAN -> (VQModel in eval mode, info {"pad", "labels", "data", "weights_hash"}).

    path: a checkpoint folder of `pixtok train vqgan-...` (config.json + model.safetensors), a
    diffusers VQModel folder (e.g. LDM's VQ-f8 converted by export/taming.py and saved with
    save_pretrained; no padding), or a generator pipeline folder (its vae/, with the padding,
    labels and data its config.json names)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such VQGAN folder; train one first (pixtok train "
                        "vqgan-fashion --out runs/vqgan-fashion) or set vqgan=PATH")
    pipeline_config = {}
    if (path / "model_index.json").is_file():
        # a generator's folder: its config.json (written by `pixtok train dit...`) says how the
        # VQGAN was trained (the padding around each image); its vae/ is the VQModel
        try:
            pipeline_config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            pipeline_config = {}
        path = path / "vae"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path}: not a VQGAN folder (no readable config.json)") from None
    if config.get("task") == "vqgan":
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{path}: no model.safetensors")
        vq = VQModel(**config["model"]["args"])
        vq.load_state_dict(load_file(weights))
        info = {"pad": config["input"].get("pad", 0), "labels": config.get("labels"),
                "data": config.get("data")}
    elif config.get("_class_name") == "VQModel":
        weights = path / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise UserError(f"{path}: no diffusion_pytorch_model.safetensors")
        vq = VQModel.from_pretrained(path)
        info = {"pad": pipeline_config.get("input", {}).get("pad", 0),
                "labels": pipeline_config.get("labels"), "data": pipeline_config.get("data")}
    else:
        raise UserError(f"{path}: neither a pixtok VQGAN checkpoint nor a diffusers VQModel")
    info["weights_hash"] = weights_hash(weights)
    return vq.to(device).eval().requires_grad_(False), info


class VQGANTask(Task):
    """What the training loop needs to train and evaluate a VQGAN."""

    name = "vqgan"
    RECIPE_KEYS = COMMON_KEYS | {"pad_to", "vq_width", "codebook_size", "recon_loss",
                                 "commit_beta", "restart_every", "gan_weight", "gan_start",
                                 "disc_lr", "perceptual_weights", "perceptual_weight"}

    def __init__(self, recipe: Recipe, dist: Dist):
        super().__init__(recipe, dist)
        self.data = data_spec(recipe)
        self.train_set, self.test_set = load_splits(self.data, recipe, dist)
        ds = self.train_set
        self.pad = padding(recipe.pad_to, ds.image_size)
        self.size = ds.image_size[0] + 2 * self.pad
        if ds.image_size[0] != ds.image_size[1]:
            raise UserError(f"VQGAN training needs square images, got {ds.image_size}; "
                            "set image_size=")
        self.args = vqmodel_args(recipe, ds.in_channels, self.size)
        self.model = LossVQModel(**self.args)
        self.num_codes = self.args["num_vq_embeddings"]
        self.crop_flip = CropFlip(recipe.crop_padding, recipe.hflip)
        self.usage = CodebookUsage(self.num_codes, window=recipe.restart_every or 100)
        self.step = 0
        self.restarts = 0
        self.perceptual = None
        if recipe.perceptual_weights:
            paths = [Path(p.strip()).expanduser() for p in recipe.perceptual_weights.split(",")]
            self.perceptual = PerceptualLoss(paths).to(dist.device)
        self.disc = self.disc_ddp = self.disc_opt = None
        if recipe.gan_weight > 0:
            self.disc = PatchDiscriminator(ds.in_channels, 64,
                                           n_layers=3 if self.size >= 128 else 2).to(dist.device)
            self.disc_ddp = DistributedDataParallel(self.disc) if dist.world > 1 else self.disc
            self.disc_opt = torch.optim.Adam(self.disc.parameters(),
                                             lr=recipe.disc_lr or recipe.lr, betas=(0.5, 0.9))

    def config(self) -> dict:
        """Task-specific part of config.json."""
        ds = self.train_set
        return {"task": self.name,
                "model": {"arch": "vqgan", "name": self.recipe.model, "args": self.args},
                "labels": list(ds.classes),
                "input": {"image_size": [self.size, self.size], "channels": ds.in_channels,
                          "pad": self.pad, "resize": self.recipe.resize},
                "data": self.data}

    def batches(self, index_lists, aug_seeds):
        """Yield images (n, C, S, S) in [-1, 1], padded, cropped and flipped per aug_seeds."""
        for x, _, _ in crop_flip_batches(self.train_set, index_lists, aug_seeds, self.crop_flip,
                                         self.dist, self.recipe.num_workers):
            yield prepare_images(x, self.pad)

    def loss(self, model, batch, step_seed: int) -> torch.Tensor:
        x = batch.to(self.dist.device, non_blocking=True)
        vq = getattr(model, "module", model)
        step, self.step = self.step, self.step + 1
        every = self.recipe.restart_every
        if every and step > 0 and step % every == 0 and self.usage.ready:
            self.restart_dead_codes(vq, x, step_seed)
        out = model(x, recon=self.recipe.recon_loss, beta=self.recipe.commit_beta,
                    perceptual=self.perceptual, perceptual_weight=self.recipe.perceptual_weight)
        counts = torch.bincount(out["indices"].flatten(), minlength=self.num_codes)
        if self.dist.world > 1:
            torch.distributed.all_reduce(counts)
        self.usage.counts.append(counts.cpu())
        loss = out["loss"]
        if self.disc is not None and step >= self.recipe.gan_start:
            self.train_discriminator(x, out["reconstruction"].detach())
            loss = loss + self.adversarial_loss(vq, out)
        return loss

    def restart_dead_codes(self, vq, x, step_seed: int) -> None:
        """Re-seed the codes no process used over the last window with this batch's latents."""
        dead = self.usage.dead_codes()
        if len(dead) and self.dist.main:
            with torch.no_grad():
                z = vq.encode(x).latents.float()                  # (N, D, h, w)
            restart_dead_codes(vq, z, dead, torch.Generator().manual_seed(step_seed))
        if self.dist.world > 1:
            torch.distributed.broadcast(vq.quantize.embedding.weight.data, 0)
        self.restarts += len(dead)
        self.usage.reset()

    def train_discriminator(self, x, x_rec) -> None:
        """One hinge-loss step of the PatchGAN on real images and (detached) reconstructions."""
        logits = self.disc_ddp(torch.cat([x, x_rec]))
        real, fake = logits.chunk(2)
        d_loss = hinge_d_loss(real, fake)
        self.disc_opt.zero_grad(set_to_none=True)
        with torch.autocast(self.dist.device.type, enabled=False):
            d_loss.backward()
        self.disc_opt.step()

    def adversarial_loss(self, vq, out: dict) -> torch.Tensor:
        """gan_weight x taming's adaptive weight x the generator hinge loss on reconstructions."""
        self.disc.requires_grad_(False)
        g_loss = hinge_g_loss(self.disc(out["reconstruction"]))
        self.disc.requires_grad_(True)
        nll = out["recon"] + self.recipe.perceptual_weight * out["perceptual"]
        weight = adaptive_gan_weight(nll, g_loss, vq.decoder.conv_out.weight)
        return self.recipe.gan_weight * weight * g_loss

    def state_dict(self) -> dict:
        """What train_state.pt needs besides the loop's own state."""
        state = {"step": self.step, "restarts": self.restarts, "usage": list(self.usage.counts)}
        if self.disc is not None:
            state |= {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.restarts = state["step"], state["restarts"]
        self.usage.reset()
        self.usage.counts.extend(state["usage"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 256) -> dict:
        metrics = evaluate_vqgan(model, self.test_set, self.pad, self.dist, batch_size,
                                 self.recipe.recon_loss, self.recipe.commit_beta)
        return {**metrics, "restarts": self.restarts}

    @staticmethod
    def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
        return evaluate_checkpoint(ckpt, config, args)


@torch.no_grad()
def evaluate_vqgan(vq, dataset, pad: int, dist: Dist, batch_size: int = 256, recon: str = "l1",
                   beta: float = 0.25) -> dict:
    """Test loss, PSNR (dB, per image then averaged), L1, and code usage over a data set:
    perplexity, codes used and dead codes (never picked on this set)."""
    vq.eval()
    idx = list(range(dist.rank, len(dataset), dist.world))
    lists = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    num_codes = vq.config.num_vq_embeddings
    counts = torch.zeros(num_codes, dtype=torch.float64)
    loss = psnr = l1 = 0.0
    for images, _ in fetch_batches(dataset, lists, 0):
        x = prepare_images(images.to(dist.device), pad)
        out = vqgan_losses(vq, x, recon, beta)
        n = len(x)
        x_rec = out["reconstruction"].clamp(-1, 1)
        mse = ((x_rec - x) ** 2).flatten(1).mean(1)                       # (n,)
        psnr += (10 * torch.log10(4.0 / mse.clamp(min=1e-10))).sum().item()
        l1 += (x_rec - x).abs().flatten(1).mean(1).sum().item()
        loss += out["loss"].item() * n
        counts += torch.bincount(out["indices"].flatten().cpu(), minlength=num_codes).double()
    *sums, n = dist.sum([loss, psnr, l1, float(sum(map(len, lists)))])
    counts = torch.tensor(dist.sum(counts.tolist()))
    used = int((counts > 0).sum())
    return {"loss": sums[0] / n, "psnr": sums[1] / n, "l1": sums[2] / n,
            "perplexity": counts_perplexity(counts), "codes_used": used,
            "dead_codes": num_codes - used, "n": int(n)}


def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
    """`pixtok eval` for a VQGAN: PSNR and code usage on a split of its data set (or --data)."""
    vq, info = load_vqgan(ckpt)
    data = dict(config["data"], **({"data_dir": args.data} if args.data else {}))
    dataset = load_split(data, args.split)
    recipe = config.get("recipe", {})
    return evaluate_vqgan(vq, dataset, info["pad"], Dist(), args.batch_size,
                          recipe.get("recon_loss", "l1"), recipe.get("commit_beta", 0.25))
