"""The task registry (pixtok/tasks.py) holds every per-task fact, and the model registry
(pixtok.models.MODELS) rebuilds every architecture a task writes; a task added the way
docs/architecture.md says (one module, one registry row) trains, evaluates and is refused by
export in one line."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from clirun import ENV, message_lines, pixtok
from datafiles import learnable_fashion
from safetensors.torch import load_file

from pixtok.checkpoint import load_model
from pixtok.inference.core import load_core
from pixtok.models import MODELS
from pixtok.tasks import TASKS, served_tasks

ROOT = Path(__file__).resolve().parents[1]


def resolve(reference: str):
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_reference_in_the_registry_resolves():
    """Each row's trainer, export check, runner and handler exist, and a served task's batching
    has TorchServe's keys: a typo in a row fails here, not on a user's server."""
    for task in TASKS.values():
        assert resolve(task.trainer).name == task.name
        if task.export_check:
            assert callable(resolve(task.export_check))
        if task.handler:
            assert (ROOT / "serving" / "handlers" / f"{task.handler}.py").is_file()
    for name, task in served_tasks().items():
        assert callable(resolve(task.serving.runner))
        assert {"batchSize", "maxBatchDelay", "workers"} <= set(task.serving.batching), name
    assert list(served_tasks()) == ["classify", "depth", "generate"]


def test_load_core_refuses_a_task_that_is_not_served(tmp_path):
    try:
        load_core("mae", tmp_path)
    except ValueError as e:
        assert "cannot be served" in str(e)
    else:
        raise AssertionError("load_core loaded a task that is not served")


def test_build_model_rebuilds_a_vqgan_checkpoint(tmp_path):
    """The vqgan task writes arch "vqgan" into config.json; MODELS rebuilds it, weights and all."""
    data = learnable_fashion(tmp_path / "fashion", n_train=64, n_test=16)
    out = tmp_path / "vq"
    pixtok("train", "vqgan-fashion", "--out", out, f"data_dir={data}", "vq_width=8",
           "codebook_size=32", "batch_size=32", "eval_batch_size=16", "threads=1", "amp=off",
           "max_steps=2", "eval_every=1")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["arch"] == "vqgan" and "vqgan" in MODELS
    model, _ = load_model(out)
    saved = load_file(out / "model.safetensors")
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


TOY_TASK = '''"""A toy task: a line fitted to points of y = 2x + 1 (tests/test_registry.py)."""
from __future__ import annotations

import torch
from torch import nn

from training.tasks.base import COMMON_KEYS, Task


class ToyTask(Task):
    name = "toy"
    RECIPE_KEYS = COMMON_KEYS

    def __init__(self, recipe, dist):
        super().__init__(recipe, dist)
        self.x = torch.randn(64, 1, generator=torch.Generator().manual_seed(recipe.seed))
        self.y = 2 * self.x + 1
        self.train_set = self.x
        self.model = nn.Linear(1, 1)

    def config(self):
        return {"task": self.name, "model": {"arch": "toy-line", "name": "line", "args": {}}}

    def batches(self, index_lists, aug_seeds):
        for idx in index_lists:
            yield self.x[idx], self.y[idx]

    def loss(self, model, batch, step_seed):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    @torch.no_grad()
    def evaluate(self, model, batch_size=256):
        return {"loss": float(((model(self.x) - self.y) ** 2).mean())}

    @staticmethod
    def evaluate_checkpoint(ckpt, config, args):
        from safetensors.torch import load_file

        weights = load_file(f"{ckpt}/model.safetensors")
        return {"slope": float(weights["weight"]), "intercept": float(weights["bias"])}
'''
TOY_RECIPE = '''task = "toy"
model = "line"
batch_size = 16
lr = 0.05
warmup_epochs = 0
schedule = "constant"
epochs = 40
eval_every = 10
threads = 1
amp = "off"
'''
ROW = '    TaskInfo("toy", "training.tasks.toy:ToyTask"),\n'


def copy_of_the_repository(dest: Path) -> Path:
    """The tracked source files (no model store, no virtual environment) copied to dest."""
    files = subprocess.run(["git", "ls-files", "pixtok", "training", "export", "serving"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def test_a_task_added_as_the_docs_say_trains_evaluates_and_is_refused_by_export(tmp_path):
    """docs/architecture.md "How to add a task", step by step, on a copy of the repository:
    training/tasks/toy.py, then one TaskInfo row in pixtok/tasks.py. Nothing else is edited."""
    repo = copy_of_the_repository(tmp_path / "repo")
    (repo / "training" / "tasks" / "toy.py").write_text(TOY_TASK)
    tasks = repo / "pixtok" / "tasks.py"
    text = tasks.read_text()
    anchor = "TASKS = {t.name: t for t in (\n"
    assert anchor in text
    tasks.write_text(text.replace(anchor, anchor + ROW))
    (tmp_path / "toy.toml").write_text(TOY_RECIPE)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    run = lambda *args, **kw: pixtok(*args, env=env, cwd=repo, **kw)  # noqa: E731

    run("train", tmp_path / "toy.toml", "--out", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == "toy"
    fitted = json.loads(run("eval", tmp_path / "run").stdout)
    assert abs(fitted["slope"] - 2) < 0.1 and abs(fitted["intercept"] - 1) < 0.1
    # the recipe checks read the row: a key the task does not take is one line
    wrong = run("train", tmp_path / "toy.toml", "--out", tmp_path / "other", "mask_ratio=0.5",
                check=False)
    assert wrong.returncode == 2
    assert "task 'toy' does not take mask_ratio" in message_lines(wrong.stderr)[-1]
    # export reads it too: a task without an export check is refused in one line
    refused = run("export", tmp_path / "run", "--out", tmp_path / "store", check=False)
    assert refused.returncode == 2
    assert "task 'toy' cannot be exported yet" in message_lines(refused.stderr)[-1]


def test_the_copy_runs_its_own_code(tmp_path):
    """The toy test's copy imports its own pixtok, not this checkout's (else the row it adds
    would not count)."""
    repo = copy_of_the_repository(tmp_path / "repo")
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    code = "import pixtok.tasks; print(pixtok.tasks.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                         text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (repo / "pixtok" / "tasks.py").resolve()
