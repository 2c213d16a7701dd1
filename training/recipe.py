"""Recipes: one flat dataclass of all a run needs, from a TOML file plus key=value overrides."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pixtok.errors import UserError
from pixtok.tasks import TASKS

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class Recipe:
    """A training run. Field names are the keys accepted in recipe files and as CLI overrides."""
    name: str = ""
    source: str = ""              # where the numbers come from (paper section, table)
    task: str = "classify"        # classify | depth | mae | vqgan | dit
    # model
    model: str = "ViT-P/1"        # a registry name; width/depth/heads > 0 override the size
    width: int = 0
    depth: int = 0
    heads: int = 0
    embed: str = "linear"         # linear | dictionary
    dict_dim: int = 0
    pos_embed: str = "learned"    # learned | sincos | none
    pool: str = "cls"             # cls | mean
    drop_path: float = 0.0
    init_from: str = ""           # a checkpoint folder or shipped model name: classifier, depth
                                  # model or MAE; what differs is adapted (training/adapt.py)
    freeze: str = ""              # classify/depth: "encoder" trains the head alone (linear probe)
    # data
    dataset: str = "fashion-mnist"
    data_dir: str = ""            # "" -> the data set's default location
    channels: int = 0             # imagefolder: 1 (grey) or 3 (RGB); 0 -> what the images are
    image_size: list[int] = field(default_factory=list)   # [H, W]; [] -> native size
    resize: str = "bicubic"       # bicubic | nearest (the paper's "single-pixel" resize)
    cache_dir: str = ""
    num_workers: int = 0
    crop_padding: int = 0
    hflip: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    token_drop: float = 0.0       # classify/depth: drop this fraction of tokens at random per
                                  # image in training (PatchDropout); evaluation sees them all
    val_size: int = 0             # classify/depth: hold the last N training images out as the
                                  # "val" split, which then replaces test in training's evaluations
    train_size: int = 0           # classify/depth: train on the first N training images only
                                  # (a subset for cheap studies; 0 = all but the val_size ones)
    permute_swaps: int = 0        # classify: a fixed pixel permutation of every image (train, val,
    permute_distance: int = 0     # test) made of this many random swaps, each between pixels at
    permute_seed: int = 0         # most this far apart (max-norm; 0 = any two pixels), paper Sec. 5
    # optimisation
    epochs: float = 10.0
    max_steps: int = 0            # > 0 stops there (the schedule still spans `epochs`)
    budget_minutes: float = 0.0   # > 0: the run's length (replacing `epochs`) is fitted to this
                                  # much wall time, from the speed of its first steps
    batch_size: int = 128         # global, over all processes
    lr: float = 1e-3              # peak learning rate
    min_lr: float = 1e-6          # cosine floor
    warmup_epochs: float = 1.0
    schedule: str = "cosine"      # after the warm-up: cosine (to min_lr) | constant
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    layer_decay: float = 1.0      # layer-wise lr decay (fine-tuning); 1 = off
    grad_clip: float = 0.0        # max gradient norm; 0 = off
    ema: float = 0.0              # EMA decay of the weights; 0 = off
    amp: str = "auto"             # auto (bf16 on GPU) | bf16 | off
    fsdp: bool = False            # shard weights/grads/optimizer over processes (FSDP2)
    seed: int = 0
    threads: int = 0              # torch threads per process; 0 = torch's default
    # bookkeeping
    eval_every: float = 1.0       # epochs between evaluations
    keep_every: float = 0.0       # > 0: keep the exported model every this many epochs, as
                                  # CKPT/snapshots/epochN/ (a study scores each); 0 = off
    ckpt_minutes: float = 10.0    # also checkpoint when this much time has passed
    eval_batch_size: int = 256
    # depth
    depth_loss: str = "silog"     # l1 | silog
    silog_lambda: float = 0.85    # silog: 1 ignores each image's global scale, 0 is log-MSE
    n_train: int = 0              # scenes: how many to render per split; 0 -> 2000 train, 500 test
    n_test: int = 0
    splits: str = ""              # nyu: split file (splits.mat, .txt, .npy); "" -> beside the data
    # MAE
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    # VQGAN (task vqgan; model is a size name such as f4-small)
    pad_to: int = 0               # zero-pad images, centred, to this size (28 -> 32); 0 = off
    vq_width: int = 0             # base channels of the VQGAN; 0 -> the size's
    codebook_size: int = 0        # number of codes; 0 -> the size's
    recon_loss: str = "l1"        # l1 | l2
    commit_beta: float = 0.25     # commitment loss weight
    restart_every: int = 100      # steps between restarts of codes unused meanwhile; 0 = off
    gan_weight: float = 0.0       # PatchGAN hinge loss weight (x adaptive weight); 0 = off
    gan_start: int = 0            # step at which the discriminator switches on
    disc_lr: float = 0.0          # discriminator learning rate; 0 -> lr
    perceptual_weights: str = ""  # LPIPS-VGG weight file(s) on disk, comma-separated; "" = no LPIPS
    perceptual_weight: float = 1.0
    # DiT (task dit; model is a DiT name such as DiT-N/1)
    vqgan: str = ""               # VQGAN checkpoint (or diffusers VQModel) folder
    latent_dir: str = ""          # latent cache folder; "" -> <vqgan>/latents
    latent_scale: float = 0.0     # latents are multiplied by this; 0 -> 1 / their std
    class_dropout: float = 0.1    # label dropout, for classifier-free guidance
    classifier: str = ""          # classifier checkpoint for fid_proxy / class_agreement
    eval_samples: int = 0         # generated samples per evaluation for fid_proxy; 0 = none

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# recipe keys the training loop itself reads, for every task (training/train.py), and the data
# and augmentation keys every task's data set takes; a task adds its own (Task.RECIPE_KEYS)
COMMON_KEYS = frozenset({
    "name", "source", "task", "model", "epochs", "max_steps", "budget_minutes", "batch_size",
    "lr", "min_lr", "warmup_epochs", "schedule", "weight_decay", "beta1", "beta2",
    "layer_decay", "grad_clip", "ema", "amp", "fsdp", "seed", "threads", "eval_every",
    "keep_every", "ckpt_minutes", "eval_batch_size", "dataset", "data_dir", "image_size", "resize",
    "cache_dir", "num_workers", "crop_padding", "hflip"})
# the ViT's architecture keys, for every task built on one (classify, depth, MAE)
VIT_KEYS = frozenset({"width", "depth", "heads", "embed", "dict_dim", "pos_embed", "pool",
                      "drop_path"})


def check_task_keys(recipe: Recipe, taken: frozenset[str]) -> None:
    """A recipe key the recipe's task does not take must keep its default: one line otherwise
    (e.g. init_from= on an MAE recipe, mask_ratio= on a classifier)."""
    default = Recipe()
    unused = [f.name for f in dataclasses.fields(Recipe)
              if f.name not in taken and getattr(recipe, f.name) != getattr(default, f.name)]
    if unused:
        raise UserError(f"task {recipe.task!r} does not take {', '.join(unused)} "
                        f"(set in recipe {recipe.name or '?'!s} or on the command line)")


def _convert(name: str, kind, text: str):
    """Parse an override's text as the field's type."""
    if kind is bool or kind == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"override {name}={text}: expected true or false")
    if kind in (int, "int", float, "float"):
        try:
            return int(text) if kind in (int, "int") else float(text)
        except ValueError:
            raise UserError(f"override {name}={text}: expected a number") from None
    if name == "image_size":
        try:
            sizes = [int(s) for s in text.lower().replace("x", ",").split(",") if s]
        except ValueError:
            sizes = []
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            raise UserError(f"override image_size={text}: expected N or HxW, e.g. 32 or 48x64")
        return sizes * (3 - len(sizes))
    return text


FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


def _check_keys(keys, where: str) -> None:
    unknown = sorted(set(keys) - set(FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: "
                        f"{', '.join(FIELDS)}")


def parse_overrides(overrides: list[str]) -> dict:
    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"bad override {item!r}: expected key=value, e.g. epochs=5")
        _check_keys([key], "override")
        values[key] = _convert(key, FIELDS[key].type, text)
    return values


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str, overrides: list[str] | dict | None = None) -> Recipe:
    """A recipe by name (training/recipes/NAME.toml) or path, with overrides applied."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UserError(f"unknown recipe {name_or_path!r}; known recipes: "
                            f"{', '.join(recipe_names())} (or give a .toml file)")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    _check_keys(values, str(path))
    values.setdefault("name", path.stem)
    return from_dict(values, overrides)


def check_adaptation_keys(recipe: Recipe) -> None:
    """freeze= and channels=: one line for a value they do not take."""
    if recipe.freeze not in ("", "encoder"):
        raise UserError(f"freeze={recipe.freeze!r}: expected encoder (or nothing)")
    if recipe.channels not in (0, 1, 3):
        raise UserError(f"channels={recipe.channels}: expected 1 or 3 (0: what the images are)")
    if recipe.channels and recipe.dataset != "imagefolder":
        raise UserError(f"channels={recipe.channels}: only an imagefolder data set is converted; "
                        f"{recipe.dataset} has its own channels")


def from_dict(values: dict, overrides: list[str] | dict | None = None) -> Recipe:
    """A recipe from stored values (config.json's "recipe") with overrides applied."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    merged = {**values, **(overrides or {})}
    _check_keys(merged, "recipe")
    recipe = Recipe(**merged)
    for key in ("data_dir", "cache_dir", "init_from", "splits", "vqgan", "latent_dir",
                "classifier", "perceptual_weights"):                   # "~/data/..." in recipes
        setattr(recipe, key, os.path.expanduser(getattr(recipe, key)))
    if isinstance(recipe.image_size, int):
        recipe.image_size = [recipe.image_size, recipe.image_size]
    for key, allowed in (("amp", ("auto", "bf16", "off")), ("resize", ("bicubic", "nearest")),
                         ("task", tuple(TASKS)),
                         ("schedule", ("cosine", "constant")), ("recon_loss", ("l1", "l2")),
                         ("depth_loss", ("l1", "silog"))):
        if getattr(recipe, key) not in allowed:
            raise UserError(f"{key}={getattr(recipe, key)!r}: expected one of {', '.join(allowed)}")
    check_adaptation_keys(recipe)
    if not 0 <= recipe.token_drop < 1:
        raise UserError(f"token_drop={recipe.token_drop}: expected a fraction in [0, 1)")
    if min(recipe.val_size, recipe.train_size, recipe.permute_swaps, recipe.permute_distance) < 0:
        raise UserError("val_size, train_size, permute_swaps and permute_distance must be >= 0")
    if not 0 <= recipe.silog_lambda <= 1:
        raise UserError(f"silog_lambda={recipe.silog_lambda}: expected a weight in [0, 1]")
    if recipe.budget_minutes < 0:
        raise UserError(f"budget_minutes={recipe.budget_minutes}: expected minutes >= 0 "
                        "(0 = train for `epochs`)")
    if recipe.batch_size < 1 or recipe.epochs <= 0 or recipe.lr <= 0:
        raise UserError("batch_size, epochs and lr must be positive")
    from training.tasks import trainer_class  # the task modules import this one

    check_task_keys(recipe, trainer_class(recipe.task).RECIPE_KEYS)
    return recipe
