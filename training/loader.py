"""Batches by explicit index lists, so the training loop alone decides the data order."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader


def in_memory(dataset):
    """(images (N, C, H, W), targets) when a set is held in memory or in a decoded cache
    (labels or depth maps), else None for a set decoded item by item."""
    images = getattr(dataset, "images", None)
    if images is None:
        images = getattr(dataset, "cache", None)      # ImageFolder's memory-mapped .npy
    targets = getattr(dataset, "labels", getattr(dataset, "depths", None))
    return None if images is None or targets is None else (images, targets)


def fetch_batches(dataset, index_lists, num_workers: int = 0):
    """Yield (images uint8 (n, C, H, W), targets) for each list of indices, in order.

    In-memory sets are indexed directly; others are decoded by a DataLoader (with worker
    processes when num_workers > 0) that follows the same index lists.
    """
    held = in_memory(dataset)
    if held is not None:
        images, targets = held
        for idx in index_lists:
            idx = np.asarray(idx, dtype=np.int64)
            yield torch.as_tensor(np.asarray(images[idx])), torch.as_tensor(targets[idx])
        return
    yield from DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers,
                          persistent_workers=False)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


STATS_CHUNK = 4096   # images a pass of channel_stats holds as float64: memory stays bounded


def channel_stats(dataset, chunk: int = STATS_CHUNK) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a training set in [0, 1] (ImageNet's for lazily decoded sets),
    which the model stores and applies itself, so serving needs no separate normalisation.

    Large sets are sampled (every k-th image, at most ~50,000) and read `chunk` images at a
    time, each chunk's moments merged into the running ones (Chan et al.'s pairwise update):
    the whole sample in float64 at once would be 8x the uint8 images' size."""
    held = in_memory(dataset)
    if held is None:
        c = dataset.in_channels
        return (list(IMAGENET_MEAN), list(IMAGENET_STD)) if c == 3 else ([0.5] * c, [0.5] * c)
    images = held[0]
    step = max(1, len(dataset) // 50_000)                 # a sample is enough for large sets
    count, mean, m2 = 0, 0.0, 0.0                         # pixels, per-channel mean and M2
    for start in range(0, len(dataset), chunk * step):
        part = images[start:start + chunk * step:step]
        x = part if torch.is_tensor(part) else torch.from_numpy(np.array(part))  # memmap: copied
        x = x.double().div_(255).transpose(0, 1).flatten(1)          # (C, n pixels)
        var_c, mean_c = torch.var_mean(x, dim=1, correction=0)
        n = x.shape[1]
        delta, total = mean_c - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + var_c * n + delta ** 2 * (count * n / total)
        count = total
    std = (m2 / (count - 1)).sqrt()                       # the unbiased std, as torch.std
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


def crop_flip_batches(dataset, index_lists, aug_seeds, crop_flip, dist, num_workers: int = 0):
    """Yield (images uint8 cropped/flipped, targets, the crop/flip parameters used).

    aug_seeds[i] seeds the parameters of global batch i and each process applies its slice of
    them, so 1 and N processes augment identically (targets such as depth maps can be given the
    same parameters with crop_flip.apply)."""
    r, w = dist.rank, dist.world
    for (x, targets), seed in zip(fetch_batches(dataset, index_lists, num_workers), aug_seeds):
        n = x.shape[0]
        params = crop_flip.params(torch.Generator().manual_seed(seed), n * w, *x.shape[-2:])
        params = {k: v[r * n:(r + 1) * n] for k, v in params.items()}
        yield crop_flip.apply(x, params), targets, params


def with_bar(batches, total: int, desc: str | None):
    """The batches as they are, or through a progress bar on stderr that says `desc` and counts
    them (`pixtok eval`: stdout keeps its JSON; TQDM_DISABLE=1 turns the bar off)."""
    if desc is None:
        return batches
    import sys

    from tqdm import tqdm

    return tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)
