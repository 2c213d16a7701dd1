"""The training loop shared by every task: schedule, AdamW, EMA, DDP, checkpoints, exact resume.

Determinism: the data order of epoch e is a permutation seeded by (seed, e); the augmentation of
global step s is seeded by (seed, s); the remaining randomness (drop path, MAE masks) comes from
torch's RNG, whose state is saved with every checkpoint. So a run killed and resumed from its last
checkpoint ends with the same weights as one never interrupted.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pixtok.checkpoint import FORMAT, atomic_write, git_commit, read_config, write_json
from pixtok.errors import UserError
from training import distributed
from training.checkpoint import (
    load_train_state,
    publish_folder,
    save_train_state,
    settle_folder,
)
from training.fsdp import full_model_state, full_optim_state, load_optim_state, shard
from training.recipe import Recipe, from_dict, load_recipe
from training.tasks import trainer_class
from training.tasks.base import Task


def schedule_steps(epochs: float, steps_per_epoch: int) -> int:
    """Steps in a schedule of `epochs` (a partial epoch counts as a step more). Rounded first,
    so that epochs stored as steps / steps_per_epoch (a budget's resolved length) give those
    steps back: 58 / 7 * 7 is 58.00000000000001 in floating point."""
    return math.ceil(round(epochs * steps_per_epoch, 6))


def lr_at(step: int, recipe: Recipe, steps_per_epoch: int) -> float:
    """Linear warm-up to the peak, then cosine to min_lr over the whole run (or, with
    schedule="constant", the peak until the end, as DiT trains)."""
    warmup = recipe.warmup_epochs * steps_per_epoch
    total = recipe.epochs * steps_per_epoch
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    if recipe.schedule == "constant":
        return recipe.lr
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return recipe.min_lr + (recipe.lr - recipe.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, position embeddings and [cls];
    with layer_decay < 1, deeper layers keep more of the learning rate (MAE fine-tuning)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    depth = getattr(getattr(model, "cfg", None), "depth", 0)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name in skip or name.endswith(".bias")
        layer = model.layer_id(name) if recipe.layer_decay < 1 and hasattr(model, "layer_id") else 0
        scale = recipe.layer_decay ** (depth + 1 - layer) if recipe.layer_decay < 1 else 1.0
        key = (no_decay, scale)
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else
                                    recipe.weight_decay, "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def autocast(recipe: Recipe, device: torch.device):
    bf16 = recipe.amp == "bf16" or (recipe.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class EMA:
    """Exponential moving average of a model's weights (the copy that gets exported)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        # Warm-up, as TensorFlow's ExponentialMovingAverage(num_updates): a fixed 0.999 would
        # keep the random initial weights in the average for thousands of steps (measured:
        # 0.30 test Acc@1 for the EMA against 0.69 for the raw weights after 468 steps).
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1 - decay)
            else:
                e.copy_(p)


class Budget:
    """Fits a run's length to a wall-time budget (recipe.budget_minutes), counted from the
    start of train().

    CALIBRATE training steps, after WARM steps of warm-up (allocator, kernels), are timed one by
    one; one evaluation made right after them times an evaluation. What is left of the budget
    then buys S more steps with an evaluation every E of them and one at the end:
    S * step_s + (S / E + 1) * eval_s = left, with step_s the median step: other work that
    slows some of the timed steps (a test run, a compile) does not cut the run short. The
    schedule (recipe.epochs) is set to end there and stored in config.json, so a resumed run
    keeps it.
    """

    WARM, CALIBRATE = 10, 40

    def __init__(self, minutes: float, step: int, t_begin: float, device: torch.device):
        self.seconds, self.t_begin, self.device = minutes * 60, t_begin, device
        self.start, self.end = step + self.WARM, step + self.WARM + self.CALIBRATE
        self.t_last: float | None = None          # the clock when the last timed step ended
        self.times: list[float] = []              # each timed step's seconds

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time()

    def lap(self, step: int) -> None:
        """Called when `step` steps are done: times the steps after `start` up to `end`."""
        if step == self.start:
            self.t_last = self.clock()
        elif self.start < step <= self.end:
            now = self.clock()
            self.times.append(now - self.t_last)
            self.t_last = now

    def pause(self, seconds: float) -> None:
        """Leave `seconds` of other work (a checkpoint) out of the step being timed."""
        if self.t_last is not None:
            self.t_last += seconds

    def step_s(self) -> float:
        return statistics.median(self.times)

    def steps_left(self, step_s: float, eval_s: float, eval_every: int) -> int:
        left = self.seconds - (time.time() - self.t_begin)
        return max(1, math.floor((left - eval_s) * eval_every / (eval_every * step_s + eval_s)))


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def trim_metrics(path: Path, step: int) -> None:
    """Drop evaluations logged after the checkpoint we resume from (they will be redone), and a
    line a killed run or a full disk left half written."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if (entry := json_or_none(line)) is not None and entry.get("step", 0) <= step]
        text = "".join(line + "\n" for line in keep)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def json_or_none(line: str) -> dict | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) else None


@contextlib.contextmanager
def disk_errors(out: Path, step: int, bar=None):
    """An OSError while writing into the checkpoint folder (a full disk, a read-only one) is a
    one-line error: every file there is written atomically, so the folder holds whole files of
    the last checkpoints and `--resume` continues from train_state.pt once there is room. The
    progress bar's line is ended first, so the error is a line of its own."""
    try:
        yield
    except OSError as e:
        if bar is not None:
            bar.close()
        raise UserError(f"cannot write into {out} at step {step} ({e.strerror or e}); stopped, "
                        f"the last checkpoint written whole is kept there (free space, then "
                        f"--resume)") from None


def resume_state(recipe: Recipe, out: Path, resume: bool, overrides) -> tuple[Recipe, dict | None]:
    """(the recipe to run, the saved training state or None): a folder that holds a run is
    continued with its stored recipe plus the new overrides, and only with --resume."""
    if not (out / "train_state.pt").is_file():
        return recipe, None
    if not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it "
                        "or choose another --out")
    state = load_train_state(out / "train_state.pt")
    for stale in out.glob(".*.tmp"):    # atomic writes a killed run left unfinished
        stale.unlink(missing_ok=True)
    return from_dict(read_config(out)["recipe"], overrides), state


def build_task(recipe: Recipe, dist) -> Task:
    """The recipe's task, its model built from the recipe seed on every rank alike."""
    cls = trainer_class(recipe.task)          # its recipe keys were checked by from_dict
    torch.manual_seed(recipe.seed)              # every rank builds the same initial weights
    task = cls(recipe, dist)
    task.model.to(dist.device)
    torch.manual_seed(recipe.seed + dist.rank)  # then each rank its own drop path / masks
    return task


class Run:
    """One training run: set up by start(), then loop() runs step(), evaluate(), checkpoint()
    and, with budget_minutes, fit_to_budget() until the schedule's last step."""

    def __init__(self, recipe: Recipe, out: Path, dist, task: Task, state: dict | None,
                 t_begin: float):
        self.recipe, self.out, self.dist, self.task = recipe, out, dist, task
        self.model, self.state, self.t_begin = task.model, state, t_begin
        self.step, self.metrics = 0, {}
        self.best: dict | None = None     # the best validation value so far (see keep_best)
        self.plan_schedule()
        self.build_weights()
        self.config = {"format": FORMAT, **task.config(), "recipe": recipe.to_dict(),
                       "recipe_name": recipe.name, "git_commit": git_commit()}

    @classmethod
    def start(cls, recipe: Recipe, out: Path, resume: bool = False, overrides=()) -> Run:
        t_begin = time.time()
        dist = distributed.setup()
        recipe, state = resume_state(recipe, out, resume, overrides)
        if recipe.threads > 0:
            torch.set_num_threads(recipe.threads)
        task = build_task(recipe, dist)
        if recipe.init_from and state is None:
            task.init_from(recipe.init_from)
        return cls(recipe, out, dist, task, state, t_begin)

    # --- set-up ---------------------------------------------------------------------------------
    def plan_schedule(self) -> None:
        """Steps per epoch, the run's last step, the evaluation interval and the budget."""
        recipe, dist, n = self.recipe, self.dist, len(self.task.train_set)
        self.b_local, rem = divmod(recipe.batch_size, dist.world)
        if rem:
            raise UserError(f"batch_size={recipe.batch_size} is not divisible by {dist.world}")
        self.steps_per_epoch = n // recipe.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"batch_size={recipe.batch_size} exceeds the {n} training items")
        self.total = schedule_steps(recipe.epochs, self.steps_per_epoch)
        if recipe.max_steps > 0:
            self.total = min(self.total, recipe.max_steps)
        self.eval_every = max(1, round(recipe.eval_every * self.steps_per_epoch))
        self.keep_steps = max(1, round(recipe.keep_every * self.steps_per_epoch)) \
            if recipe.keep_every > 0 else 0
        self.budget = None
        if recipe.budget_minutes > 0:
            start = self.state["step"] if self.state else 0
            self.budget = Budget(recipe.budget_minutes, start, self.t_begin, dist.device)
            if not recipe.max_steps or recipe.max_steps > self.budget.end:
                self.total = self.budget.end + 1   # until the budget has been turned into steps

    def build_weights(self) -> None:
        """EMA, the saved weights and optimizer state on a resume, FSDP shards, AdamW, DDP."""
        recipe, model, state, dist = self.recipe, self.model, self.state, self.dist
        self.ema = EMA(model, recipe.ema) if recipe.ema > 0 else None
        if state is not None:
            model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.model.load_state_dict(state["ema"])
        self.sharded = recipe.fsdp and dist.world > 1
        self.template = None
        if self.sharded:     # an unsharded copy to evaluate and export the gathered weights with
            self.template = copy.deepcopy(self.ema.model if self.ema else model)
            shard(model)
            if self.ema is not None:
                shard(self.ema.model)
        self.opt = torch.optim.AdamW(param_groups(model, recipe), lr=recipe.lr,
                                     betas=(recipe.beta1, recipe.beta2))
        if state is not None:
            self.restore(state)
        self.ddp = (DistributedDataParallel(model) if dist.world > 1 and not self.sharded
                    else model)

    def restore(self, state: dict) -> None:
        """The optimizer, RNG, task state and step of a saved run (after its weights)."""
        dist = self.dist
        load_optim_state(self.model, self.opt, state["optimizer"], self.sharded)
        set_rng_state(state["rng"][min(dist.rank, len(state["rng"]) - 1)], dist.device)
        if state.get("task") is not None:            # a task's own state (a discriminator ...)
            self.task.load_state_dict(state["task"])
        self.step = state["step"]
        self.best = state.get("best")
        if dist.main:
            trim_metrics(self.out / "metrics.jsonl", self.step)
            settle_folder(self.out / "best")

    # --- the parts of a step ----------------------------------------------------------------
    def exported(self) -> nn.Module:
        """The weights to evaluate and export (EMA where on), unsharded. A collective."""
        source = self.ema.model if self.ema else self.model
        if not self.sharded:
            return source
        self.template.load_state_dict(full_model_state(source, self.sharded, everywhere=True))
        return self.template

    def folder_config(self, metrics: dict | None) -> dict:
        """config.json of a checkpoint folder written now: the run's config at this step."""
        return {**self.config, "step": self.step, "epoch": self.step / self.steps_per_epoch,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **({"metrics": metrics} if metrics else {})}

    def checkpoint(self, metrics: dict | None) -> None:
        """Write the checkpoint folder: the exported model, config.json, train_state.pt."""
        dist, out, step = self.dist, self.out, self.step
        rngs = [None] * dist.world
        if dist.world > 1:
            torch.distributed.all_gather_object(rngs, rng_state(dist.device))
        else:
            rngs = [rng_state(dist.device)]
        export = self.exported()
        raw = full_model_state(self.model, self.sharded)
        ema_state = full_model_state(self.ema.model, self.sharded) if self.ema else None
        opt_state = full_optim_state(self.model, self.opt, self.sharded)
        if not dist.main:
            return
        with disk_errors(out, step, getattr(self, "bar", None)):
            self.task.on_checkpoint(out, export)
            write_json(out / "config.json", self.folder_config(metrics))
            save_train_state(out / "train_state.pt", {
                "model": raw, "optimizer": opt_state, "step": step, "ema": ema_state,
                "rng": rngs, "task": self.task.state_dict(), "best": self.best,
                "data_position": {"epoch": step // self.steps_per_epoch,
                                  "batch": step % self.steps_per_epoch}})

    def keep_best(self, metrics: dict) -> None:
        """With a validation split (val_size=N), keep the weights that are best on it so far by
        the task's SELECT metric as a whole checkpoint folder, CKPT/best/: this, not the last
        step, is what an honest comparison evaluates on the test set. A collective."""
        select = self.task.SELECT
        if not (select and self.recipe.val_size) or select[0] not in metrics:
            return
        key, mode = select
        value, best = float(metrics[key]), self.best
        if not math.isfinite(value):
            return
        if best is not None and math.isfinite(best["value"]) and not (
                value > best["value"] if mode == "max" else value < best["value"]):
            return
        self.best = {"metric": key, "mode": mode, "value": value, "step": self.step}
        export = self.exported()
        if not self.dist.main:
            return

        def write(folder: Path) -> None:
            self.task.on_checkpoint(folder, export)
            write_json(folder / "config.json", {**self.folder_config(metrics),
                                                "selected": {"split": "val", **self.best}})

        with disk_errors(self.out, self.step, getattr(self, "bar", None)):
            publish_folder(self.out / "best", write)

    def keep_snapshot(self) -> None:
        """With keep_every=E (epochs), a whole exported checkpoint folder of the model as it is
        at every E epochs, CKPT/snapshots/epochN/ (with a constant lr, the model a run of N
        epochs would end with): a study scores each, for a curve no cheap evaluation gives
        (a generator's samples). A collective."""
        every = self.keep_steps
        if not every or self.step % every or self.step == self.total:
            return
        export = self.exported()
        if not self.dist.main:
            return
        epoch = f"{self.step / self.steps_per_epoch:g}"

        def write(folder: Path) -> None:
            self.task.on_checkpoint(folder, export)
            write_json(folder / "config.json", self.folder_config(None))

        with disk_errors(self.out, self.step, getattr(self, "bar", None)):
            publish_folder(self.out / "snapshots" / f"epoch{epoch}", write)

    def evaluate(self) -> dict:
        metrics = self.task.evaluate(self.exported(), self.recipe.eval_batch_size)
        metrics = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                   **metrics, "time": round(time.time() - self.t_start, 1)}
        if self.dist.main:
            bar = getattr(self, "bar", None)
            with disk_errors(self.out, self.step, bar), open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        self.model.train()
        return metrics

    def fit_to_budget(self) -> None:
        """At the end of the budget's calibration: time an evaluation, then fit the schedule."""
        recipe, budget, dist = self.recipe, self.budget, self.dist
        step_s = budget.step_s()
        t_eval = time.time()
        self.metrics = self.evaluate()
        step_s, eval_s = (v / dist.world for v in dist.sum([step_s, time.time() - t_eval]))
        total = self.step + budget.steps_left(step_s, eval_s, self.eval_every)
        if recipe.max_steps > 0:
            total = min(total, recipe.max_steps)
        recipe.epochs, recipe.budget_minutes = total / self.steps_per_epoch, 0.0
        self.config["recipe"] = recipe.to_dict()
        self.config["budget"] = {"minutes": budget.seconds / 60, "step_s": round(step_s, 5),
                                 "eval_s": round(eval_s, 3), "steps": total,
                                 "epochs": round(recipe.epochs, 3)}
        if dist.main:
            self.bar.write(json.dumps(self.metrics))
            self.bar.write(f"budget {budget.seconds / 60:g} min: {total} steps "
                           f"({recipe.epochs:.2f} epochs) at {step_s * 1e3:.1f} ms a step, "
                           f"{eval_s:.1f} s an evaluation")
        self.total = self.bar.total = total
        self.bar.refresh()
        self.keep_best(self.metrics)
        self.checkpoint(self.metrics)
        self.budget = None

    def batches_from(self, step: int):
        """The batches of this process from `step` to the end of its epoch (or the run)."""
        recipe, dist, spe = self.recipe, self.dist, self.steps_per_epoch
        epoch, b = divmod(step, spe)
        order = epoch_order(len(self.task.train_set), recipe.seed, epoch)
        lists = [order[i * recipe.batch_size + dist.rank * self.b_local:
                       i * recipe.batch_size + (dist.rank + 1) * self.b_local].tolist()
                 for i in range(b, min(spe, b + (self.total - step)))]
        seeds = [recipe.seed * 1_000_003 + epoch * spe + i for i in range(b, b + len(lists))]
        return self.task.batches(lists, seeds)

    def train_step(self, batch) -> tuple[torch.Tensor, float]:
        """One optimizer step on one batch -> (loss, learning rate)."""
        recipe, opt = self.recipe, self.opt
        lr = lr_at(self.step, recipe, self.steps_per_epoch)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with autocast(recipe, self.dist.device):
            loss = self.task.loss(self.ddp, batch, recipe.seed * 1_000_003 + self.step)
        if not torch.isfinite(loss):     # stop before the step: nothing non-finite is saved
            self.bar.close()             # its line ends, so the error is a line of its own
            raise UserError(f"loss is {loss.item()} at step {self.step}; stopped, the last good "
                            f"checkpoint in {self.out} is kept (lower lr= or check the data)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), recipe.grad_clip)
        opt.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.step += 1
        return loss, lr

    def after_step(self) -> bool:
        """Evaluate and checkpoint when due; True when the batches must be rebuilt (the budget
        has just fixed the schedule's length)."""
        if self.budget is not None:
            self.budget.lap(self.step)
        if self.budget is not None and self.step == self.budget.end:
            self.fit_to_budget()
            self.last_ckpt = time.time()
            return True
        paused = time.time()
        self.keep_snapshot()
        if self.step % self.eval_every == 0 or self.step == self.total:
            self.metrics = self.evaluate()
            if self.dist.main:
                self.bar.write(json.dumps(self.metrics))
            self.keep_best(self.metrics)
            self.checkpoint(self.metrics)
            self.last_ckpt = time.time()
        elif self.dist.any(time.time() - self.last_ckpt > self.recipe.ckpt_minutes * 60):
            self.checkpoint(None)
            self.last_ckpt = time.time()
        if self.budget is not None:              # the calibration times training steps alone
            self.budget.pause(time.time() - paused)
        return False

    # --- the loop -------------------------------------------------------------------------------
    def loop(self) -> dict:
        """Train to the schedule's end; returns the last evaluation's metrics."""
        recipe, dist = self.recipe, self.dist
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = self.last_ckpt = time.time()
        self.bar = tqdm(total=self.total, initial=self.step, disable=not dist.main,
                        dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30,
                        desc=recipe.name or recipe.task)
        self.model.train()
        batches, seen, t_seen = None, 0, time.time()
        while self.step < self.total:
            if batches is None or self.step % self.steps_per_epoch == 0:
                batches = self.batches_from(self.step)
            loss, lr = self.train_step(next(batches))
            seen += recipe.batch_size
            self.bar.update(1)
            if self.step % 10 == 0 or self.step == self.total:
                now = time.time()
                self.bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}",
                                     img_s=f"{seen / max(now - t_seen, 1e-9):.0f}", refresh=False)
                seen, t_seen = 0, now
            if self.after_step():
                batches = None        # rebuilt for the new length from here
        self.bar.close()
        dist.barrier()
        distributed.teardown()
        return self.metrics


def train(recipe: Recipe, out: Path, resume: bool = False, overrides: list[str] = ()) -> dict:
    """Run (or continue) a recipe into the checkpoint folder `out`; returns the last metrics."""
    return Run.start(recipe, Path(out), resume, overrides).loop()


def run_cli(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    metrics = train(recipe, out, resume=args.resume, overrides=args.overrides)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"checkpoint": str(out), **metrics}))
    return 0
