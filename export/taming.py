"""Convert taming-transformers / latent-diffusion VQGAN checkpoints into a diffusers VQModel.

A taming state dict has encoder.*, decoder.*, quant_conv.*, post_quant_conv.* and
quantize.embedding.weight; LDM's .ckpt files wrap it in {"state_dict": ...} next to loss.*
(discriminator, LPIPS) entries, which are dropped. The config (the YAML's model.params) gives
embed_dim, n_embed and ddconfig: ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
resolution, in_channels, out_ch.

How LDM's calls map onto the converted model (LDM runs diffusion on the latent *before*
quantisation, and quantises when decoding):
    LDM  h = model.encode(x)     -> vq.encode(x).latents     (the quant_conv output)
    LDM  x = model.decode(h)     -> vq.decode(h).sample      (force_not_quantize=False)
    LDM  model.quantize(h)       -> vq.quantize(h)           (z_q, loss, (_, _, indices))
Images are in [-1, 1] on both sides.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from diffusers import VQModel

from pixtok.errors import UserError
from pixtok.models.vqgan import vqmodel_kwargs

DDCONFIG_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                 "resolution", "in_channels", "out_ch")
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def taming_vqmodel_kwargs(ddconfig: dict, embed_dim: int, n_embed: int) -> dict:
    """taming's (ddconfig, embed_dim, n_embed) -> diffusers.VQModel keyword arguments."""
    missing = [k for k in DDCONFIG_KEYS if k not in ddconfig]
    if missing:
        raise UserError(f"taming ddconfig lacks {', '.join(missing)}")
    if ddconfig.get("double_z", False):
        raise UserError("ddconfig has double_z: true, which is a KL autoencoder, not a VQGAN")
    ch_mult = list(ddconfig["ch_mult"])
    attn = {int(r) for r in ddconfig["attn_resolutions"]}
    # taming puts attention on every level whose resolution is listed; level i runs at res / 2^i
    attn_levels = [i for i in range(len(ch_mult)) if ddconfig["resolution"] // 2 ** i in attn]
    return vqmodel_kwargs(in_channels=ddconfig["in_channels"], out_channels=ddconfig["out_ch"],
                          ch=ddconfig["ch"], ch_mult=ch_mult,
                          num_res_blocks=ddconfig["num_res_blocks"], attn_levels=attn_levels,
                          z_channels=ddconfig["z_channels"], embed_dim=embed_dim, n_embed=n_embed,
                          sample_size=ddconfig["resolution"])


def rename_key(key: str, num_levels: int) -> str | None:
    """A taming parameter name -> its VQModel name (None: not part of the autoencoder)."""
    if key.startswith("loss."):
        return None
    if key in ("quantize.embedding.weight",) or key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$", key)
    if m:
        part = "conv_norm_out" if m[2] == "norm_out" else m[2]
        return f"{m[1]}.{part}.{m[3]}"
    m = re.match(r"^(encoder|decoder)\.mid\.(block_[12]|attn_1)\.(\w+)\.(weight|bias)$", key)
    if m:
        if m[2] == "attn_1":
            return f"{m[1]}.mid_block.attentions.0.{_ATTN[m[3]]}.{m[4]}"
        return f"{m[1]}.mid_block.resnets.{int(m[2][-1]) - 1}.{_RESNET[m[3]]}.{m[4]}"
    m = re.match(r"^(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$",
                 key)
    if m:
        side, level = m[1].split(".")[0], int(m[2])
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        # taming's decoder.up[i] runs at level i; diffusers' up_blocks run from the bottom level
        index = level if side == "encoder" else num_levels - 1 - level
        name = _RESNET[m[5]] if m[3] == "block" else _ATTN[m[5]]
        kind = "resnets" if m[3] == "block" else "attentions"
        return f"{side}.{blocks}.{index}.{kind}.{m[4]}.{name}.{m[6]}"
    m = re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$", key)
    if m:
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    raise UserError(f"unexpected key {key!r} in the taming checkpoint")


def convert_taming_state_dict(sd: dict, ddconfig: dict, embed_dim: int, n_embed: int) -> VQModel:
    """A taming / LDM VQGAN state dict (loss.* entries allowed) -> a loaded diffusers VQModel."""
    vq = VQModel(**taming_vqmodel_kwargs(ddconfig, embed_dim, n_embed))
    num_levels = len(ddconfig["ch_mult"])
    converted = {}
    for key, value in sd.items():
        name = rename_key(key, num_levels)
        if name is None:
            continue
        if ".attentions." in name and name.endswith("weight") and value.ndim == 4:
            value = value[:, :, 0, 0]          # taming's 1x1 convolutions are diffusers' linears
        converted[name] = value
    try:
        missing, unexpected = vq.load_state_dict(converted, strict=False)
    except RuntimeError as e:            # shapes that disagree with the config
        raise UserError(f"taming checkpoint does not match its config: "
                        f"{str(e).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"taming checkpoint does not match its config: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")
    return vq.eval()


def read_taming_config(config) -> dict:
    """A taming/LDM YAML path or dict -> its model params (embed_dim, n_embed, ddconfig)."""
    if isinstance(config, (str, Path)):
        import yaml
        path = Path(config)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        config = yaml.safe_load(path.read_text())
    params = config.get("model", {}).get("params", config) if isinstance(config, dict) else None
    if not isinstance(params, dict) or not {"embed_dim", "n_embed", "ddconfig"} <= params.keys():
        raise UserError("taming config needs model.params with embed_dim, n_embed and ddconfig")
    return params


def load_taming_checkpoint(path, config, trust: bool = False) -> VQModel:
    """A taming-transformers / latent-diffusion VQGAN checkpoint (.ckpt/.pt/.pth or .safetensors)
    plus its config (YAML path or dict) -> a diffusers VQModel.

    Pickled checkpoints are read with torch.load(weights_only=True). Lightning checkpoints often
    hold other objects too; only for a file from a source you trust, trust=True reads it in full,
    which can run arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    params = read_taming_config(config)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        if trust:
            print(f"WARNING: loading {path} with full pickle (trust=True): this runs any code the "
                  f"file contains. Only do this for checkpoints from a source you trust.",
                  file=sys.stderr)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=not trust)
        except Exception as e:
            raise UserError(f"{path}: cannot be read as weights only ({str(e).splitlines()[0]}); "
                            f"if you trust its source, load it with trust=True") from None
    sd = sd.get("state_dict", sd)
    if any(k.startswith("first_stage_model.") for k in sd):    # a whole LDM: take its autoencoder
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items()
              if k.startswith("first_stage_model.")}
    return convert_taming_state_dict(sd, params["ddconfig"], params["embed_dim"],
                                     params["n_embed"])
