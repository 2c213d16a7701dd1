"""Monocular depth with a dense ViT/p (DepthViT): data, loss and Eigen-style evaluation.

Every evaluation also scores the trivial model that predicts the training set's mean depth
everywhere: a depth model is only worth something where it beats that constant. The mean is
stored in config.json, so `pixtok eval` reports the baseline without reloading the training set.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from pixtok.errors import UserError
from pixtok.models import build_model
from pixtok.models.depth import DepthHeadConfig, depth_loss
from pixtok.models.vit import gather_tokens, patchify
from training.adapt import freeze_encoder, init_depth_head, init_encoder, silent, tell
from training.data.augment import CropFlip
from training.data.depth import build_depth_dataset
from training.distributed import Dist
from training.loader import crop_flip_batches, fetch_batches, with_bar
from training.metrics.depth import DepthMetrics, mean_depth_baseline
from training.recipe import Recipe
from training.tasks.base import COMMON_KEYS, VIT_KEYS, Task, image_inputs
from training.tasks.common import (
    TokenDropout,
    cut_split,
    load_splits,
    recipe_vit_config,
    split_source,
)

DEFAULT_SIZE = [48, 64]     # the paper's depth input, H x W


def data_spec(recipe: Recipe) -> dict:
    """The config.json "data" entry: enough to rebuild either split."""
    spec = {"dataset": recipe.dataset, "data_dir": recipe.data_dir or None,
            "image_size": list(recipe.image_size or DEFAULT_SIZE)}
    if recipe.dataset == "scenes":
        spec.update(n_train=recipe.n_train or None, n_test=recipe.n_test or None)
    if recipe.dataset == "nyu":
        spec["splits"] = recipe.splits or None
    for key in ("val_size", "train_size"):
        if getattr(recipe, key):
            spec[key] = getattr(recipe, key)
    return spec


def load_split(data: dict, split: str, cache_dir: str = ""):
    """A split of the depth data set a recipe or a checkpoint names (rendered scenes are kept
    in cache_dir, where given)."""
    options, source = {}, split_source(data, split)      # val: the end of train (val_size)
    if data.get(f"n_{source}"):
        options["n"] = data[f"n_{source}"]
    if data.get("splits"):
        options["splits"] = data["splits"]
    if cache_dir and data["dataset"] == "scenes":
        options["cache_dir"] = cache_dir
    dataset = build_depth_dataset(data["dataset"], data.get("data_dir"), split=source,
                                  image_size=tuple(data["image_size"]), **options)
    return cut_split(data, split, dataset)


def model_spec(recipe: Recipe, dataset, init_depth: float) -> dict:
    """The config.json "model" entry: a DepthViT of the recipe's size whose untrained head
    predicts init_depth everywhere."""
    cfg = recipe_vit_config(recipe, dataset)
    try:
        head = DepthHeadConfig(init_depth=init_depth)
    except ValueError as e:            # the model code raises ValueError: a bad recipe
        raise UserError(str(e)) from None
    return {"arch": "vit-depth", "name": recipe.model,
            "args": {**cfg.to_dict(), "head": asdict(head)}}


class DepthTask(Task):
    """What the training loop needs to train and evaluate a depth regressor."""

    name = "depth"
    RECIPE_KEYS = COMMON_KEYS | VIT_KEYS | {"init_from", "freeze", "token_drop", "depth_loss",
                                            "silog_lambda", "n_train", "n_test", "splits",
                                            "val_size", "train_size"}
    SELECT = ("rmse", "min")

    def __init__(self, recipe: Recipe, dist: Dist):
        super().__init__(recipe, dist)
        self.data = data_spec(recipe)
        self.train_set, self.test_set = load_splits(self.data, recipe, dist, load_split)
        try:
            self.train_mean_depth = mean_depth_baseline(self.train_set.depths)
        except ValueError as e:
            raise UserError(f"{recipe.dataset} {self.data['data_dir'] or ''}: {e}") from None
        self.spec = model_spec(recipe, self.train_set, self.train_mean_depth)
        self.model = build_model(self.spec)
        if recipe.freeze == "encoder":             # the dense head alone learns
            freeze_encoder(self.model)
        # padding is zero depth, which every loss and metric treats as "not measured"
        self.crop_flip = CropFlip(recipe.crop_padding, recipe.hflip)
        self.token_dropout = TokenDropout(recipe, self.model.cfg.num_tokens)

    def config(self) -> dict:
        """Task-specific part of config.json."""
        ds = self.train_set
        return {"task": self.name, "model": self.spec, "unit": "m",
                "train_mean_depth": self.train_mean_depth,
                "input": {"image_size": list(ds.image_size), "channels": ds.in_channels,
                          "resize": "bicubic"},
                "data": self.data}

    def init_from(self, path) -> None:
        """Start from the encoder of any depth model, classifier or MAE, adapted to this data's
        size and channels, and a depth model's head (a later phase takes every weight)."""
        say = tell if self.dist.main else silent
        head = init_encoder(path, self.model.encoder, None, say)
        init_depth_head(path, self.model, head, say)

    def batches(self, index_lists, aug_seeds):
        """Yield (images float [0, 1] (n, 3, H, W), depths (n, 1, H, W) in metres), cropped and
        flipped together; each process applies its slice of the global batch's parameters, so
        1 and N processes augment identically."""
        for x, d, params in crop_flip_batches(self.train_set, index_lists, aug_seeds,
                                              self.crop_flip, self.dist, self.recipe.num_workers):
            yield x.float().div_(255), self.crop_flip.apply(d, params)

    def loss(self, model, batch, step_seed: int) -> torch.Tensor:
        x, d = (t.to(self.dist.device, non_blocking=True) for t in batch)
        keep = self.token_dropout.keep_ids(len(x), step_seed, self.dist)
        if keep is not None:   # each kept token predicts its own pixels: compare with those only
            d = gather_tokens(patchify(d, self.model.cfg.patch_size), keep)
        return depth_loss(model(x, keep_ids=keep).float(), d, kind=self.recipe.depth_loss,
                          silog_lambda=self.recipe.silog_lambda)

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 256) -> dict:
        return evaluate_depth(model, self.test_set, self.dist, self.train_mean_depth, batch_size)

    @staticmethod
    def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
        return evaluate_checkpoint(ckpt, config, args)

    @staticmethod
    def shape_model(recipe: Recipe, data) -> tuple[dict, tuple]:
        return model_spec(recipe, data, init_depth=3.0), image_inputs(data)


def pooled(metrics: DepthMetrics, dist: Dist) -> dict:
    """Metrics over the pixels of every process."""
    keys = list(metrics.sums)
    *sums, n = dist.sum([metrics.sums[k] for k in keys] + [float(metrics.n)])
    metrics.sums, metrics.n = dict(zip(keys, sums)), int(n)
    return metrics.compute()


@torch.no_grad()
def evaluate_depth(model, dataset, dist: Dist, train_mean_depth: float,
                   batch_size: int = 256, progress: str | None = None) -> dict:
    """rmse, rel, delta1-3, log10 and n (valid pixels) over a data set, beside the same metrics
    of a constant prediction of the training set's mean depth (baseline_*). progress: what a
    bar on stderr says while the batches run (None: no bar)."""
    model.eval()
    idx = list(range(dist.rank, len(dataset), dist.world))
    lists = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    ours, baseline = DepthMetrics(), DepthMetrics()
    for x, d in with_bar(fetch_batches(dataset, lists, 0), len(lists), progress):
        x, d = x.to(dist.device).float().div_(255), d.to(dist.device)
        ours.update(model(x), d)
        baseline.update(torch.full_like(d, train_mean_depth), d)
    trivial = pooled(baseline, dist)
    return {**pooled(ours, dist),
            **{f"baseline_{k}": trivial[k] for k in ("rmse", "rel", "delta1")}}


def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
    """`pixtok eval` for a depth model: metrics on a split of its data set (or --data), beside
    the mean-depth baseline."""
    from pixtok.checkpoint import CheckpointError, load_model

    if "train_mean_depth" not in config:
        raise CheckpointError(f"{ckpt}/config.json: no train_mean_depth (not written by "
                              f"pixtok train for a depth recipe)")
    model, config = load_model(ckpt)
    data = dict(config["data"], **({"data_dir": args.data} if args.data else {}))
    dataset = load_split(data, args.split)       # resized to the checkpoint's input size
    return evaluate_depth(model, dataset, Dist(), config["train_mean_depth"], args.batch_size,
                          progress=f"eval: {len(dataset)} {args.split} scenes")
