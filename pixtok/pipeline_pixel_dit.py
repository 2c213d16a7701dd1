"""PixelDiTPipeline: class labels -> images, a diffusers DiffusionPipeline over a PixelDiT
(transformer/pixel_dit.py), a VQGAN (diffusers.VQModel) and any diffusers scheduler. Unlike
diffusers' DiTPipeline, the null class is the model's num_classes.

Self-contained (torch and diffusers only): a generator's pipeline folder carries this file at its
root and names it in model_index.json, so that stock diffusers loads the folder without pixtok:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(["Sneaker"], num_inference_steps=20,
                  generator=torch.Generator().manual_seed(0)).images

pixtok itself uses it through pixtok.pipeline, which adds the sampler presets, its own error type
and the folder writer.
"""
from __future__ import annotations

import numbers

import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    ModelMixin,
    SchedulerMixin,
    VQModel,
)
from diffusers.utils.torch_utils import randn_tensor


class SamplingCancelled(Exception):
    """A sampler's step callback asked it to stop (it returned False): no image was made.
    .step and .total say how far it got."""

    def __init__(self, step: int, total: int):
        super().__init__(f"sampling was cancelled after {step} of {total} steps")
        self.step, self.total = step, total


def report_step(callback, step: int, total: int) -> None:
    """Tell a step callback (callable(step, total) or None) that `step` of `total` is done;
    raise SamplingCancelled when it returns False (None or True go on)."""
    if callback is not None and callback(step, total) is False:
        raise SamplingCancelled(step, total)


def guided_forward(model, latents, t, class_ids, scale: float, null_class: int) -> torch.Tensor:
    """model(x, t, y)'s output (N, C or 2C, h, w) with classifier-free guidance on eps, the one
    place it is computed (the serving core calls it too): the conditional and unconditional
    (class `null_class`) halves go through one forward pass as one batch of 2N, eps is
    uncond + scale * (cond - uncond), and the variance channels come from the conditional half.
    At scale 1 that is the conditional output alone (the unconditional half would weigh zero)."""
    n, c = latents.shape[:2]
    if scale == 1:
        return model(latents, torch.as_tensor(t, device=latents.device).reshape(-1).expand(n),
                     class_ids)
    x = torch.cat([latents, latents])                      # (2N, C, h, w)
    steps = torch.as_tensor(t, device=x.device).reshape(-1).expand(2 * n)
    cond, uncond = model(x, steps, torch.cat([class_ids, torch.full_like(class_ids, null_class)]
                                             )).chunk(2)
    eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([eps, cond[:, c:]], dim=1)


class PixelDiTPipeline(DiffusionPipeline):
    """Class labels -> images: DiT/p denoises VQGAN latents with classifier-free guidance."""

    model_cpu_offload_seq = "transformer->vae"
    # what a bad argument (class, step count, output type) raises; pixtok's subclass: UserError
    input_error: type[Exception] = ValueError

    def __init__(self, transformer: ModelMixin, vae: VQModel, scheduler: SchedulerMixin,
                 labels: list[str] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if labels is not None and len(labels) != transformer.config.num_classes:
            raise ValueError(f"{len(labels)} labels for a model with "
                             f"{transformer.config.num_classes} classes")
        # a plain list in model_index.json: from_pretrained hands it back to __init__
        self.register_to_config(labels=list(labels) if labels is not None else None)

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
            elif isinstance(label, numbers.Integral) and not isinstance(label, bool):
                ids.append(int(label))
            else:
                raise self.input_error(f"unknown class {label!r}; expected a name in {names} "
                                f"or an index 0..{n - 1}")
            if not 0 <= ids[-1] < n:
                raise self.input_error(f"class index {ids[-1]} out of range 0..{n - 1}")
        return torch.tensor(ids, dtype=torch.long, device=self._execution_device)

    def guided_prediction(self, latents, t, class_ids, guidance_scale: float) -> torch.Tensor:
        """The transformer's output with classifier-free guidance (guided_forward)."""
        return guided_forward(self.transformer, latents, t, class_ids, guidance_scale,
                              self.transformer.config.num_classes)

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
        it returns False sampling stops with SamplingCancelled."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise self.input_error(f"output_type must be pil, np, pt or latent, "
                                   f"not {output_type!r}")
        most = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= most:
            raise self.input_error(f"num_inference_steps must be in 1..{most}, "
                                   f"not {num_inference_steps}")
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
