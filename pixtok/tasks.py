"""The one registry of tasks: every fact about a task, one row per task, looked up by the name a
recipe or a checkpoint's config.json gives (or, for what the servers do, by `served_as`).

- training builds `trainer` (a training.tasks class implementing training/tasks/base.py's Task,
  named as "module:Class" so the core imports no training code) for `pixtok train`, and calls
  its evaluate_checkpoint for `pixtok eval`; a model card draws its `curve_key`;
- export builds an archive for a task with a `handler` (serving/handlers/<handler>.py) once its
  `export_check` ("module:function" of export, called with (config, ckpt)) passes; the archive
  says `served_as` (the task the server, the REST API and the page know it by);
- a served task's `serving` row says how it is served: the runner that loads its inference core
  (pixtok.inference.core.load_core), TorchServe's batching (KServe's too), its default model, the
  page's variable, option and concurrency for it, and the content type of a request's body.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pixtok.errors import UserError


@dataclass(frozen=True)
class Serving:
    """How a served task is served (pixtok serve, the REST client, the page, the benchmarks)."""
    runner: str                  # "module:function" (model_dir, device) -> its inference core
    default_model: str           # the model name served by default (docs/architecture.md)
    model_env: str               # the page's variable that names another model
    page_flag: str               # serving/gradio_app.py's option that names another model
    page_concurrency: int        # requests of this task the page sends at once
    content_type: str            # the Content-Type of a request's body
    # TorchServe's batchSize, maxBatchDelay (ms), workers[, responseTimeout (s)]; KServe batches
    # by the first two as well
    batching: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    trainer: str                     # "module:Class" of its training.tasks class
    handler: str | None = None       # serving/handlers/<handler>.py, for a task that is served
    served_as: str | None = None     # its task in an archive's config.json (REST, the page)
    onnx_output: str | None = None   # the ONNX graph's output name, where it exports to ONNX
    pipeline: bool = False           # its checkpoint is a diffusers pipeline folder
    curve_key: str = "loss"          # the metric a model card's learning curve shows
    export_check: str | None = None  # "module:function" checking a checkpoint folder's config
    serving: Serving | None = None   # for a served task


TASKS = {t.name: t for t in (
    TaskInfo("classify", "training.tasks.classify:ClassifyTask", "classifier", "classify",
             "logits", curve_key="acc1",
             export_check="export.archive:check_classifier_config",
             serving=Serving("pixtok.inference.classifier:load", "fashion-vit1",
                             "PIXTOK_CLASSIFIER", "--classifier", 8, "image/png",
                             {"batchSize": 16, "maxBatchDelay": 10, "workers": 1})),
    TaskInfo("depth", "training.tasks.depth:DepthTask", "depth", "depth", "depth",
             curve_key="rmse", export_check="export.archive:check_depth_config",
             serving=Serving("pixtok.inference.depth_estimator:load", "scenes-vit1-depth",
                             "PIXTOK_DEPTH_MODEL", "--depth-model", 4, "image/png",
                             {"batchSize": 4, "maxBatchDelay": 10, "workers": 1})),
    TaskInfo("mae", "training.tasks.mae:MAETask"),
    TaskInfo("vqgan", "training.tasks.vqgan:VQGANTask", curve_key="psnr"),
    # a generator batches inside one request instead; 16 images x 1000 steps on a CPU worker
    # takes minutes, not TorchServe's default 120 s
    TaskInfo("dit", "training.tasks.dit:DiTTask", "generator", "generate", pipeline=True,
             serving=Serving("pixtok.inference.image_generator:load", "fashion-dit1",
                             "PIXTOK_GENERATOR", "--generator", 2, "application/json",
                             {"batchSize": 1, "maxBatchDelay": 0, "workers": 1,
                              "responseTimeout": 600})),
)}


def task_info(name) -> TaskInfo:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def served_tasks() -> dict[str, TaskInfo]:
    """{served_as: TaskInfo} of every task that is served, in the registry's order."""
    return {t.served_as: t for t in TASKS.values() if t.served_as and t.serving}


def served_task(name: str) -> TaskInfo:
    """A served task by the name the servers know it by (an archive's config.json "task")."""
    served = served_tasks()
    if name not in served:
        raise ValueError(f"task {name!r} cannot be served")
    return served[name]
