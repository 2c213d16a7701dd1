"""The generator's inference core: a JSON request -> class-conditional samples as PNGs. No
TorchServe imports.

A DiT/p denoises latents with classifier-free guidance, a diffusers scheduler steps them, and the
decoding half of the VQGAN turns them into pixels. It computes what PixelDiTPipeline computes for
the same request and seed (a test compares the bytes) but never holds the VQGAN's encoder. The
DiT, the sampler presets (pixtok/pipeline.py) and the guidance (pixtok/pipeline_pixel_dit.py)
are the pipeline's own.
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pixtok.models.dit import PixelDiT
from pixtok.pipeline import make_scheduler
from pixtok.pipeline_pixel_dit import SamplingCancelled, guided_forward, report_step

from .validate import MAX_IMAGES, MAX_STEPS, RequestError, parse_generate_request

LEARNED_VARIANCE = ("learned", "learned_range")


class VQDecoder(nn.Module):
    """The decoding half of a diffusers VQModel, with its parameter names: latents (N, D, h, w)
    -> images (N, C, H, W) in [-1, 1]. It quantises first, as LDM's decode does."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder, VectorQuantizer

        latent = config["latent_channels"]
        dim = config.get("vq_embed_dim") or latent
        self.quantize = VectorQuantizer(config["num_vq_embeddings"], dim, beta=0.25, remap=None,
                                        sane_index_shape=False)
        self.post_quant_conv = nn.Conv2d(dim, latent, 1)
        self.spatial_norm = config.get("norm_type", "group") == "spatial"
        self.decoder = Decoder(
            in_channels=latent, out_channels=config["out_channels"],
            up_block_types=config["up_block_types"],
            block_out_channels=config["block_out_channels"],
            layers_per_block=config["layers_per_block"], act_fn=config.get("act_fn", "silu"),
            norm_num_groups=config["norm_num_groups"], norm_type=config.get("norm_type", "group"),
            mid_block_add_attention=config.get("mid_block_add_attention", True))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        quant, _, _ = self.quantize(z)                                  # nearest codes
        return self.decoder(self.post_quant_conv(quant), quant if self.spatial_norm else None)


class GuidedDiT:
    """The DiT with classifier-free guidance on eps (pixtok/pipeline_pixel_dit.py's
    guided_forward, the pipeline's own), bf16 autocast on CUDA, float32 for the scheduler."""

    name = "torch"

    def __init__(self, transformer: nn.Module, device: torch.device):
        self.transformer = transformer.to(device).eval()
        self.device = device
        self.null_class = transformer.config.num_classes

    def __call__(self, latents, t, class_ids, guidance: float) -> torch.Tensor:
        """(N, C or 2C, h, w) in float32; the transformer runs in bf16 autocast on CUDA."""
        def forward(x, steps, y):
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.device.type == "cuda"):
                return self.transformer(x, steps, y).float()

        return guided_forward(forward, latents, t, class_ids, guidance, self.null_class)


def png_base64(pixels: np.ndarray) -> str:
    """uint8 (H, W, C) with C 1 or 3 -> base64 of a PNG (L or RGB)."""
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ImageGenerator:
    """JSON {"label", "seed", "steps", "sampler", "guidance", "num_images"} -> {"images", ...}."""

    def __init__(self, transformer: nn.Module, decoder: VQDecoder, config: dict,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.backend = GuidedDiT(transformer, self.device)
        self.decoder = decoder.to(self.device).eval()
        self.labels = list(config["labels"])
        self.schedule = config["schedule"]
        self.scaling_factor = config["vq_decoder"]["scaling_factor"]
        cfg = transformer.config
        size = cfg.sample_size
        self.latent_shape = (cfg.in_channels, *((size, size) if isinstance(size, int) else size))
        self.learn_sigma = cfg.learn_sigma
        self.max_steps = min(MAX_STEPS, self.schedule.get("num_train_timesteps", MAX_STEPS))
        self.should_stop: Callable[[], bool] = lambda: False    # the handler's drain sets it

    def preprocess(self, body, content_type: str | None = None) -> dict:
        """One request body -> a complete, checked request, or a RequestError."""
        return parse_generate_request(body, self.labels, self.max_steps, MAX_IMAGES)

    def predict(self, requests: list[dict], progress: Callable | None = None) -> list:
        """Requests batched by TorchServe are sampled one by one, each from its own seed.

        progress(j, step, total), if given, hears of each sampler step of requests[j] that asked
        for a stream ("stream": true); it may return False to cancel that request (its client
        has gone), whose result is then a RequestError of type "cancelled"; the others of the
        batch go on."""
        results = []
        for j, request in enumerate(requests):
            wants = progress is not None and request.get("stream")
            try:
                results.append(self.generate(request, partial(progress, j) if wants else None))
            except SamplingCancelled as e:
                results.append(RequestError(400, "cancelled", f"the client cancelled the "
                                            f"request after {e.step} of {e.total} steps"))
        return results

    def generate(self, request: dict, callback: Callable | None = None) -> dict:
        """One request -> its answer; callback(step, total) as in sample()."""
        images = self.sample(request["index"], request["num_images"], request["seed"],
                             request["steps"], request["sampler"], request["guidance"],
                             callback)
        return {"images": [png_base64(im) for im in images], "label": request["label"],
                "seed": request["seed"], "steps": request["steps"],
                "sampler": request["sampler"], "guidance": request["guidance"]}

    @torch.inference_mode()
    def sample(self, index: int, n: int, seed: int, steps: int, sampler: str,
               guidance: float, callback: Callable | None = None) -> np.ndarray:
        """n samples of class index -> uint8 (n, H, W, C); the same arguments give the same
        pixels on the same device. callback(step, total) is called after each sampler step
        (step 1..total); returning False stops with SamplingCancelled."""
        from diffusers.utils.torch_utils import randn_tensor

        # a CPU generator: the starting noise is the same on every device, as in the pipeline
        generator = torch.Generator().manual_seed(seed)
        scheduler = make_scheduler(sampler, self.schedule, self.learn_sigma)
        c = self.latent_shape[0]
        latents = randn_tensor((n, *self.latent_shape), generator=generator, device=self.device,
                               dtype=torch.float32) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=self.device)
        # only DDPM's learned-range preset takes the model's variance channels
        learned = scheduler.config.get("variance_type") in LEARNED_VARIANCE and self.learn_sigma
        keep = 2 * c if learned else c
        ids = torch.full((n,), index, dtype=torch.long, device=self.device)
        for i, t in enumerate(scheduler.timesteps):
            if self.should_stop():
                raise RequestError(503, "shutting_down", f"the server is stopping: the request "
                                   f"was cut off after {i} of {steps} steps; send it again once "
                                   "the server is back")
            model_in = scheduler.scale_model_input(latents, t)
            out = self.backend(model_in, t, ids, guidance)[:, :keep]
            latents = scheduler.step(out, t, latents, generator=generator).prev_sample
            report_step(callback, i + 1, steps)
        images = self.decoder(latents / self.scaling_factor)          # (n, C, H, W) in [-1, 1]
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (images * 255).round().astype(np.uint8)                  # as diffusers' numpy_to_pil


def load_generator(model_dir, device: torch.device | str = "cpu") -> ImageGenerator:
    """An archive's folder (config.json, transformer.safetensors, vq_decoder.safetensors) ->
    ImageGenerator on device."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    transformer = PixelDiT.from_config(config["transformer"])
    transformer.load_state_dict(load_file(model_dir / "transformer.safetensors"))
    decoder = VQDecoder(config["vq_decoder"])
    decoder.load_state_dict(load_file(model_dir / "vq_decoder.safetensors"))
    return ImageGenerator(transformer, decoder, config, device)


def load(model_dir, device: torch.device | str = "cpu") -> ImageGenerator:
    """The generate task's runner (pixtok/tasks.py): its ImageGenerator on device."""
    return load_generator(model_dir, device)
