"""Masked-autoencoder pre-training of a ViT/p encoder, and loading its encoder for fine-tuning.

The masks of training come from torch's global RNG, which the training loop saves with every
checkpoint, so a resumed run masks exactly as an uninterrupted one. Evaluation draws its masks
from a generator of its own with a fixed seed: every evaluation hides the same pixels of the same
test images, so its losses are comparable over a run, and training's RNG is left untouched.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pixtok.checkpoint import load_model
from pixtok.errors import UserError
from pixtok.models import build_model
from pixtok.models.mae import MAEConfig, mae_grid
from training.data.augment import CropFlip
from training.distributed import Dist
from training.loader import crop_flip_batches, fetch_batches
from training.recipe import Recipe
from training.tasks.base import COMMON_KEYS, VIT_KEYS, Task, image_inputs
from training.tasks.common import data_spec, load_split, load_splits, recipe_vit_config

EVAL_SEED = 0


def mae_spec(recipe: Recipe, dataset) -> dict:
    """The config.json "model" entry: an MAE over the recipe's ViT, sized for the data."""
    encoder = recipe_vit_config(recipe, dataset)
    try:
        cfg = MAEConfig(encoder, decoder_width=recipe.decoder_width,
                        decoder_depth=recipe.decoder_depth, decoder_heads=recipe.decoder_heads,
                        mask_ratio=recipe.mask_ratio, norm_pix_loss=recipe.norm_pix_loss)
    except ValueError as e:            # the model code raises ValueError: a bad recipe
        raise UserError(str(e)) from None
    return {"arch": "mae", "name": f"MAE-{recipe.model}", "args": cfg.to_dict()}


class MAETask(Task):
    """What the training loop needs to pre-train a masked autoencoder on an image data set."""

    name = "mae"
    RECIPE_KEYS = COMMON_KEYS | VIT_KEYS | {"mask_ratio", "norm_pix_loss", "decoder_width",
                                            "decoder_depth", "decoder_heads"}

    def __init__(self, recipe: Recipe, dist: Dist):
        super().__init__(recipe, dist)
        self.data = data_spec(recipe)
        self.train_set, self.test_set = load_splits(self.data, recipe, dist)
        self.spec = mae_spec(recipe, self.train_set)
        self.model = build_model(self.spec)
        self.crop_flip = CropFlip(recipe.crop_padding, recipe.hflip)

    def config(self) -> dict:
        """Task-specific part of config.json."""
        ds = self.train_set
        return {"task": self.name, "model": self.spec,
                "input": {"image_size": list(ds.image_size), "channels": ds.in_channels,
                          "resize": self.recipe.resize},
                "data": self.data}

    def batches(self, index_lists, aug_seeds):
        """Yield images float [0, 1] (n, C, H, W), cropped and flipped as in ClassifyTask: each
        process applies its slice of the global batch's parameters (labels are not needed)."""
        for x, _, _ in crop_flip_batches(self.train_set, index_lists, aug_seeds, self.crop_flip,
                                         self.dist, self.recipe.num_workers):
            yield x.float().div_(255)

    def loss(self, model, batch, step_seed: int) -> torch.Tensor:
        # no generator: the masks come from torch's RNG, saved and restored with the checkpoint
        loss, _, _ = model(batch.to(self.dist.device, non_blocking=True))
        return loss.float()

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 256) -> dict:
        return evaluate_mae(model, self.test_set, self.dist, batch_size)

    @staticmethod
    def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
        return evaluate_checkpoint(ckpt, config, args)

    @staticmethod
    def shape_model(recipe: Recipe, data) -> tuple[dict, tuple]:
        return mae_spec(recipe, data), image_inputs(data)


@torch.no_grad()
def evaluate_mae(model, dataset, dist: Dist, batch_size: int = 256) -> dict:
    """Mean reconstruction loss (MSE over masked pixels) with masks from a fixed seed.

    Each process takes every world-th item and seeds its own generator, so the masks depend on
    the number of processes (not on the step): evaluations of one run compare exactly.
    """
    model.eval()
    gen = torch.Generator(device=dist.device).manual_seed(EVAL_SEED * 1009 + dist.rank)
    idx = list(range(dist.rank, len(dataset), dist.world))
    lists = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    total = 0.0
    for x, _ in fetch_batches(dataset, lists, 0):
        x = x.to(dist.device).float().div_(255)
        loss, _, _ = model(x, generator=gen)
        total += loss.item() * len(x)      # every image hides the same number of pixels
    total, n = dist.sum([total, float(len(idx))])
    return {"loss": total / n, "n": int(n)}


def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
    """`pixtok eval` for an MAE: the reconstruction loss on a split, and a PNG grid of input,
    masked input and reconstruction (--out, default CKPT/reconstruction.png)."""
    model, config = load_model(ckpt)
    data = dict(config["data"], **({"data_dir": args.data} if args.data else {}))
    dataset = load_split(data, args.split)
    metrics = evaluate_mae(model, dataset, Dist(), args.batch_size)
    count = min(len(dataset), getattr(args, "num_samples", None) or 8)
    images, _ = next(fetch_batches(dataset, [list(range(count))]))     # the split's first images
    out = Path(getattr(args, "out", None) or Path(ckpt) / "reconstruction.png")
    grid = mae_grid(model, images.float().div_(255), out, seed=EVAL_SEED)
    return {**metrics, "grid": str(grid)}
