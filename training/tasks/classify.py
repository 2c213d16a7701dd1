"""Image classification with ViT/p: data, loss and Acc@1/Acc@5 evaluation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pixtok.errors import UserError
from pixtok.models import build_model
from training.adapt import freeze_encoder, init_encoder, silent, tell
from training.data.augment import CropFlip, MixUpCutMix, smooth_targets
from training.distributed import Dist
from training.loader import crop_flip_batches, fetch_batches, with_bar
from training.recipe import Recipe
from training.tasks.base import COMMON_KEYS, VIT_KEYS, Task, image_inputs
from training.tasks.common import (
    TokenDropout,
    data_spec,
    load_split,
    load_splits,
    recipe_vit_config,
)


def model_spec(recipe: Recipe, dataset, num_classes: int) -> dict:
    """The config.json "model" entry for a recipe's ViT on a training set."""
    cfg = recipe_vit_config(recipe, dataset, num_classes)
    return {"arch": "vit", "name": recipe.model, "args": cfg.to_dict()}


class ClassifyTask(Task):
    """What the training loop needs to train and evaluate a classifier."""

    name = "classify"
    RECIPE_KEYS = COMMON_KEYS | VIT_KEYS | {"init_from", "freeze", "channels", "mixup", "cutmix",
                                            "label_smoothing", "token_drop", "val_size",
                                            "train_size",
                                            "permute_swaps", "permute_distance", "permute_seed"}
    SELECT = ("acc1", "max")

    def __init__(self, recipe: Recipe, dist: Dist):
        super().__init__(recipe, dist)
        self.data = data_spec(recipe)
        self.train_set, self.test_set = load_splits(self.data, recipe, dist)
        ds = self.train_set
        self.spec = model_spec(recipe, ds, len(ds.classes))
        self.model = build_model(self.spec)
        if recipe.freeze == "encoder":             # a linear probe: the head alone learns
            freeze_encoder(self.model)
        self.crop_flip = CropFlip(recipe.crop_padding, recipe.hflip)
        self.mix = None
        if recipe.mixup > 0 or recipe.cutmix > 0:
            self.mix = MixUpCutMix(recipe.mixup, recipe.cutmix, num_classes=len(ds.classes),
                                   label_smoothing=recipe.label_smoothing)
        self.token_dropout = TokenDropout(recipe, self.model.cfg.num_tokens)

    def config(self) -> dict:
        """Task-specific part of config.json."""
        ds = self.train_set
        return {"task": self.name, "model": self.spec, "labels": list(ds.classes),
                "input": {"image_size": list(ds.image_size), "channels": ds.in_channels,
                          "resize": self.recipe.resize},
                "data": self.data}

    def init_from(self, path) -> None:
        """Start from the encoder of any classifier, depth model or MAE (a checkpoint folder or a
        shipped model's name), adapted to this data's classes, size and channels (its head too
        for the same labels: a later phase of the same run takes every weight)."""
        init_encoder(path, self.model, list(self.train_set.classes),
                     tell if self.dist.main else silent)

    def batches(self, index_lists, aug_seeds):
        """Yield (images float [0, 1], labels) for the given index lists of this process.

        aug_seeds[i] seeds the augmentation of global batch i; each process applies its slice
        of the global batch's parameters, so 1 and N processes augment identically.
        """
        for x, y, _ in crop_flip_batches(self.train_set, index_lists, aug_seeds, self.crop_flip,
                                         self.dist, self.recipe.num_workers):
            yield x.float().div_(255), y

    def loss(self, model, batch, step_seed: int) -> torch.Tensor:
        x, y = (t.to(self.dist.device, non_blocking=True) for t in batch)
        classes = len(self.train_set.classes)
        if self.mix is not None:
            gen = torch.Generator().manual_seed(step_seed * 1009 + self.dist.rank)
            x, target = self.mix(x.cpu(), y.cpu(), gen)
            x, target = x.to(self.dist.device), target.to(self.dist.device)
        elif self.recipe.label_smoothing > 0:
            target = smooth_targets(y, classes, self.recipe.label_smoothing)
        else:
            target = y
        keep = self.token_dropout.keep_ids(len(x), step_seed, self.dist)
        logits = model(x, keep_ids=keep)
        return F.cross_entropy(logits.float(), target)

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 256) -> dict:
        return evaluate_classifier(model, self.test_set, self.dist, batch_size)

    @staticmethod
    def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
        return evaluate_checkpoint(ckpt, config, args)

    @staticmethod
    def shape_model(recipe: Recipe, data) -> tuple[dict, tuple]:
        return model_spec(recipe, data, len(data.classes)), image_inputs(data)


@torch.no_grad()
def evaluate_classifier(model, dataset, dist: Dist, batch_size: int = 256, amp=None,
                        progress: str | None = None) -> dict:
    """Acc@1, Acc@5 and mean loss over a data set, each process taking every world-th item.
    progress: what a bar on stderr says while the batches run (None: no bar)."""
    model.eval()
    idx = list(range(dist.rank, len(dataset), dist.world))
    lists = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    k = min(5, len(dataset.classes))
    correct1 = correct5 = loss = 0.0
    for x, y in with_bar(fetch_batches(dataset, lists, 0), len(lists), progress):
        x, y = x.to(dist.device).float().div_(255), y.to(dist.device)
        with amp or torch.autocast(dist.device.type, enabled=False):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    correct1, correct5, loss, n = dist.sum([correct1, correct5, loss, float(sum(map(len, lists)))])
    return {"acc1": correct1 / n, "acc5": correct5 / n, "loss": loss / n, "n": int(n)}


def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
    """`pixtok eval` for a classifier: Acc@1/Acc@5 on a split of its data set (or --data)."""
    from pixtok.checkpoint import load_model
    from training.distributed import Dist

    model, config = load_model(ckpt)
    data = dict(config["data"], **({"data_dir": args.data} if args.data else {}))
    dataset = load_split(data, args.split)
    if list(dataset.classes) != list(config["labels"]):
        raise UserError(f"{data['data_dir']}: its classes differ from the checkpoint's labels")
    return evaluate_classifier(model, dataset, Dist(), args.batch_size,
                               progress=f"eval: {len(dataset)} {args.split} images")
