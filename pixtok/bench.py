"""`pixtok bench SUITE`: speed and memory measured side by side in one run, printed as JSON.

infer: ViT/p forward throughput (classifiers, and a dense depth model at 48x64) beside this
machine's fp32 GEMM rate (the same run's 2048^2 matmul), so `fraction_of_gemm` says how close the
model gets to the hardware; and the peak memory of a forward pass as the token count grows, SDPA
beside textbook softmax(QK^T)V.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch

from pixtok.errors import UserError


def _timeit(fn, min_time: float = 1.0, repeats: int = 5) -> float:
    """Median seconds per call over `repeats` windows of at least min_time/repeats each."""
    fn()                                             # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_time / repeats:
                break
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def gemm_flops_per_s(n: int = 2048, min_time: float = 1.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _timeit(lambda: torch.mm(a, b), min_time)


def vit_throughput(name: str, image_size: int, batch: int, min_time: float = 2.0) -> dict:
    from training.models.vit import ViT, flops_per_image, vit_config

    cfg = vit_config(name, image_size=(image_size, image_size), num_classes=100)
    model = ViT(cfg).eval()
    x = torch.rand(batch, cfg.in_channels, image_size, image_size)
    with torch.inference_mode():
        seconds = _timeit(lambda: model(x), min_time)
    return {"model": name, "image_size": image_size, "batch": batch,
            "images_per_s": batch / seconds, "flops_per_image": flops_per_image(cfg)}


def depth_throughput(name: str, image_size: tuple[int, int], batch: int,
                     min_time: float = 2.0) -> dict:
    """DepthViT forward throughput: every token of the image (no [cls]) feeds the dense head."""
    from training.models.depth import DepthViT
    from training.models.vit import flops_per_image, vit_config

    cfg = vit_config(name, image_size=image_size, pool="mean")
    model = DepthViT(cfg).eval()
    x = torch.rand(batch, cfg.in_channels, *image_size)
    with torch.inference_mode():
        seconds = _timeit(lambda: model(x), min_time)
    head = 2 * cfg.num_tokens * cfg.width * cfg.patch_size ** 2     # one linear layer per token
    return {"model": f"Depth{name}", "image_size": list(image_size), "batch": batch,
            "images_per_s": batch / seconds, "flops_per_image": flops_per_image(cfg) + head}


def _peak_memory_child(name: str, side: int, impl: str, depth: int, queue) -> None:
    from training.models.vit import ViT, vit_config

    def build(s):
        model = ViT(vit_config(name, image_size=(s, s), depth=depth)).eval()
        model.set_attention(impl)
        return model, torch.rand(1, model.cfg.in_channels, s, s)

    with torch.inference_mode():     # load kernels and thread pools first: they are not the model's
        warm, x = build(8)
        warm(x)
    model, x = build(side)
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * resource.getpagesize()
    with torch.inference_mode():
        model(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    queue.put((peak - rss_before) / 2 ** 20)


def peak_forward_mb(name: str, side: int, impl: str, depth: int) -> float:
    """Extra resident memory of one forward pass (batch 1), measured in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(name, side, impl, depth, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory probe {name} {side}x{side} {impl} exited {proc.exitcode}")
    return queue.get()


def bench_infer(quick: bool = False) -> dict:
    min_time = 0.5 if quick else 3.0
    gemm = gemm_flops_per_s(min_time=min_time)
    cases = [("ViT-T/1", 32, 8)]
    if not quick:
        cases += [("ViT-T/2", 32, 8), ("ViT-T/4", 32, 8), ("ViT-S/1", 32, 8), ("ViT-T/1", 28, 8),
                  ("ViT-P/1", 28, 128)]
    results = [vit_throughput(name, size, batch, min_time) for name, size, batch in cases]
    if not quick:   # the paper's depth input, 48x64 = 3072 tokens: 120 GFLOPs an image
        results.append(depth_throughput("ViT-T/1", (48, 64), 8, min_time))
    for r in results:
        r["gemm_flops_per_s"] = gemm
        r["fraction_of_gemm"] = r["images_per_s"] * r["flops_per_image"] / gemm
    sides = [32, 64] if quick else [32, 64, 128]         # 1024, 4096, 16384 tokens
    depth = 1 if quick else 12
    memory = [{"tokens": s * s, "attention": impl, "peak_mb": peak_forward_mb("ViT-T/1", s, impl,
                                                                              depth)}
              for s in sides for impl in ("sdpa", "naive")]
    return {"suite": "infer", "device": "cpu", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "results": results, "memory": memory,
            "memory_model": f"ViT-T/1 depth {depth}, batch 1"}


SUITES = {"infer": "pixtok.bench:bench_infer", "sample": "training.bench_sample:bench_sample",
          "serve": "serving.bench:bench_serve", "load": "serving.bench_load:bench_load",
          "drill": "serving.fault_drill:bench_drill"}


def run_cli(args) -> int:
    import importlib

    module, func = SUITES[args.suite].split(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        raise UserError(f"benchmark suite {args.suite!r} is not installed") from None
    if args.suite in ("load", "drill"):    # against a running server, with training's images
        from training.load_inputs import load_inputs

        result = fn(quick=args.quick, args=args, inputs=load_inputs)
    else:
        result = fn(quick=args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0
