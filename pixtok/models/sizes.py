"""Named model sizes, one table for every family: a letter means the same (depth, width, heads)
in ViT-<size>/<p> and DiT-<size>/<p>. T/S/B/L are the ViT paper's (S/B/L also DiT's), XL is
DiT's; F/P/N are small sizes for unit tests and CPUs."""
from __future__ import annotations

SIZES = {   # name: (depth, width, heads)
    "F": (2, 32, 2),       # femto: unit tests
    "P": (4, 64, 2),       # pico: trains on 2 CPU cores
    "N": (6, 128, 4),      # nano: the shipped CPU-sized models
    "T": (12, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def registry(family: str, sizes, patches) -> dict[str, tuple[int, int, int, int]]:
    """{'<family>-<size>/<p>': (depth, width, heads, p)} of a model family."""
    return {f"{family}-{s}/{p}": (*SIZES[s], p) for s in sizes for p in patches}


def lookup(models: dict, name: str, example: str) -> tuple[int, int, int, int]:
    """(depth, width, heads, p) of a registered name; ValueError naming the choices."""
    if name not in models:
        family = example.split("-")[0]
        sizes = sorted({k.split("-")[1].split("/")[0] for k in models}, key=list(SIZES).index)
        patches = sorted({int(k.split("/")[1]) for k in models})
        raise ValueError(f"unknown model {name!r}; expected {family}-<size>/<patch> with size in "
                         f"{'/'.join(sizes)} and patch in {'/'.join(map(str, patches))}, "
                         f"e.g. {example}")
    return models[name]
