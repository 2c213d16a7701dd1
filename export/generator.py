"""A generator's diffusers pipeline folder -> the model files of its TorchServe archive.

Sampling needs the DiT and the decoding half of the VQGAN only, so the archive holds:

    transformer.safetensors     the PixelDiT's weights (float32)
    vq_decoder.safetensors      codebook (quantize.*), post_quant_conv.* and decoder.*; never the
                                encoder or quant_conv, which only encode images
    config.json                 {"task": "generate", "labels", "transformer": PixelDiT config,
                                 "vq_decoder": VQModel config, "schedule": the scheduler config}
    index_to_name.json          the class names

The REST request picks the sampler; its preset is built over the saved noise schedule.
"""
from __future__ import annotations

import json
from pathlib import Path

from export.common import ExportError, write_index_to_name
from pixtok.checkpoint import save_weights, write_json
from pixtok.tasks import TASKS

DECODER_PREFIXES = ("quantize.", "post_quant_conv.", "decoder.")
PARTS = ("transformer", "vae", "scheduler")


def is_pipeline_folder(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read it as JSON ({e})") from None


def read_pipeline(ckpt: Path) -> dict:
    """Load and check a PixelDiTPipeline folder -> {"config", "transformer", "vq_decoder"}, the
    last two state dicts. Weights must be safetensors."""
    from diffusers import VQModel

    from pixtok.models.dit import PixelDiT

    index = read_json(ckpt / "model_index.json")
    missing = [p for p in PARTS if not (ckpt / p).is_dir()]
    if missing:
        raise ExportError(f"{ckpt}: a generator pipeline folder needs {', '.join(PARTS)}/; "
                          f"missing {', '.join(missing)}/")
    try:
        # low_cpu_mem_usage=False: the default wants accelerate and warns without it
        transformer = PixelDiT.from_pretrained(ckpt / "transformer", use_safetensors=True,
                                               low_cpu_mem_usage=False)
        vae = VQModel.from_pretrained(ckpt / "vae", use_safetensors=True,
                                      low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ExportError(f"{ckpt}: cannot load the pipeline's transformer and vae from "
                          f"safetensors ({e})") from None
    n = transformer.config.num_classes
    labels = index.get("labels") or [str(i) for i in range(n)]
    if len(labels) != n or not all(isinstance(x, str) for x in labels):
        raise ExportError(f"{ckpt}/model_index.json: 'labels' must be {n} class names, got "
                          f"{labels!r}")
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ExportError(f"{ckpt}: the DiT takes {transformer.config.in_channels} latent "
                          f"channels but the VQGAN makes {vae.config.latent_channels}")
    decoder = {k: v.float() for k, v in vae.state_dict().items()
               if k.startswith(DECODER_PREFIXES)}
    config = {"format": "pixtok-generator-archive/1", "task": TASKS["dit"].served_as,
              "labels": labels,
              "transformer": read_json(ckpt / "transformer" / "config.json"),
              "vq_decoder": read_json(ckpt / "vae" / "config.json"),
              "schedule": read_json(ckpt / "scheduler" / "scheduler_config.json")}
    return {"config": config, "vq_decoder": decoder,
            "transformer": {k: v.float() for k, v in transformer.state_dict().items()}}


def stage_generator(pipeline: dict, files: Path) -> None:
    """The generator's config, weights and labels into files/ (the archive's root)."""
    write_json(files / "config.json", pipeline["config"])
    save_weights(files / "transformer.safetensors", pipeline["transformer"])
    save_weights(files / "vq_decoder.safetensors", pipeline["vq_decoder"])
    write_index_to_name(pipeline["config"]["labels"], files)
