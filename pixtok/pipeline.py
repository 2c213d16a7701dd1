"""pixtok's side of class-conditional sampling: PixelDiTPipeline (pipeline_pixel_dit.py, with
pixtok's error type, loader and folder writer), the sampler presets and the pipeline folder.

A generator checkpoint is a diffusers pipeline folder that stock diffusers loads without pixtok
(`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`), laid out as diffusers
loads custom code:

    model_index.json            "_class_name": ["pipeline_pixel_dit", "PixelDiTPipeline"],
                                "transformer": ["pixel_dit", "PixelDiT"], the vae, the scheduler
                                and the class names ("labels")
    pipeline_pixel_dit.py       the pipeline (pixtok/pipeline_pixel_dit.py)
    transformer/                config.json, weights, pixel_dit.py and pixel_layers.py
                                (pixtok/models/)
    vae/, scheduler/            a diffusers VQModel and scheduler

The code files are copies of pixtok's own modules, which import torch and diffusers only, written
by every save_pretrained. pixtok never runs a folder's copy: PixelDiTPipeline.from_pretrained
builds the parts from its own classes, so folders from before this layout load too.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    VQModel,
)

from pixtok import pipeline_pixel_dit
from pixtok.checkpoint import atomic_write
from pixtok.errors import UserError
from pixtok.models import pixel_dit, pixel_layers
from pixtok.models.pixel_dit import PixelDiT
from pixtok.sampling import SAMPLERS

# the training schedule (diffusion.training_scheduler); make_scheduler copies these numbers
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                 "trained_betas", "prediction_type")
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                    "beta_schedule": "linear", "trained_betas": None,
                    "prediction_type": "epsilon"}


def make_scheduler(kind: str, train_config=None, learn_sigma: bool = True):
    """A sampler preset over the training noise schedule (a scheduler, its config, or None for
    DiT's): 'ddpm' (learned-range variance when the model learns sigma), 'ddim', 'dpm'
    (DPM-Solver++ 2M) or 'euler'."""
    config = getattr(train_config, "config", train_config) or {}
    base = {k: config.get(k, v) for k, v in DEFAULT_SCHEDULE.items()}
    if kind == "ddpm":
        variance = "learned_range" if learn_sigma else "fixed_small"
        return DDPMScheduler(**base, variance_type=variance, clip_sample=False,
                             timestep_spacing="trailing")
    if kind == "ddim":
        return DDIMScheduler(**base, clip_sample=False, timestep_spacing="trailing",
                             set_alpha_to_one=False)
    if kind == "dpm":
        # no variance_type: diffusers' DPM-Solver slices learned-variance outputs to 3 channels
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2)
    if kind == "euler":
        return EulerDiscreteScheduler(**base)
    raise UserError(f"unknown sampler {kind!r}; expected one of {', '.join(SAMPLERS)}")


def module_name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


# what a pipeline folder carries: {path in the folder: the module it copies}
CARRIED_CODE = {f"{module_name(pipeline_pixel_dit)}.py": pipeline_pixel_dit,
                f"transformer/{module_name(pixel_dit)}.py": pixel_dit,
                f"transformer/{module_name(pixel_layers)}.py": pixel_layers}


def write_pipeline_code(folder) -> None:
    """Make a saved pipeline folder loadable by stock diffusers: copy the pipeline's and the
    transformer's code into it and name them in model_index.json (each file by one rename)."""
    folder = Path(folder)
    for name, module in CARRIED_CODE.items():
        atomic_write(folder / name, lambda tmp, m=module: shutil.copyfile(m.__file__, tmp))
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [module_name(pipeline_pixel_dit), PixelDiTPipeline.__name__]
    index["transformer"] = [module_name(pixel_dit), PixelDiT.__name__]
    atomic_write(folder / "model_index.json", lambda tmp: Path(tmp).write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"))


def scheduler_class(entry) -> type[SchedulerMixin]:
    """model_index.json's ["diffusers", "<Scheduler>"] -> the diffusers scheduler class."""
    library, name = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None)
    cls = getattr(diffusers, name, None) if library == "diffusers" and name else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"model_index.json: scheduler {entry!r} is not a diffusers scheduler")
    return cls


class PixelDiTPipeline(pipeline_pixel_dit.PixelDiTPipeline):
    """The pipeline of pipeline_pixel_dit.py as pixtok uses it: a bad argument is a UserError,
    from_pretrained uses pixtok's own classes and save_pretrained writes the code a stock
    diffusers needs."""

    input_error = UserError

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load a pipeline folder offline with pixtok's classes, whatever code the folder carries
        or names (folders saved before the model moved into the `pixtok` core name
        `training.models.dit`). kwargs: torch_dtype, or transformer / vae / scheduler / labels to
        use instead of the folder's."""
        folder = Path(path)
        if not (folder / "model_index.json").is_file():
            raise OSError(f"{folder}: no model_index.json")
        index = json.loads((folder / "model_index.json").read_text())
        dtype = kwargs.pop("torch_dtype", None)
        parts = {"labels": kwargs.pop("labels", index.get("labels"))}
        for name, load in (
                ("transformer", lambda: PixelDiT.from_pretrained(folder / "transformer",
                                                                 torch_dtype=dtype)),
                ("vae", lambda: VQModel.from_pretrained(folder / "vae", torch_dtype=dtype)),
                ("scheduler", lambda: scheduler_class(index.get("scheduler")).from_pretrained(
                    folder / "scheduler"))):
            parts[name] = kwargs.pop(name) if name in kwargs else load()
        if kwargs:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(kwargs)}")
        pipe = cls(**parts)
        pipe.register_to_config(_name_or_path=str(path))
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' save_pretrained, then the pipeline's and the transformer's code, so that
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads the folder."""
        super().save_pretrained(save_directory, **kwargs)
        write_pipeline_code(save_directory)
