"""load_core(task, model_dir, device): the inference core of a served model's folder (an unpacked
archive), the one loader that the TorchServe handlers and the KServe server share. Which runner
loads a task is its row of the task registry (pixtok/tasks.py, `serving.runner`); each runner
module has a `load(model_dir, device)`."""
from __future__ import annotations

import importlib

from pixtok.tasks import served_task


def load_core(task: str, model_dir, device="cpu"):
    """The runner of `task` (an archive's config.json "task": classify, depth, generate) over
    the model in model_dir, on device; ValueError for a task that is not served."""
    module, function = served_task(task).serving.runner.split(":")
    return getattr(importlib.import_module(module), function)(model_dir, device)
