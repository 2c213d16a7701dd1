"""The models the Gradio page (serving/gradio_app.py) shows and the examples beside them.

The page serves the store its server serves: the run folder's config.properties names the
models, each archive's config.json their task, classes, input size and training data, which
make each tab's line (describe). Example images are the ones `pixtok serve` wrote into the run
folder (ui/examples/: Fashion-MNIST test images, rendered scenes), shown only beside a model
trained on that data set; the Generate tab's examples are requests, one per sampler.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from pixtok.archive import read_archive_json
from serving.page_settings import (
    MODEL_ENV,
    archive_labels,
    model_names,
    served_archives,
    served_models,
)

TASKS = ("generate", "classify", "depth")      # the page's tabs, in this order


@dataclass
class ServedModel:
    """A served model as the page shows it, from its archive's config.json."""
    name: str
    task: str                           # classify, depth or generate
    labels: list[str] = field(default_factory=list)
    image_size: list[int] | None = None     # [H, W] of its input (classifiers, depth models)
    channels: int | None = None
    dataset: str | None = None          # what it was trained on (config "data": "dataset")


def served_model(name: str, task: str, mar: Path | None) -> ServedModel:
    config = (read_archive_json(mar, "config.json") or {}) if mar else {}
    source = config.get("input") if isinstance(config.get("input"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    size = source.get("image_size")
    return ServedModel(name, task, archive_labels(mar) if mar else [],
                       list(size) if isinstance(size, list) and len(size) == 2 else None,
                       source.get("channels"), data.get("dataset") or data.get("name"))


def page_models(run_dir: Path, preferred: dict | None = None) -> dict[str, list[ServedModel]]:
    """{task: [ServedModel]} for the page's tabs, in TASKS order: what the server of `run_dir`
    serves, as its config.properties lists it (tasks from each archive's config.json), the model
    `preferred` names ({task: name}: a flag or $PIXTOK_CLASSIFIER ...) first. A run folder that
    lists no model (a page pointed at a server by --inference-url alone) gets model_names()."""
    archives = served_archives(run_dir)
    served = served_models(run_dir)
    if not served:
        return {task: [served_model(name, task, archives.get(name))]
                for task, name in model_names(preferred).items()}
    wanted = {k: v for k, v in (preferred or {}).items() if v}
    for task, env in MODEL_ENV.items():
        wanted.setdefault(task, os.environ.get(env))
    found = {}
    for task in TASKS:
        names = served.get(task, [])
        names = sorted(names, key=lambda n: n != wanted.get(task))   # the preferred one first
        if names:
            found[task] = [served_model(n, task, archives[n]) for n in names]
    return found


def describe(model: ServedModel) -> str:
    """One line about a model for its tab: classes, input size and channels, training data."""
    parts = [f"`{model.name}`"]
    if model.labels:
        shown = ", ".join(model.labels[:12]) + (", …" if len(model.labels) > 12 else "")
        parts.append(f"{len(model.labels)} classes: {html.escape(shown)}")
    if model.image_size:
        channels = {1: "grey", 3: "RGB"}.get(model.channels, f"{model.channels} channels")
        parts.append(f"input {model.image_size[0]}×{model.image_size[1]} {channels} "
                     "(other sizes are resized)")
    if model.dataset:
        parts.append(f"trained on {html.escape(str(model.dataset))}")
    return " · ".join(parts)


# --- examples -------------------------------------------------------------------------------------
def read_examples(folder: Path) -> dict[str, list[Path]]:
    """{"classify": [...], "depth": [...]}: the example files `pixtok serve` wrote into `folder`
    (training/data/examples.py); the page itself never reads data sets."""
    return {"classify": sorted(folder.glob("fashion-test-*.png")),
            "depth": sorted(folder.glob("scene-*.png"))}


# which example images suit a model trained on which data set: {(task, dataset): examples key}
EXAMPLE_SETS = {("classify", "fashion-mnist"): ("classify", "Fashion-MNIST test images"),
                ("depth", "scenes"): ("depth", "Rendered scenes (training/data/scenes.py)")}


def model_examples(model: ServedModel, examples: dict[str, list[Path]]) -> tuple[list, str]:
    """(example images, their caption) for a model: the run folder's Fashion-MNIST test images
    for a classifier trained on Fashion-MNIST, its rendered scenes for a depth model trained on
    them; none for other models (a user's data is not in the run folder)."""
    key, caption = EXAMPLE_SETS.get((model.task, model.dataset), (None, ""))
    return (examples.get(key, []) if key else []), caption


def generate_examples(labels: list[str]) -> list[list]:
    """Rows of the Generate tab's examples: [class, seed, sampler, steps, guidance, images],
    one per sampler, over the first classes."""
    rows = [(0, 0, "dpm", 20, 4.0, 4), (1, 7, "ddim", 50, 4.0, 2), (2, 42, "euler", 50, 2.0, 1),
            (3, 3, "ddpm", 250, 1.5, 1)]
    return [[labels[i % len(labels)], seed, sampler, steps, guidance, n]
            for i, seed, sampler, steps, guidance, n in rows]
