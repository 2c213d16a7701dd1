"""Image classification with ViT/p: data, loss and Acc@1/Acc@5 evaluation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pixtok.errors import UserError
from pixtok.models import build_model
from pixtok.models.vit import shuffle_tokens, vit_config
from training.checkpoint import load_same_task
from training.data import Slice, build_dataset, holdout
from training.data.augment import CropFlip, MixUpCutMix, smooth_targets
from training.distributed import Dist
from training.loader import channel_stats, crop_flip_batches, fetch_batches
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


def model_spec(recipe: Recipe, dataset, num_classes: int) -> dict:
    """The config.json "model" entry for a recipe's ViT on a training set."""
    cfg = recipe_vit_config(recipe, dataset, num_classes)
    return {"arch": "vit", "name": recipe.model, "args": cfg.to_dict()}


def data_spec(recipe: Recipe) -> dict:
    spec = {"dataset": recipe.dataset, "data_dir": recipe.data_dir or None,
            "image_size": recipe.image_size or None, "resize": recipe.resize}
    for key in ("val_size", "train_size"):
        if getattr(recipe, key):
            spec[key] = getattr(recipe, key)
    if recipe.permute_swaps:
        spec["permute"] = {"swaps": recipe.permute_swaps, "distance": recipe.permute_distance,
                           "seed": recipe.permute_seed}
    return spec


def split_source(data: dict, split: str) -> str:
    """The stored split that `split` is cut from: "val" is the end of "train" (val_size)."""
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
                            cache_dir=cache_dir or None)
    return cut_split(data, split, dataset)


def load_splits(data: dict, recipe: Recipe, dist: Dist, load=load_split):
    """(train, the split training evaluates on) of a run, each load(data, split, cache_dir):
    val when the recipe holds one out (val_size), else test. With a cache_dir, each node's
    first process builds the cache before the others read it."""
    held_out = "val" if data.get("val_size") else "test"
    return dist.local_first(lambda: (load(data, "train", recipe.cache_dir),
                                     load(data, held_out, recipe.cache_dir)),
                            enabled=bool(recipe.cache_dir))


class ClassifyTask:
    """What the training loop needs to train and evaluate a classifier."""

    name = "classify"

    def __init__(self, recipe: Recipe, dist: Dist):
        self.recipe, self.dist = recipe, dist
        self.data = data_spec(recipe)
        self.train_set, self.test_set = load_splits(self.data, recipe, dist)
        ds = self.train_set
        self.spec = model_spec(recipe, ds, len(ds.classes))
        self.model = build_model(self.spec)
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
        """Start from a classify checkpoint of the same model (all weights: a later phase with its
        own schedule) or from an MAE checkpoint's encoder (fine-tuning; the head keeps its init)."""
        from training.tasks.mae import load_mae_encoder
        if not load_same_task(path, self.name, self.spec, self.model):
            load_mae_encoder(path, self.model)

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


@torch.no_grad()
def evaluate_classifier(model, dataset, dist: Dist, batch_size: int = 256, amp=None) -> dict:
    """Acc@1, Acc@5 and mean loss over a data set, each process taking every world-th item."""
    model.eval()
    idx = list(range(dist.rank, len(dataset), dist.world))
    lists = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    k = min(5, len(dataset.classes))
    correct1 = correct5 = loss = 0.0
    for x, y in fetch_batches(dataset, lists, 0):
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
    return evaluate_classifier(model, dataset, Dist(), args.batch_size)
