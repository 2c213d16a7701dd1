"""`pixtok eval CKPT`: evaluate a checkpoint folder and print one JSON object of metrics."""
from __future__ import annotations

import json
from pathlib import Path

from pixtok.checkpoint import read_config
from pixtok.errors import UserError
from training.tasks import TASKS, trainer_class


def evaluate_split(ckpt, split: str, batch_size: int = 256) -> dict:
    """A classifier's or depth model's metrics on one split, in this process (pixtok study)."""
    from types import SimpleNamespace
    args = SimpleNamespace(ckpt=str(ckpt), split=split, batch_size=batch_size, data=None)
    config = read_config(Path(ckpt))
    if config.get("task") not in ("classify", "depth"):
        raise UserError(f"{ckpt}: a study evaluates classify and depth runs, not "
                        f"{config.get('task')!r}")
    return trainer_class(config["task"]).evaluate_checkpoint(Path(ckpt), config, args)


def run_cli(args) -> int:
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise UserError(f"{ckpt}: no such checkpoint folder")
    if (ckpt / "model_index.json").is_file():           # a diffusers pipeline: a generator
        config = {"task": "dit"}
    else:
        config = read_config(ckpt)
    task = config.get("task")
    if task not in TASKS:
        raise UserError(f"{ckpt}: cannot evaluate task {task!r}")
    # classify, depth and generator evaluations show a bar on stderr; stdout holds only the JSON
    # (no other stderr line: a user's mistake stays the one line there)
    metrics = trainer_class(task).evaluate_checkpoint(ckpt, config, args)
    print(json.dumps(metrics))
    return 0
