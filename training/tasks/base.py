"""The Task protocol: what the training loop, `pixtok eval` and the recipe checks need of a task.

A task turns a recipe into a model, its training data and a loss; the loop (training/train.py)
owns everything else (schedule, optimizer, EMA, DDP/FSDP, checkpoints, resume). Subclasses set
`name` and `RECIPE_KEYS` and implement the methods without a default here.
"""
from __future__ import annotations

from collections.abc import Iterator, Sized
from pathlib import Path

import torch
from torch import nn

from pixtok.checkpoint import save_weights
from pixtok.errors import UserError
from training.distributed import Dist
from training.recipe import COMMON_KEYS, VIT_KEYS, Recipe

__all__ = ["COMMON_KEYS", "VIT_KEYS", "Task"]


class Task:
    """One training task. Attributes set by __init__: model (nn.Module), train_set (Sized)."""

    name: str = ""
    # recipe keys this task reads beyond COMMON_KEYS; any other key must keep its default
    RECIPE_KEYS: frozenset[str] = frozenset()
    # (metric, "max" or "min"): with val_size=N, the weights best on the validation split by this
    # metric are kept in CKPT/best/; None: the task chooses nothing
    SELECT: tuple[str, str] | None = None
    model: nn.Module
    train_set: Sized

    def __init__(self, recipe: Recipe, dist: Dist):
        self.recipe, self.dist = recipe, dist

    def config(self) -> dict:
        """The task's part of config.json: task, model spec, labels, input, data."""
        raise NotImplementedError

    def batches(self, index_lists: list[list[int]], aug_seeds: list[int]) -> Iterator:
        """One batch of this process per index list, augmented by the matching seed."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, step_seed: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict:
        """Metrics of `model` (the weights to export) on the evaluation split."""
        raise NotImplementedError

    def init_from(self, path) -> None:
        """Start from another run's weights (recipe key init_from=)."""
        raise UserError(f"init_from is not supported by task {self.name!r}")

    def on_checkpoint(self, out: Path, model: nn.Module) -> None:
        """Write the exported model into the checkpoint folder `out`."""
        save_weights(out / "model.safetensors", model.state_dict())

    def state_dict(self) -> dict | None:
        """The task's own training state for an exact resume (a discriminator ...), or None."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    @staticmethod
    def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
        """`pixtok eval CKPT` for a checkpoint of this task."""
        raise NotImplementedError

    @staticmethod
    def shape_model(recipe: Recipe, data) -> tuple[dict, tuple]:
        """(config.json's "model" entry, makers of one forward pass's inputs) of the recipe's
        model on a data set known by its shape only (`image_size`, `in_channels`, `classes`):
        what tools/capacity.py counts the FLOPs of, without reading any data."""
        raise ValueError(f"no capacity rule for task {recipe.task}")


def image_inputs(data) -> tuple:
    """shape_model's inputs of an image model: one image of the data set's shape."""
    return (lambda: torch.rand(1, data.in_channels, *data.image_size),)
