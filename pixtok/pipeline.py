"""Class-conditional sampling: PixelDiTPipeline, a diffusers DiffusionPipeline over a PixelDiT, a
VQGAN (diffusers.VQModel) and any diffusers scheduler; plus the scheduler presets.

A generator checkpoint is this pipeline's folder (model_index.json, transformer/, vae/,
scheduler/); the class names live in model_index.json, so one offline from_pretrained call
restores everything. Unlike diffusers' DiTPipeline, the null class is the model's num_classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
    VQModel,
)
from diffusers.utils.torch_utils import randn_tensor

from pixtok.errors import UserError
from pixtok.models.dit import PixelDiT
from pixtok.sampling import SAMPLERS, report_step

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


class PixelDiTPipeline(DiffusionPipeline):
    """Class labels -> images: DiT/p denoises VQGAN latents with classifier-free guidance."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: PixelDiT, vae: VQModel, scheduler,
                 labels: list[str] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if labels is not None and len(labels) != transformer.config.num_classes:
            raise ValueError(f"{len(labels)} labels for a model with "
                             f"{transformer.config.num_classes} classes")
        # a plain list in model_index.json: from_pretrained hands it back to __init__
        self.register_to_config(labels=list(labels) if labels is not None else None)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load a pipeline folder offline. The transformer is loaded as PixelDiT whatever module
        model_index.json names, so folders saved before the model moved into the `pixtok` core
        (they name `training.models.dit`) load too."""
        if "transformer" not in kwargs and (Path(path) / "transformer").is_dir():
            kwargs["transformer"] = PixelDiT.from_pretrained(
                Path(path) / "transformer", torch_dtype=kwargs.get("torch_dtype"))
        return super().from_pretrained(path, **kwargs)

    @property
    def labels(self) -> list[str] | None:
        return self.config.labels

    def class_ids(self, class_labels) -> torch.Tensor:
        """Class names or indices (one or a list) -> (N,) indices, checked against the model."""
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        n = self.transformer.config.num_classes
        names = self.labels or []
        ids = []
        for label in class_labels:
            if isinstance(label, str) and label in names:
                ids.append(names.index(label))
            elif isinstance(label, str) and label.lstrip("-").isdigit():
                ids.append(int(label))
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                ids.append(int(label))
            else:
                raise UserError(f"unknown class {label!r}; expected a name in {names} "
                                f"or an index 0..{n - 1}")
            if not 0 <= ids[-1] < n:
                raise UserError(f"class index {ids[-1]} out of range 0..{n - 1}")
        return torch.tensor(ids, dtype=torch.long, device=self._execution_device)

    def guided_prediction(self, latents, t, class_ids, guidance_scale: float) -> torch.Tensor:
        """Model output (N, C or 2C, h, w) with classifier-free guidance on eps: the conditional
        and unconditional halves go through one forward pass as one batch of 2N; the variance
        channels come from the conditional half. At scale 1 that is the conditional output alone."""
        n, c = latents.shape[:2]
        if guidance_scale == 1:
            t = torch.as_tensor(t, device=latents.device).reshape(-1).expand(n)
            return self.transformer(latents, t, class_ids)
        null = torch.full_like(class_ids, self.transformer.config.num_classes)
        x = torch.cat([latents, latents])                      # (2N, C, h, w)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(2 * n)
        out = self.transformer(x, t, torch.cat([class_ids, null]))
        cond, uncond = out.chunk(2)
        eps = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)

    def passes_variance(self) -> bool:
        """Does the scheduler take the learned variance (model output with 2C channels)?"""
        return (self.transformer.config.learn_sigma and isinstance(self.scheduler, DDPMScheduler)
                and self.scheduler.config.variance_type in ("learned", "learned_range"))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] -> diffusion latents: pre-quantisation, scaled."""
        z = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latents
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images (N, C, H, W) in [0, 1]; the VQGAN quantises first (LDM)."""
        z = latents / self.vae.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype), force_not_quantize=False).sample
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, num_inference_steps: int = 50,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback=None):
        """Sample one image per class label (names or indices). output_type: 'pil' (list of PIL
        images), 'np' (N, H, W, C) floats, 'pt' (N, C, H, W) in [0, 1], 'latent'.

        callback(step, total), if given, is called after each sampler step (step 1..total); when
        it returns False sampling stops with pixtok.sampling.SamplingCancelled."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise UserError(f"output_type must be pil, np, pt or latent, not {output_type!r}")
        most = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= most:
            raise UserError(f"num_inference_steps must be in 1..{most}, not {num_inference_steps}")
        ids = self.class_ids(class_labels)
        cfg = self.transformer.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        c = cfg.in_channels
        latents = randn_tensor((len(ids), c, h, w), generator=generator,
                               device=self._execution_device, dtype=self.transformer.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        keep = 2 * c if self.passes_variance() else c
        total = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = self.scheduler.scale_model_input(latents, t)
            out = self.guided_prediction(model_in, t, ids, guidance_scale)[:, :keep]
            latents = self.scheduler.step(out, t, latents, generator=generator).prev_sample
            report_step(callback, i + 1, total)
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).float().cpu().numpy()   # (N, H, W, C)
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
