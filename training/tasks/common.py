"""Helpers every image task shares: the recipe's ViT sized for its data, token dropout, the data
set a recipe names and its splits (init_from= is training/adapt.py)."""
from __future__ import annotations

import torch

from pixtok.errors import UserError
from pixtok.models.vit import parse_name, shuffle_tokens, vit_config
from training.data import Slice, build_dataset, holdout
from training.distributed import Dist
from training.loader import channel_stats
from training.recipe import Recipe


def recipe_vit_config(recipe: Recipe, dataset, num_classes: int = 0):
    """The recipe's ViT sized for a training set (its shape and channel statistics); every
    ViT-based task (classify, depth, MAE) builds its encoder from this."""
    sizes = {k: getattr(recipe, k) for k in ("width", "depth", "heads") if getattr(recipe, k)}
    mean, std = channel_stats(dataset)
    try:
        return vit_config(recipe.model, image_size=tuple(dataset.image_size),
                          in_channels=dataset.in_channels, mean=mean, std=std,
                          num_classes=num_classes, embed=recipe.embed, dict_dim=recipe.dict_dim,
                          pos_embed=recipe.pos_embed, pool=recipe.pool,
                          drop_path=recipe.drop_path, **sizes)
    except ValueError as e:            # the model code raises ValueError: a bad recipe
        raise UserError(str(e)) from None


class TokenDropout:
    """A recipe's token dropout over the run: which tokens each training image keeps.

    `token_drop` of each image's tokens are dropped at random (a new draw per image and step,
    seeded by the step, so a resumed run draws the same); evaluation sees every token. Dropping
    75% of a ViT/1's 784 tokens makes a training step about 7x cheaper on a CPU, as attention's
    cost falls with the square.
    """

    def __init__(self, recipe: Recipe, num_tokens: int):
        self.drop, self.num_tokens = recipe.token_drop, num_tokens

    def keep_ids(self, n: int, step_seed: int, dist: Dist) -> torch.Tensor | None:
        """(n, K) token indices for this process's n images in this step, or None for all.
        The draw is made for the global batch and each process takes its slice, so 1 and N
        processes train alike."""
        if self.drop == 0:
            return None
        gen = torch.Generator().manual_seed(step_seed * 7919)
        ids, keep = shuffle_tokens(n * dist.world, self.num_tokens, self.drop, gen, dist.device)
        return ids[dist.rank * n:(dist.rank + 1) * n, :keep]


def data_spec(recipe: Recipe) -> dict:
    """The config.json "data" entry: enough to rebuild any split. An ImageFolder's channels and
    (where the recipe gives none) image size are settled here, from its training images, so
    every split and `pixtok eval` read it alike."""
    spec = {"dataset": recipe.dataset, "data_dir": recipe.data_dir or None,
            "image_size": recipe.image_size or None, "resize": recipe.resize}
    if recipe.dataset == "imagefolder" and recipe.data_dir and \
            not (recipe.channels and recipe.image_size):
        from training.data.imagefolder import describe_folder
        try:
            patch = parse_name(recipe.model)[3]       # a ViT: the size is a multiple of p
        except ValueError:
            patch = 1                                 # a VQGAN's own names ("f4-small")
        found = describe_folder(recipe.data_dir, patch)
        spec["image_size"] = recipe.image_size or found["image_size"]
        spec["channels"] = recipe.channels or found["channels"]
    elif recipe.channels:
        spec["channels"] = recipe.channels
    for key in ("val_size", "train_size"):
        if getattr(recipe, key):
            spec[key] = getattr(recipe, key)
    if recipe.permute_swaps:
        spec["permute"] = {"swaps": recipe.permute_swaps, "distance": recipe.permute_distance,
                           "seed": recipe.permute_seed}
    return spec


def split_source(data: dict, split: str) -> str:
    """The stored split that `split` is cut from: "val" is the end of "train" (val_size)."""
    if split == "val" and not data.get("val_size") and data.get("dataset") == "imagefolder":
        return "val"                                      # its own val/ folder
    if split == "val" and not data.get("val_size"):
        raise UserError("split 'val': this run was trained without val_size=N, so it has no "
                        "validation split")
    return "train" if split == "val" else split


def cut_split(data: dict, split: str, dataset):
    """Hold the validation items out of train (val_size), keep the first train_size of the
    rest for training, and permute the pixels (permute)."""
    if data.get("val_size") and split in ("train", "val"):
        dataset = holdout(dataset, data["val_size"], split)
    if data.get("train_size") and split == "train":
        if data["train_size"] > len(dataset):
            raise UserError(f"train_size={data['train_size']}: the training split has only "
                            f"{len(dataset)} items")
        dataset = Slice(dataset, 0, data["train_size"])
    if data.get("permute"):
        from training.data.permute import PermutedPixels, pixel_permutation
        h, w = dataset.image_size
        dataset = PermutedPixels(dataset, pixel_permutation(h, w, **data["permute"]))
    return dataset


def load_split(data: dict, split: str, cache_dir: str = ""):
    """A split of the data set a recipe or a checkpoint names: train, val or test."""
    size = tuple(data["image_size"]) if data.get("image_size") else None
    dataset = build_dataset(data["dataset"], data.get("data_dir"), split=split_source(data, split),
                            image_size=size, resize=data.get("resize", "bicubic"),
                            cache_dir=cache_dir or None, channels=data.get("channels", 0))
    return cut_split(data, split, dataset)


def load_splits(data: dict, recipe: Recipe, dist: Dist, load=load_split):
    """(train, the split training evaluates on) of a run, each load(data, split, cache_dir):
    val when the recipe holds one out (val_size), else test. With a cache_dir, each node's
    first process builds the cache before the others read it."""
    held_out = "val" if data.get("val_size") else "test"
    return dist.local_first(lambda: (load(data, "train", recipe.cache_dir),
                                     load(data, held_out, recipe.cache_dir)),
                            enabled=bool(recipe.cache_dir))
