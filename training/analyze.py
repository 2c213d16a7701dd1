"""`pixtok analyze CKPT`: where a ViT/p's heads look (the paper's Appendix B views).

For held-out images (the run's validation split if it has one, else test) the attention
probabilities of every layer and head are computed explicitly, for this analysis only: the
blocks themselves still run their SDPA forward, and each block's probabilities are recomputed
from its input with the same weights. Queries and keys are the image tokens ([cls] left out,
each query's weights over the image tokens renormalised to sum to 1).

- Mean attention distance (in pixels) of a head: the attention-weighted distance between a
  query token's centre and its keys' centres, times the patch size, averaged over queries and
  images. A head that looks at its neighbourhood has a small one; a uniform head about a third
  of the image's diagonal.
- The offset map of a layer: the attention a query gives to the key at offset (dy, dx) from it,
  averaged over queries (that have such a neighbour), heads and images; centred on the query.

Writes DIR/analysis.json ({"layers": [{"layer", "heads": [pixels, ...], ...}], ...}),
DIR/attention_distance.png and DIR/attention_offsets.png.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pixtok.checkpoint import load_model, read_config, write_json
from pixtok.errors import UserError

CHUNK = 8       # images per pass: probabilities are (chunk, heads, L, L) per layer


def block_attention(block, t: torch.Tensor) -> torch.Tensor:
    """The softmax attention probabilities (N, H, L, L) of a ViT block on its input tokens."""
    attn = block.attn
    n, length, d = t.shape
    qkv = attn.qkv(block.norm1(t)).view(n, length, 3, attn.heads, d // attn.heads)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)


def offsets(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L) distance between token centres in grid units, and (L, L) index of the offset
    (dy, dx) = key - query in a (2gh-1) x (2gw-1) map."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]
    return torch.sqrt((dy ** 2 + dx ** 2).double()), (dy + gh - 1) * (2 * gw - 1) + (dx + gw - 1)


@torch.no_grad()
def analyze(model, images: torch.Tensor) -> dict:
    """images uint8 (N, C, H, W) -> per layer: each head's mean attention distance (pixels)
    and the layer's offset map (head-averaged)."""
    vit = getattr(model, "encoder", model)         # a depth model's encoder
    if not hasattr(vit, "blocks") or not hasattr(vit, "tokens"):
        raise UserError("pixtok analyze reads ViT/p checkpoints (classify or depth)")
    vit.eval()
    cfg = vit.cfg
    p, grid = cfg.patch_size, cfg.grid
    dist, index = offsets(grid)
    cells = (2 * grid[0] - 1) * (2 * grid[1] - 1)
    count = torch.zeros(cells, dtype=torch.float64).index_add_(
        0, index.flatten(), torch.ones(index.numel(), dtype=torch.float64))
    skip = 1 if vit.cls_token is not None else 0
    dist_sum = torch.zeros(cfg.depth, cfg.heads, dtype=torch.float64)
    maps = torch.zeros(cfg.depth, cells, dtype=torch.float64)
    for start in range(0, len(images), CHUNK):
        x = images[start:start + CHUNK].float().div(255)
        t = vit.tokens(x)
        if vit.cls_token is not None:
            t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        for i, block in enumerate(vit.blocks):
            probs = block_attention(block, t)[:, :, skip:, skip:].double()    # image tokens
            probs = probs / probs.sum(-1, keepdim=True)
            dist_sum[i] += (probs * dist).sum(dim=(-1, -2)).sum(0)            # (H,)
            maps[i].index_add_(0, index.flatten(), probs.sum(dim=(0, 1)).flatten())
            t = block(t)
    n_queries = len(images) * cfg.num_tokens
    distance = (dist_sum / n_queries * p).tolist()
    # mean over images and heads of the attention at each offset, per query that has it
    maps = maps / (len(images) * cfg.heads) / count.clamp(min=1)
    layers = []
    for i in range(cfg.depth):
        layers.append({"layer": i, "heads": [round(d, 4) for d in distance[i]],
                       "mean": round(sum(distance[i]) / cfg.heads, 4),
                       "offset_map": maps[i].view(2 * grid[0] - 1, 2 * grid[1] - 1)
                       .float().tolist()})
    return {"patch_size": p, "grid": list(grid), "image_size": list(cfg.image_size),
            "images": len(images), "uniform_distance": round(float(dist.mean()) * p, 4),
            "layers": layers}


def plot(result: dict, out: Path, title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in layers:
        ax.scatter([row["layer"]] * len(row["heads"]), row["heads"], s=18)
    ax.axhline(result["uniform_distance"], ls="--", c="grey", lw=1,
               label="uniform attention")
    ax.set(xlabel="layer", ylabel="mean attention distance (pixels)",
           title=f"{title}: one dot per head")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "attention_distance.png", dpi=120)
    plt.close(fig)

    cols = min(len(layers), 4)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    gh, gw = result["grid"]
    p = result["patch_size"]
    extent = [-(gw - 1) * p - p / 2, (gw - 1) * p + p / 2, (gh - 1) * p + p / 2,
              -(gh - 1) * p - p / 2]
    for ax, row in zip(axes.flat, layers):
        ax.imshow(row["offset_map"], cmap="viridis", extent=extent)
        ax.set_title(f"layer {row['layer']}", fontsize=9)
        ax.set_xlabel("dx (pixels)", fontsize=8)
        ax.set_ylabel("dy (pixels)", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"{title}: mean attention by offset from the query")
    fig.tight_layout()
    fig.savefig(out / "attention_offsets.png", dpi=120)
    plt.close(fig)
    return ["attention_distance.png", "attention_offsets.png"]


def analyze_checkpoint(ckpt, out, num_images: int = 64, split: str | None = None,
                       data_dir: str | None = None) -> tuple[dict, list[str]]:
    """Analyse a classify or depth checkpoint on held-out images; write analysis.json and the
    plots into `out`; return the result and the plot files' names."""
    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / "config.json").is_file() or (ckpt / "model_index.json").is_file():
        raise UserError(f"{ckpt}: no ViT checkpoint folder (config.json) there")
    config = read_config(ckpt)
    task = config.get("task")
    if task not in ("classify", "depth"):
        raise UserError(f"{ckpt}: pixtok analyze reads classify and depth runs, not {task!r}")
    if num_images < 1:
        raise UserError(f"-n {num_images}: expected at least one image")
    if task == "classify":
        from training.tasks.classify import load_split
    else:
        from training.tasks.depth import load_split
    data = dict(config["data"], **({"data_dir": data_dir} if data_dir else {}))
    split = split or ("val" if data.get("val_size") else "test")
    dataset = load_split(data, split)
    n = min(num_images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)])
    model, _ = load_model(ckpt)
    result = {"checkpoint": str(ckpt), "split": split, **analyze(model, images)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "analysis.json", result)
    files = plot(result, out, config.get("model", {}).get("name") or ckpt.name)
    return result, files


def run_cli(args) -> int:
    out = Path(args.out) if args.out else Path(args.ckpt) / "analysis"
    result, files = analyze_checkpoint(args.ckpt, out, args.num_images, args.split, args.data)
    summary = {"analysis": str(out / "analysis.json"), "plots": [str(out / f) for f in files],
               "mean_distance_by_layer": [row["mean"] for row in result["layers"]],
               "uniform_distance": result["uniform_distance"]}
    print(json.dumps(summary))
    return 0
