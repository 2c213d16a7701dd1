"""Training tasks: one module each, every class a training.tasks.base.Task, all registered in
the core's one task registry (pixtok/tasks.py), which train, eval, the recipe checks and export
read."""
from __future__ import annotations

import importlib

from pixtok.tasks import TASKS, task_info

__all__ = ["TASKS", "trainer_class"]


def trainer_class(name: str):
    """The Task class of a task name (its module imported on demand)."""
    module, cls = task_info(name).trainer.split(":")
    return getattr(importlib.import_module(module), cls)
