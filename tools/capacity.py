"""Capacity notes: FLOPs per image, per epoch and per run of every paper recipe, counted by the
FLOP counter (training/flops.py, torch.utils.flop_counter) on the meta device, and the
GPU-hours they imply.

    python -m tools.capacity > docs/capacity.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from pixtok.models import build_model
from training.flops import count_forward_flops
from training.recipe import load_recipe
from training.tasks import trainer_class

STORE = Path(__file__).resolve().parent.parent / "model_store"

# (train images, channels, classes) of each data set at the paper's scale
DATASETS = {"cifar100": (50_000, 3, 100), "imagefolder": (1_281_167, 3, 1000),
            "nyu": (795, 3, 0), "fashion-mnist": (60_000, 1, 10), "scenes": (2_000, 3, 0)}
PAPER_RECIPES = ["vit-t1-cifar100", "vit-t2-cifar100", "vit-s1-cifar100", "vit-s2-cifar100",
                 "vit-b1-imagenet", "mae-t1-cifar100", "mae-s1-cifar100", "mae-t1-cifar100-ft",
                 "mae-s1-cifar100-ft", "depth-s1-nyu", "depth-s2-nyu", "dit-l1-imagenet",
                 "dit-l2-imagenet"]
H100_BF16 = 989.4e12        # dense bf16 tensor-core peak of an H100 SXM, FLOP/s
MFU = 0.40                  # the utilisation the estimates assume
TRAIN_FACTOR = 3            # forward + backward (2x forward) per trained image


def recipe_model(recipe):
    """(model spec, forward inputs) of a recipe, without reading its data set."""
    n, channels, classes = DATASETS[recipe.dataset]
    size = tuple(recipe.image_size or (32, 32))
    shape_only = SimpleNamespace(image_size=size, in_channels=channels, classes=range(classes))
    return trainer_class(recipe.task).shape_model(recipe, shape_only)


def recipe_capacity(name: str) -> dict:
    recipe = load_recipe(name)
    spec, inputs = recipe_model(recipe)
    forward = count_forward_flops(lambda: build_model(spec), inputs)
    n = DATASETS[recipe.dataset][0]
    per_epoch = TRAIN_FACTOR * forward * n
    total = per_epoch * recipe.epochs
    return {"recipe": name, "model": recipe.model, "task": recipe.task,
            "forward_flops_per_image": forward, "train_flops_per_image": TRAIN_FACTOR * forward,
            "train_images": n, "epochs": recipe.epochs, "flops_per_epoch": per_epoch,
            "flops_total": total, "gpu_hours": total / (MFU * H100_BF16) / 3600,
            "train_images_per_s_per_gpu": MFU * H100_BF16 / (TRAIN_FACTOR * forward)}


# serving cases: (name, what, model spec builder, inputs, forward passes per image)
def serving_cases() -> list[tuple]:
    from pixtok.models.dit import dit_config
    from pixtok.models.vit import vit_config

    def vit(name, size, channels, classes):
        cfg = vit_config(name, image_size=size, in_channels=channels, num_classes=classes)
        return {"arch": "vit", "args": cfg.to_dict()}, (lambda: torch.rand(1, channels, *size),)

    def dit(name, c, side, classes):
        spec = {"arch": "dit", "args": dit_config(name, sample_size=side, in_channels=c,
                                                  num_classes=classes)}
        y = torch.zeros(1, dtype=torch.long)
        return spec, (lambda: torch.rand(1, c, side, side), lambda: y, lambda: y)

    def shipped(name):
        """A default model as shipped: its architecture from model_store/NAME/config.json."""
        spec = json.loads((STORE / name / "config.json").read_text())["model"]
        size, channels = spec["args"]["image_size"], spec["args"]["in_channels"]
        return spec, (lambda: torch.rand(1, channels, *size),)

    return [
        ("fashion-vit1 (default)", "ViT-N/1 28x28 classify", *shipped("fashion-vit1"), 1),
        ("scenes-vit1-depth (default)", "ViT-N/1 48x64 depth", *shipped("scenes-vit1-depth"), 1),
        ("fashion-dit1 (default)", "DiT-N/1 8x8x4, DPM-Solver++ 20 steps, guidance (2 passes)",
         *dit("DiT-N/1", 4, 8, 10), 2 * 20),
        ("ViT-B/1 ImageNet 28x28", "classify", *vit("ViT-B/1", (28, 28), 3, 1000), 1),
        ("DiT-L/1 ImageNet 256", "32x32x4, DDPM 250 steps, guidance (2 passes)",
         *dit("DiT-L/1", 4, 32, 1000), 2 * 250),
        ("DiT-L/1 ImageNet 256", "32x32x4, DPM-Solver++ 20 steps, guidance (2 passes)",
         *dit("DiT-L/1", 4, 32, 1000), 2 * 20),
    ]


def serving_markdown() -> str:
    lines = ["", "## Serving (estimates)", "",
             "Estimates, not measurements: forward FLOPs per image (our counter; VQGAN decoding",
             f"not included) at {MFU:.0%} of an H100's bf16 peak, for the default models as",
             "shipped (their model_store/*/config.json). Measured CPU numbers are in `pixtok bench",
             "serve` / `pixtok bench sample` output; what a lent H200 measured, in serving.md.", "",
             "| model | what | forward passes / image | GFLOPs / image | images/s per H100 "
             "(estimate) |", "|---|---|---:|---:|---:|"]
    for name, what, spec, inputs, passes in serving_cases():
        flops = passes * count_forward_flops(lambda spec=spec: build_model(spec), inputs)
        lines.append(f"| {name} | {what} | {passes} | {flops / 1e9:,.2f} | "
                     f"{MFU * H100_BF16 / flops:,.0f} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Capacity notes",
        "",
        "Generated by `python -m tools.capacity > docs/capacity.md` from the recipes in",
        "`training/recipes/`. FLOPs are counted by PyTorch's counter (`training/flops.py`: every",
        "matmul, attention and convolution of one forward pass, a multiply-add = 2 FLOPs) on the",
        "meta device; training costs 3x the forward pass per image. GPU-hours assume an H100 SXM",
        f"at {MFU:.0%} of its {H100_BF16 / 1e12:.0f} TFLOP/s dense bf16 peak — an *estimate*,",
        "not a measurement; DiT recipes count the transformer on 32x32x4 VQ-f8 latents (the",
        "encoder runs once, into the latent cache, and is not counted). MAE pre-training counts",
        "the encoder on the visible 25% of tokens plus the decoder on all of them.",
        "",
        "| recipe | task | model | GFLOPs / image (fwd) | train PFLOPs / epoch | epochs | "
        "train EFLOPs total | H100-hours @40% | train images/s per H100 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| `{r['recipe']}` | {r['task']} | {r['model']} | "
                     f"{r['forward_flops_per_image'] / 1e9:,.2f} | "
                     f"{r['flops_per_epoch'] / 1e15:,.1f} | {r['epochs']:g} | "
                     f"{r['flops_total'] / 1e18:,.3f} | {r['gpu_hours']:,.1f} | "
                     f"{r['train_images_per_s_per_gpu']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(markdown([recipe_capacity(name) for name in PAPER_RECIPES]))
    sys.stdout.write(serving_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
