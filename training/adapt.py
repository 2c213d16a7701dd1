"""init_from= for ViT tasks (classify, depth): start from any checkpoint of the same family and
adapt what differs, one line on stderr for each thing adapted.

The source is a checkpoint folder, a shipped model's name (model_store/NAME) or an MAE
checkpoint; classifiers, depth models and MAEs all hold a ViT/p encoder, and any of them can
start any other. What adapts:
- the label set: a classifier's head is copied only for the same labels; otherwise it keeps its
  fresh initialisation (reset, not copied), as timm's `num_classes=K` does;
- the input size: a learned position table is resampled to the new grid (2D bicubic; [cls] is a
  token of its own and is kept); a sin-cos table is rebuilt for the new grid;
- the channel count: a linear pixel embedding's columns are summed (3 -> 1) or repeated and
  divided by 3 (1 -> 3). (The other choice, converting the data, is `channels=` on the data.)
What cannot adapt — another width, depth, heads, MLP ratio, patch size, embedding or position
embedding kind — is a one-line error naming each difference. ([cls] pooling against mean
pooling is no difference of weights: a mean-pooled model drops the [cls] token, a [cls] model
without one in the checkpoint starts its own.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pixtok.checkpoint import CheckpointError, load_model
from pixtok.errors import UserError
from pixtok.models.mae import MAEConfig
from pixtok.models.vit import ViT, ViTConfig, adapt_embed_channels, resample_pos_embed
from training.checkpoint import check_fit, read_init_config

STORE = Path(__file__).resolve().parent.parent / "model_store"
# ViTConfig fields that decide what every encoder weight means: they must agree
FIXED = ("patch_size", "width", "depth", "heads", "mlp_ratio", "embed", "dict_dim", "pos_embed")


def resolve(path: str) -> Path:
    """init_from's folder: the path as given, or a shipped model's name (model_store/NAME)."""
    given = Path(path).expanduser()
    shipped = STORE / path
    if not (given / "config.json").is_file() and "/" not in path and \
            (shipped / "config.json").is_file():
        return shipped
    if not (given / "config.json").is_file():
        names = sorted(p.parent.name for p in STORE.glob("*/config.json"))
        raise UserError(f"init_from={path}: not a checkpoint folder (no config.json) nor a "
                        f"shipped model ({', '.join(names)})")
    return given


def source_config(path: str, folder: Path) -> tuple[dict, ViTConfig]:
    """(config.json, its encoder's ViTConfig) of a checkpoint folder, read before any weight."""
    config = read_init_config(folder)
    model = config.get("model") or {}
    arch, args = model.get("arch"), dict(model.get("args") or {})
    if arch not in ("vit", "vit-depth", "mae"):
        raise UserError(f"init_from={path}: a {config.get('task')!r} checkpoint ({arch!r}) has no "
                        f"ViT encoder; give a classifier, depth model or MAE checkpoint")
    args.pop("head", None)
    try:
        cfg = MAEConfig(**args).encoder if arch == "mae" else ViTConfig(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"init_from={path}: {folder / 'config.json'} describes no model pixtok "
                        f"can build ({e})") from None
    return config, cfg


def source_encoder(path: str, folder: Path):
    """(the ViT encoder, the depth head or None) of a checkpoint folder, weights loaded."""
    try:
        model, config = load_model(folder)
    except CheckpointError as e:
        raise UserError(f"init_from={path}: {e}") from None
    arch = config["model"]["arch"]
    encoder = model if arch == "vit" else model.encoder
    return encoder, model.head if arch == "vit-depth" else None


def refuse_other_models(path: str, config: dict, theirs: ViTConfig, ours: ViTConfig) -> None:
    differ = [f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}" for k in FIXED
              if getattr(theirs, k) != getattr(ours, k)]
    if theirs.in_channels != ours.in_channels and (ours.embed != "linear" or
                                                   1 not in (theirs.in_channels, ours.in_channels)):
        differ.append(f"in_channels {theirs.in_channels} vs {ours.in_channels} (only a linear "
                      f"embedding adapts, 1 <-> 3; or set channels= on the data)")
    if differ:
        raise UserError(f"init_from={path}: this {config.get('task')} checkpoint holds another "
                        f"model ({'; '.join(differ)}); only the classes, image size and channels "
                        f"adapt")


def adapt_state(theirs: ViTConfig, ours: ViTConfig, state: dict) -> list[str]:
    """Adapt an encoder's state dict (ViT names) from `theirs` to `ours` in place; the lines say
    what was done."""
    lines = []
    if theirs.in_channels != ours.in_channels:
        w = state["embed.proj.weight"]
        state["embed.proj.weight"] = adapt_embed_channels(w, ours.patch_size, theirs.in_channels,
                                                          ours.in_channels)
        how = "summed" if ours.in_channels == 1 else "repeated and divided by 3"
        lines.append(f"pixel embedding: {theirs.in_channels} -> {ours.in_channels} channels "
                     f"({how})")
    if theirs.grid != ours.grid:
        size = f"{'x'.join(map(str, theirs.image_size))} -> {'x'.join(map(str, ours.image_size))}"
        if ours.pos_embed == "learned":
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], theirs.grid, ours.grid)
            lines.append(f"position embedding: learned {theirs.grid[0]}x{theirs.grid[1]} grid "
                         f"resampled to {ours.grid[0]}x{ours.grid[1]} (bicubic; {size} pixels, "
                         f"patch {ours.patch_size})")
        else:
            lines.append(f"position embedding: {ours.pos_embed}, rebuilt for {size} pixels")
    if "cls_token" in state and vit_has_no_cls(ours):
        del state["cls_token"]
        lines.append("[cls] token: dropped (this model pools the mean of its tokens)")
    elif "cls_token" not in state and not vit_has_no_cls(ours):
        lines.append("[cls] token: new (the checkpoint pools the mean of its tokens)")
    if theirs.mean != ours.mean or theirs.std != ours.std:
        lines.append(f"normalisation: this data's mean {list(ours.mean)} std {list(ours.std)} "
                     f"(the checkpoint's: {list(theirs.mean)}, {list(theirs.std)})")
    return lines


def vit_has_no_cls(cfg: ViTConfig) -> bool:
    return cfg.pool != "cls"


def head_lines(config: dict, labels: list[str] | None, state: dict, vit: ViT) -> list[str]:
    """Keep a classifier's head for the same labels, else drop it from `state` (the model's own
    fresh head stays)."""
    head = {k for k in state if k.startswith("head.")}
    if not vit.cfg.num_classes:
        for k in head:
            del state[k]
        return []
    theirs = config.get("labels") if config.get("task") == "classify" else None
    if head and theirs == labels:
        return [f"head: kept ({len(labels)} classes, the same labels)"]
    for k in head:
        del state[k]
    why = (f"the checkpoint's {len(theirs)} classes are others" if theirs
           else f"a {config.get('task')} checkpoint has no classifier head")
    return [f"head: new for {vit.cfg.num_classes} classes (reset, not copied: {why})"]


def init_encoder(path: str, vit: ViT, labels: list[str] | None = None, say=None):
    """Load and adapt the encoder of checkpoint `path` into `vit` (in place; its head too when
    the labels are the same). Returns the source's depth head (or None) for a depth model.
    say(line) is called once per thing adapted (default: stderr)."""
    folder = resolve(path)
    config, theirs = source_config(path, folder)
    ours = vit.cfg
    refuse_other_models(path, config, theirs, ours)
    encoder, depth_head = source_encoder(path, folder)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    lines = adapt_state(theirs, ours, state) + head_lines(config, labels, state, vit)
    result = vit.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.") and k != "cls_token"]
    check_fit(path, "encoder weights", missing, result.unexpected_keys)
    name = config.get("model", {}).get("name") or config.get("model", {}).get("arch")
    lines.insert(0, f"encoder of {folder} ({config.get('task')} {name}, {theirs.depth} blocks "
                    f"of width {theirs.width}) loaded")
    for line in lines:
        (say or tell)(line)
    return depth_head


def tell(line: str) -> None:
    print(f"init_from: {line}", file=sys.stderr, flush=True)


def silent(line: str) -> None:
    """What a process other than the first says: nothing (the first says it once)."""


def init_depth_head(path: str, model, source_head, say=None) -> None:
    """A depth model's head from a depth checkpoint's (per token: it fits any grid), when it has
    the same shape; else the model keeps its fresh head."""
    ours = model.head.state_dict()
    if source_head is not None and all(v.shape == ours[k].shape
                                       for k, v in source_head.state_dict().items()):
        model.head.load_state_dict(source_head.state_dict())
        (say or tell)("depth head: kept")
    else:
        (say or tell)("depth head: new (reset: the checkpoint has no depth head of this shape)")


def freeze_encoder(model: torch.nn.Module, head_prefix: str = "head.") -> int:
    """freeze=encoder (a linear probe): every weight but the head's stops learning; returns how
    many weights still learn."""
    learning = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head_prefix))
        learning += p.numel() if p.requires_grad else 0
    return learning


# --- generators: a DiT from another DiT -----------------------------------------------------------
# PixelDiT config keys that decide what every transformer weight means: they must agree
DIT_FIXED = ("patch_size", "width", "depth", "heads", "mlp_ratio", "in_channels", "learn_sigma")


def init_dit(path: str, model, labels: list[str], vqgan_hash: str | None, say=None) -> None:
    """A DiT run from another DiT's transformer (a pipeline folder or a shipped generator's
    name), adapted to this run's classes (a new label table, the null class's row kept for
    classifier-free guidance) and latent grid (a learned position table resampled; a sin-cos one
    rebuilt); another width, depth, patch size or latent channel count is a one-line refusal."""
    from safetensors.torch import load_file

    say = say or tell
    folder = resolve(path)
    config = read_init_config(folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if config.get("task") != "dit" or not weights.is_file():
        raise UserError(f"init_from={path}: a {config.get('task')!r} checkpoint is no generator; "
                        "a DiT starts from a DiT pipeline folder (or a shipped generator's name)")
    import json
    theirs = json.loads((weights.parent / "config.json").read_text())   # every key, defaults too
    ours = dict(model.config)
    differ = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in DIT_FIXED
              if theirs.get(k) != ours.get(k)]
    if theirs.get("pos_embed", "learned") != ours["pos_embed"]:
        differ.append(f"pos_embed {theirs.get('pos_embed')} vs {ours['pos_embed']}")
    if differ:
        raise UserError(f"init_from={path}: this generator holds another model "
                        f"({'; '.join(differ)}); only the classes and the latent grid adapt")
    state = load_file(weights)
    mine = model.state_dict()
    size, p = theirs["sample_size"], theirs["patch_size"]
    h, w = (size, size) if isinstance(size, int) else size
    lines = dit_adapt(state, mine, (h // p, w // p), model.grid,
                      list(config.get("labels") or []), labels, ours["pos_embed"] == "sincos")
    missing = model.load_state_dict(state, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise UserError(f"init_from={path}: its transformer's weights do not fit "
                        f"({missing.missing_keys[:3] + missing.unexpected_keys[:3]})")
    source_vq = config.get("vqgan_sha256")
    if vqgan_hash and source_vq and source_vq != vqgan_hash:
        lines.append(f"latents: trained over another VQGAN ({source_vq[:12]}...): its weights "
                     "start the run, but they learned other latents")
    for line in lines + [f"transformer of {folder} loaded"]:
        say(line)


def dit_adapt(state: dict, mine: dict, their_grid: tuple[int, int], grid: tuple[int, int],
              their_labels: list[str], labels: list[str], sincos: bool = False) -> list[str]:
    """Adapt a PixelDiT state dict (whose latent grid is their_grid) in place to a model whose
    state is `mine` and grid `grid`; the lines say what was done."""
    lines = []
    table = "y_embedder.table.weight"
    if their_labels != labels or state[table].shape != mine[table].shape:
        fresh = mine[table].clone()
        fresh[-1] = state[table][-1]                 # the null class: unconditional sampling
        state[table] = fresh
        lines.append(f"labels: {len(labels)} classes {labels[:4]}{'...' if len(labels) > 4 else ''}"
                     f" (the checkpoint's: {len(their_labels)}): a new label table (reset), the "
                     "null class kept")
    key = "position_embedding"
    if tuple(their_grid) != tuple(grid):
        state[key] = mine[key] if sincos else resample_pos_embed(state[key], their_grid, grid)
        lines.append(f"latent grid: {their_grid[0]}x{their_grid[1]} -> {grid[0]}x{grid[1]}: "
                     f"position table {'rebuilt (sin-cos)' if sincos else 'resampled'}")
    return lines
