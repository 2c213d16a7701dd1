"""Latent cache: a data set encoded once by a VQGAN into safetensors shards, so diffusion training
never runs the encoder.

Every image is stored twice, as DiT does: the latent of the image and the latent of its mirror
image (so the flip augmentation costs nothing). The latents are the VQGAN's *pre-quantisation*
latents, unscaled (LDM's convention: diffusion runs there, and decoding quantises first).

A cache folder holds spec.json (what was encoded: the VQGAN's weights hash, the data, the split,
the padding), shard-00000.safetensors ... with "latents" (n, C, h, w) float32, "latents_flipped"
(n, C, h, w) and "labels" (n,) int64, and index.json, written last: the cache is complete when
index.json exists and its spec matches. Each shard is written atomically, so an interrupted build
continues where it stopped.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pixtok.checkpoint import atomic_write, write_json
from pixtok.errors import UserError
from training.loader import fetch_batches

FORMAT = "pixtok-latents/1"
SHARD_ITEMS = 16384
MEMORY_LIMIT = 4 * 2**30       # caches up to this many bytes are held in memory, larger ones read


def prepare_images(images: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the VQGAN's input: zero-padded by `pad`, in [-1, 1]."""
    x = images.float().div(127.5).sub(1)
    return F.pad(x, (pad,) * 4, value=-1.0) if pad else x


@torch.no_grad()
def encode(vq, images: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> pre-quantisation latents (N, C', h, w) float32."""
    device = next(vq.parameters()).device
    x = prepare_images(images.to(device), pad).to(vq.dtype)
    return vq.encode(x).latents.float()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shard_path(folder: Path, i: int) -> Path:
    return folder / f"shard-{i:05d}.safetensors"


def is_current(folder, spec: dict) -> bool:
    """Does `folder` hold a complete cache of exactly `spec`?"""
    index = read_json(Path(folder) / "index.json")
    return bool(index) and index.get("format") == FORMAT and index.get("spec") == spec


def build_cache(folder, vq, dataset, spec: dict, pad: int = 0, batch_size: int = 256,
                shard_items: int = SHARD_ITEMS, num_workers: int = 0, rank: int = 0,
                world: int = 1, barrier=lambda: None, log=print) -> None:
    """Encode `dataset` (items (uint8 (C, H, W), label)) into `folder`. With world > 1, every
    process encodes its share of the shards; call it on all of them (barrier syncs them)."""
    folder = Path(folder)
    if rank == 0:
        if read_json(folder / "spec.json") != spec:         # another cache: start afresh
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_json(folder / "spec.json", spec)
        (folder / "index.json").unlink(missing_ok=True)
    barrier()
    n = len(dataset)
    shards = [(i, min(i + shard_items, n)) for i in range(0, n, shard_items)]
    mine = [k for k in range(rank, len(shards), world) if not shard_path(folder, k).is_file()]
    if mine and rank == 0:
        log(f"encoding {n} images into the latent cache {folder} ...")
    bar = tqdm(total=sum(shards[k][1] - shards[k][0] for k in mine), unit="img",
               desc="encoding latents (and their mirrors)", disable=rank != 0 or not mine,
               dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
    for k in mine:
        start, stop = shards[k]
        lists = [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
        latents, flipped, labels = [], [], []
        for images, y in fetch_batches(dataset, lists, num_workers):
            latents.append(encode(vq, images, pad).cpu())
            flipped.append(encode(vq, images.flip(-1), pad).cpu())
            labels.append(torch.as_tensor(y, dtype=torch.int64))
            bar.update(len(y))
        tensors = {"latents": torch.cat(latents), "latents_flipped": torch.cat(flipped),
                   "labels": torch.cat(labels)}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(shard_path(folder, k), lambda tmp, t=tensors: save_file(t, tmp))
    bar.close()
    barrier()
    if rank == 0:
        first = load_file(shard_path(folder, 0))["latents"] if shards else torch.zeros(0, 0, 0, 0)
        write_json(folder / "index.json", {
            "format": FORMAT, "spec": spec, "count": n, "shape": list(first.shape[1:]),
            "classes": list(getattr(dataset, "classes", [])),
            "shards": [{"file": shard_path(folder, k).name, "count": stop - start}
                       for k, (start, stop) in enumerate(shards)]})
    barrier()


def ensure_cache(folder, vq, make_dataset, spec: dict, pad: int = 0, batch_size: int = 256,
                 num_workers: int = 0, dist=None, log=None) -> LatentCache:
    """The cache of `spec` in `folder`, built first (make_dataset() gives the data) unless it
    is already there. dist: training.distributed.Dist, so that DDP processes share the work."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    if not is_current(folder, spec):
        log = log or (lambda msg: print(msg, file=sys.stderr) if rank == 0 else None)
        build_cache(folder, vq, make_dataset(), spec, pad, batch_size, num_workers=num_workers,
                    rank=rank, world=world, barrier=dist.barrier if dist else (lambda: None),
                    log=log)
    return LatentCache(folder)


class LatentCache:
    """A complete cache folder as a data set of (latent, label), each latent also mirrored."""

    def __init__(self, folder, memory_limit: int = MEMORY_LIMIT):
        self.folder = Path(folder)
        index = read_json(self.folder / "index.json")
        if not index or index.get("format") != FORMAT:
            raise UserError(f"{self.folder}: not a complete latent cache (no valid index.json)")
        self.index = index
        self.classes = index["classes"]
        self.shape = tuple(index["shape"])                      # (C, h, w)
        counts = [s["count"] for s in index["shards"]]
        self.offsets = np.cumsum([0] + counts)                  # shard k holds [o_k, o_{k+1})
        paths = [self.folder / s["file"] for s in index["shards"]]
        self.labels = torch.cat([load_file(p)["labels"] for p in paths]) if paths else \
            torch.zeros(0, dtype=torch.int64)
        size = 2 * len(self.labels) * int(np.prod(self.shape)) * 4
        self.memory = None
        self.handles = None
        if size <= memory_limit:
            tensors = [load_file(p) for p in paths]
            self.memory = {key: torch.cat([t[key] for t in tensors])
                           for key in ("latents", "latents_flipped")}
        else:                                                   # read rows from the files
            self.handles = [safe_open(str(p), framework="pt") for p in paths]

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, key: str, indices) -> torch.Tensor:
        """Latents (n, C, h, w) of the given items; key: 'latents' or 'latents_flipped'."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self.memory is not None:
            return self.memory[key][indices]
        shard = np.searchsorted(self.offsets, indices.numpy(), side="right") - 1
        out = [self.handles[s].get_slice(key)[int(i - self.offsets[s]):int(i - self.offsets[s]) + 1]
               for i, s in zip(indices.tolist(), shard)]
        return torch.cat(out) if out else torch.zeros(0, *self.shape)

    def get(self, indices, flipped=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (n, C, h, w), labels (n,)); flipped (n,) bool picks the mirrored latents."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        x = self.rows("latents", indices)
        if flipped is not None and bool(flipped.any()):
            x[flipped] = self.rows("latents_flipped", indices[flipped])
        return x, self.labels[indices]

    def std(self, max_items: int = 50_000) -> float:
        """Standard deviation of all latent values (a sample of items for large caches)."""
        step = max(1, len(self) // max_items)
        x = self.rows("latents", torch.arange(0, len(self), step)).double()
        return x.std().item()
