"""`pixtok bench sample`: images/s and fid_proxy of the samplers side by side, in one run.

DDPM-250, DDIM-50 and DPM-Solver++ at 10/20/25 steps, each without guidance (scale 1) and with
the default guidance, on one generator: model_store/fashion-dit1, or the checkpoint in
$PIXTOK_BENCH_GENERATOR (any generator folder, so a tiny one smoke-tests it). fid_proxy uses the
classifier in $PIXTOK_BENCH_CLASSIFIER, else the one `pixtok eval` would pick; without one it is
null. $PIXTOK_BENCH_SAMPLES sets the samples per setting (default 500, --quick 64).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pixtok.errors import UserError
from pixtok.sampling import SAMPLING_DEFAULTS
from training.evaluate_generator import (
    ROOT,
    Classifier,
    check_labels,
    classifier_path,
    device,
    generator_config,
    load_pipeline,
    real_reference,
    sample_images,
    sampling_bar,
    score,
)

CASES = [("ddpm", 250), ("ddim", 50), ("dpm", 10), ("dpm", 20), ("dpm", 25)]
DEFAULT_GENERATOR = Path("model_store") / "fashion-dit1"
BATCH = 64


def find_generator() -> Path:
    if os.environ.get("PIXTOK_BENCH_GENERATOR"):
        return Path(os.environ["PIXTOK_BENCH_GENERATOR"]).expanduser()
    for path in (DEFAULT_GENERATOR, ROOT / DEFAULT_GENERATOR):
        if (path / "model_index.json").is_file():
            return path
    raise UserError(f"no generator: {DEFAULT_GENERATOR} not found; set "
                    "PIXTOK_BENCH_GENERATOR=CKPT (a folder from `pixtok train dit...`)")


def bench_sample(quick: bool = False) -> dict:
    ckpt = find_generator()
    dev = device()
    pipe = load_pipeline(ckpt, dev)
    config = generator_config(ckpt)
    n = int(os.environ.get("PIXTOK_BENCH_SAMPLES") or (64 if quick else 500))
    path = classifier_path(os.environ.get("PIXTOK_BENCH_CLASSIFIER"), config)
    classifier = reference = None
    if path is not None:
        classifier = Classifier(path, dev)
        check_labels(pipe, classifier)
        reference = real_reference(classifier, n)
    pad = config.get("input", {}).get("pad", 0)
    k = pipe.transformer.config.num_classes
    labels = [i % k for i in range(n)]
    sample_images(pipe, labels[:2], "ddim", 2, 2.0)               # warm-up: kernels, allocations
    results = []
    settings = [(g, sampler, steps) for g in (1.0, SAMPLING_DEFAULTS["guidance"])
                for sampler, steps in CASES]
    batches = -(-n // BATCH)
    # stderr: where it is (setting i of 10) and how far, in sampler steps; stdout keeps the JSON
    bar = sampling_bar(sum(batches * steps for _, _, steps in settings),
                       f"bench sample: {n} images per setting")
    for i, (guidance, sampler, steps) in enumerate(settings):
        bar.set_description(f"bench sample {i + 1}/{len(settings)}: {sampler}-{steps}, "
                            f"guidance {guidance:g}, {n} images")
        images, seconds = sample_images(pipe, labels, sampler, steps, guidance,
                                        batch_size=BATCH, progress=bar)
        row = {"sampler": sampler, "steps": steps, "guidance": guidance,
               "images_per_s": n / seconds, "fid_proxy": None, "class_agreement": None}
        if classifier is not None:
            row |= score(classifier, images, labels, reference, pad)
        results.append(row)
    bar.close()
    floor = None
    if reference is not None:
        from training.metrics.generation import fid_from_features
        floor = fid_from_features(reference["a"], reference["b"])
    return {"suite": "sample", "generator": str(ckpt),
            "classifier": str(path) if path else None, "n": n, "batch": BATCH,
            "fid_proxy_floor": floor, "device": str(dev), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "results": results}
