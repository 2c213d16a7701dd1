"""`pixtok sample CKPT --label L ...`: class-conditional samples from a generator, as one PNG grid.

Same checkpoint, arguments and seed -> the same PNG bytes on the same device. Omitted sampler,
steps and guidance take SAMPLING_DEFAULTS (the REST API's and Gradio's defaults too); a sampler
given without steps takes that sampler's usual step count.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixtok.errors import UserError
from pixtok.sampling import SAMPLING_DEFAULTS

MAX_IMAGES = 1024


def sampling_settings(sampler: str | None, steps: int | None, guidance: float | None) -> dict:
    """Fill in omitted settings: SAMPLING_DEFAULTS, and the sampler's steps (default_steps)."""
    from pixtok.sampling import SAMPLERS, default_steps

    sampler = sampler or SAMPLING_DEFAULTS["sampler"]
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if steps is None:
        steps = default_steps(sampler)
    if guidance is None:
        guidance = SAMPLING_DEFAULTS["guidance"]
    if not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"--guidance {guidance}: expected a number >= 0 (1 = no guidance)")
    return {"sampler": sampler, "steps": steps, "guidance": float(guidance)}


def image_grid(images: torch.Tensor) -> Image.Image:
    """Images (N, C, H, W) in [0, 1] -> one image, ceil(sqrt(N)) columns, row by row."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * h, cols * w)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    pixels = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0] if c == 1 else pixels))


def run_cli(args) -> int:
    from pixtok.pipeline import make_scheduler
    from training.evaluate_generator import device, load_pipeline

    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UserError(f"-n {args.num_images}: expected 1..{MAX_IMAGES}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: expected a .png file")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    settings = sampling_settings(args.sampler, args.steps, args.guidance)
    pipe = load_pipeline(args.ckpt, device())
    label = int(pipe.class_ids([args.label])[0])          # a bad label: UserError, exit 2
    pipe.scheduler = make_scheduler(settings["sampler"], pipe.scheduler.config,
                                    pipe.transformer.config.learn_sigma)
    images = pipe([label] * args.num_images, guidance_scale=settings["guidance"],
                  num_inference_steps=settings["steps"],
                  generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
    image_grid(images.float().cpu()).save(out, format="PNG")
    name = pipe.labels[label] if pipe.labels else str(label)
    print(json.dumps({"out": str(out), "label": name, "index": label, "seed": args.seed,
                      "n": args.num_images, **settings}))
    return 0
