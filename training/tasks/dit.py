"""Class-conditional DiT/p training on cached VQGAN latents (never running the encoder).

The first run encodes the recipe's data set with its VQGAN into a latent cache (training.latents;
default <vqgan>/latents/{train,test}) and every later run reuses it. Latents are multiplied by
latent_scale (default 1 / their std, so they start near unit variance, as the noise schedule
assumes); the scale goes into the VAE's scaling_factor, so the pipeline undoes it when decoding.

The checkpoint folder is a diffusers pipeline folder: model_index.json (with the class names),
transformer/ (the EMA weights), vae/ (the whole VQModel) and scheduler/ (the default sampler),
next to the loop's config.json, metrics.jsonl and train_state.pt. One offline
PixelDiTPipeline.from_pretrained(folder) call loads it.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from pixtok.errors import UserError
from pixtok.models.dit import PixelDiT, dit_config
from pixtok.pipeline import PixelDiTPipeline, make_scheduler
from pixtok.sampling import SAMPLING_DEFAULTS
from training.diffusion import diffusion_loss, training_scheduler
from training.distributed import Dist
from training.evaluate_generator import (
    DEFAULT_CLASSIFIER,
    classifier_path,
    evaluate_checkpoint,
    generation_metrics,
)
from training.latents import ensure_cache
from training.recipe import Recipe
from training.tasks.base import COMMON_KEYS, Task
from training.tasks.common import data_spec, load_split
from training.tasks.vqgan import load_vqgan

EVAL_ITEMS = 10_000          # held-out items for the test diffusion loss (a fixed random subset)
PAPER_LATENT = (4, 32, 32)  # the paper's VQ-f8 latent of a 256x256 image (shape_model)


def latent_caches(recipe: Recipe, dist: Dist, vae, info: dict):
    """The train and test latent caches of the recipe's data under its VQGAN (built if needed)."""
    data = data_spec(recipe)
    folder = Path(recipe.latent_dir) if recipe.latent_dir else Path(recipe.vqgan) / "latents"
    caches = []
    for split in ("train", "test"):
        spec = {"vqgan": info["weights_hash"], "data": data, "split": split, "pad": info["pad"]}
        # every process calls this at the same point; each node's first one fills cache_dir
        images = lambda s=split: dist.local_first(                            # noqa: E731
            lambda: load_split(data, s, recipe.cache_dir), enabled=bool(recipe.cache_dir))
        caches.append(ensure_cache(folder / split, vae, images, spec, info["pad"],
                                   recipe.eval_batch_size, recipe.num_workers, dist))
    return caches


def write_pipeline(out: Path, pipe: PixelDiTPipeline) -> None:
    """Save a pipeline into `out` file by file, each by one rename (model_index.json last), so a
    run killed meanwhile leaves every file whole; other files in `out` stay."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline-", dir=out))
    try:
        pipe.save_pretrained(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == "model_index.json"):
            target = out / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DiTTask(Task):
    """What the training loop needs to train and evaluate a class-conditional DiT/p."""

    name = "dit"
    RECIPE_KEYS = COMMON_KEYS | {"width", "depth", "heads", "pos_embed", "vqgan", "latent_dir",
                                 "latent_scale", "class_dropout", "classifier", "eval_samples",
                                 "init_from"}

    def __init__(self, recipe: Recipe, dist: Dist):
        super().__init__(recipe, dist)
        if not recipe.vqgan:
            raise UserError("a dit recipe needs vqgan=PATH: a VQGAN checkpoint folder "
                            "(pixtok train vqgan-...) or a diffusers VQModel folder")
        self.vae, self.vqgan_info = load_vqgan(recipe.vqgan, dist.device)
        self.train_set, self.test_set = latent_caches(recipe, dist, self.vae, self.vqgan_info)
        if len(self.train_set.classes) < 1:
            raise UserError(f"{self.train_set.folder}: the latent cache has no class names")
        self.scale = recipe.latent_scale or 1.0 / max(self.train_set.std(), 1e-8)
        self.vae.register_to_config(scaling_factor=self.scale)
        c, h, w = self.train_set.shape
        sizes = {k: getattr(recipe, k) for k in ("width", "depth", "heads") if getattr(recipe, k)}
        try:
            self.args = dit_config(recipe.model, sample_size=h if h == w else [h, w],
                                   in_channels=c, num_classes=len(self.train_set.classes),
                                   class_dropout_prob=recipe.class_dropout,
                                   pos_embed=recipe.pos_embed, **sizes)
            self.model = PixelDiT(**self.args)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.scheduler = training_scheduler()
        self.classifier = None
        if recipe.eval_samples > 0:
            self.classifier = classifier_path(recipe.classifier or None)
            if self.classifier is None or not (self.classifier / "config.json").is_file():
                if dist.main:
                    print(f"no classifier at {recipe.classifier or DEFAULT_CLASSIFIER}: "
                          "evaluations skip fid_proxy", file=sys.stderr)
                self.classifier = None
        order = torch.randperm(len(self.test_set), generator=torch.Generator().manual_seed(0))
        self.eval_items = order[:EVAL_ITEMS].sort().values

    def config(self) -> dict:
        """Task-specific part of config.json."""
        vae = self.vae.config
        return {"task": self.name,
                "model": {"arch": "dit", "name": self.recipe.model, "args": self.args},
                "labels": list(self.train_set.classes),
                "input": {"image_size": [vae.sample_size] * 2, "channels": vae.in_channels,
                          "pad": self.vqgan_info["pad"],
                          "latent_shape": list(self.train_set.shape)},
                "vqgan": self.recipe.vqgan, "vqgan_sha256": self.vqgan_info["weights_hash"],
                "latent_scale": self.scale,
                "latent_cache": str(self.train_set.folder.parent),
                "data": data_spec(self.recipe), "classifier": self.recipe.classifier or None,
                "sampling": SAMPLING_DEFAULTS}

    def init_from(self, path) -> None:
        """Start from another DiT (a pipeline folder or a shipped generator's name), adapted to
        this data's classes and latent grid (training/adapt.py)."""
        from training.adapt import init_dit, silent, tell
        init_dit(path, self.model, list(self.train_set.classes),
                 self.vqgan_info["weights_hash"], tell if self.dist.main else silent)

    def pipeline(self, transformer: nn.Module, sampler: str | None = None) -> PixelDiTPipeline:
        scheduler = make_scheduler(sampler or SAMPLING_DEFAULTS["sampler"], self.scheduler,
                                   self.args.get("learn_sigma", True))
        pipe = PixelDiTPipeline(transformer, self.vae, scheduler,
                                labels=list(self.train_set.classes))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def on_checkpoint(self, out: Path, export_model: nn.Module) -> None:
        """Write the diffusers pipeline folder (the exported weights: EMA where used)."""
        write_pipeline(Path(out), self.pipeline(export_model))

    def batches(self, index_lists, aug_seeds):
        """Yield (scaled latents (n, C, h, w), labels); aug_seeds pick the mirrored latents."""
        r, w = self.dist.rank, self.dist.world
        for idx, seed in zip(index_lists, aug_seeds):
            n_local = len(idx)
            gen = torch.Generator().manual_seed(seed)
            flipped = torch.rand(n_local * w, generator=gen)[r * n_local:(r + 1) * n_local] < 0.5
            x, y = self.train_set.get(idx, flipped)
            yield x * self.scale, y

    def loss(self, model, batch, step_seed: int) -> torch.Tensor:
        x0, y = (t.to(self.dist.device, non_blocking=True) for t in batch)
        gen = torch.Generator(self.dist.device).manual_seed(step_seed * 1009 + self.dist.rank)
        return diffusion_loss(model, x0, y, self.scheduler, generator=gen)["loss"]

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 256) -> dict:
        """Diffusion loss (mse + vb) on a fixed subset of the test latents, with fixed
        timesteps and noise; with eval_samples > 0 and a classifier, also fid_proxy."""
        model.eval()
        d = self.dist
        idx = self.eval_items[d.rank::d.world]
        sums = [0.0, 0.0, 0.0]
        for i in range(0, len(idx), batch_size):
            items = idx[i:i + batch_size]
            x0, y = self.test_set.get(items)
            x0, y = (x0 * self.scale).to(d.device), y.to(d.device)
            t = (items * 7919) % self.scheduler.config.num_train_timesteps     # spread over T
            gen = torch.Generator(d.device).manual_seed(int(items[0]))
            out = diffusion_loss(model, x0, y, self.scheduler, generator=gen, timesteps=t)
            for k, key in enumerate(("loss", "mse", "vb")):
                sums[k] += out[key].item() * len(items)
        *sums, n = d.sum([*sums, float(len(idx))])
        metrics = {"loss": sums[0] / n, "mse": sums[1] / n, "vb": sums[2] / n, "n": int(n)}
        if self.classifier is not None and d.main:
            metrics |= self.sample_metrics(model)
        return metrics

    @staticmethod
    def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
        """`pixtok eval` of a generator: its pipeline folder (training/evaluate_generator.py)."""
        return evaluate_checkpoint(ckpt, config, args)

    @staticmethod
    def shape_model(recipe: Recipe, data) -> tuple[dict, tuple]:
        """The DiT on the paper's latent of a 256x256 image (VQ-f8: 4x32x32)."""
        c, h, w = PAPER_LATENT
        spec = {"arch": "dit", "args": dit_config(recipe.model, sample_size=h, in_channels=c,
                                                  num_classes=len(data.classes))}
        label = torch.zeros(1, dtype=torch.long)
        return spec, (lambda: torch.rand(1, c, h, w), lambda: label, lambda: label)

    def sample_metrics(self, model) -> dict:
        """fid_proxy and class_agreement of eval_samples samples with the default sampler."""
        result = generation_metrics(self.pipeline(model), self.classifier,
                                    self.recipe.eval_samples, pad=self.vqgan_info["pad"],
                                    batch_size=self.recipe.eval_batch_size)
        return {k: result[k] for k in ("fid_proxy", "fid_proxy_floor", "class_agreement")}
