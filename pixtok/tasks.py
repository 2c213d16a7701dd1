"""The one registry of tasks: every part looks a task up here by the name a recipe or a
checkpoint's config.json gives.

- training builds `trainer` (a training.tasks class implementing training/tasks/base.py's Task,
  named as "module:Class" so the core imports no training code) for `pixtok train`, and calls
  its evaluate_checkpoint for `pixtok eval`;
- export builds an archive for a task with a `handler` (serving/handlers/<handler>.py), whose
  archive says `served_as` (the task the server, the REST API and the page know it by).
"""
from __future__ import annotations

from dataclasses import dataclass

from pixtok.errors import UserError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    trainer: str                     # "module:Class" of its training.tasks class
    handler: str | None = None       # serving/handlers/<handler>.py, for a task that is served
    served_as: str | None = None     # its task in an archive's config.json (REST, the page)
    onnx_output: str | None = None   # the ONNX graph's output name, where it exports to ONNX
    pipeline: bool = False           # its checkpoint is a diffusers pipeline folder


TASKS = {t.name: t for t in (
    TaskInfo("classify", "training.tasks.classify:ClassifyTask", "classifier", "classify",
             "logits"),
    TaskInfo("depth", "training.tasks.depth:DepthTask", "depth", "depth", "depth"),
    TaskInfo("mae", "training.tasks.mae:MAETask"),
    TaskInfo("vqgan", "training.tasks.vqgan:VQGANTask"),
    TaskInfo("dit", "training.tasks.dit:DiTTask", "generator", "generate", pipeline=True),
)}


def task_info(name) -> TaskInfo:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]

