"""`pixtok bench infer`: the core models' speed and memory, side by side in one run (JSON).

infer: ViT/p forward throughput (classifiers, and a dense depth model at 48x64) beside this
machine's fp32 GEMM rate (a 2048^2 matmul), so `fraction_of_gemm` says how close the model gets
to the hardware; and the peak memory of a forward pass as the token count grows, SDPA beside
textbook softmax(QK^T)V.

On a shared machine one measurement of the GEMM and one of each model, taken minutes apart, can
fall into different loads (fraction_of_gemm read 0.24 one run and 0.84 another). So every timed
thing runs in alternating rounds: each round times the GEMM and then every model for a short
window, the order reversed every other round (ABC CBA ...), and each row reports the median over
rounds of its own rate and of its rate over the GEMM rate of the same round.

Each shipped shape (the classifier ViT-N/1 at 28x28, the depth ViT-N/1 at 48x64, at batch 1 and
the server's batch) is timed under PyTorch eager, ONNX Runtime fp32 and its dynamic int8 file
(export/onnx.py, export/quantize.py), all at the same thread count (torch's). FLOPs come from
torch.utils.flop_counter.FlopCounterMode (training/flops.py). Those parts are imported where
they are used, so the memory probe's fresh (spawned) process loads torch alone.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def window(fn, seconds: float) -> float:
    """Seconds per call of fn over one window of at least `seconds` (at least one call)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - t0 >= seconds:
            return (time.perf_counter() - t0) / n


def interleaved(fns: dict[str, Callable], rounds: int, seconds: float) -> dict[str, list[float]]:
    """{name: [seconds per call in each round]}: every fn timed once per round for a window of
    `seconds`, in the given order on even rounds and reversed on odd ones, after one warm-up
    call each. Load that comes and goes falls on every fn alike."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(window(fns[name], seconds))
    return out


def gemm_call(n: int = 2048) -> tuple[Callable, float]:
    """(one n^2 fp32 matmul, its FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: torch.mm(a, b)), 2.0 * n ** 3


def build_vit(name: str, size: tuple[int, int], channels: int = 3, num_classes: int = 100):
    from pixtok.models.vit import ViT, vit_config

    return ViT(vit_config(name, image_size=size, in_channels=channels,
                          num_classes=num_classes)).eval()


def build_depth(name: str, size: tuple[int, int]):
    from pixtok.models.depth import DepthViT
    from pixtok.models.vit import vit_config

    return DepthViT(vit_config(name, image_size=size, pool="mean")).eval()


def case_list(quick: bool) -> list[dict]:
    """The timed shapes: `serve` ones also get ONNX Runtime rows."""
    cases = [{"model": "ViT-T/1", "image_size": 32, "batch": 8,
              "build": lambda: build_vit("ViT-T/1", (32, 32))}]
    # the shipped shapes: the classifier (ViT-N/1 at 28x28, grey, 10 classes: fashion-vit1) at
    # batch 1 and the server's 16; one model and one ONNX file for both batches
    for batch in (1, 16):
        cases.append({"model": "ViT-N/1", "image_size": 28, "batch": batch, "serve": "cls",
                      "build": lambda: build_vit("ViT-N/1", (28, 28), 1, 10)})
    if not quick:
        cases += [{"model": name, "image_size": size, "batch": 8,
                   "build": lambda name=name, size=size: build_vit(name, (size, size))}
                  for name, size in (("ViT-T/2", 32), ("ViT-T/4", 32), ("ViT-S/1", 32),
                                     ("ViT-T/1", 28))]
        # the shipped depth model's shape (scenes-vit1-depth: ViT-N/1 at the paper's 48x64,
        # 3072 tokens) at batch 1 and the server's 4
        cases += [{"model": "DepthViT-N/1", "image_size": [48, 64], "batch": batch,
                   "serve": "depth", "build": lambda: build_depth("ViT-N/1", (48, 64))}
                  for batch in (1, 4)]
    return cases


def case_input(case: dict, model) -> torch.Tensor:
    size = case["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(case["batch"], model.cfg.in_channels, h, w)


def onnx_sessions(model, input_shape: tuple, folder: Path) -> dict:
    """{"onnxruntime": session, "onnxruntime-int8": session} of the model's ONNX files, on the
    CPU at torch's thread count (the per-worker share the servers give both runtimes)."""
    import onnxruntime as ort

    from export.onnx import export_onnx
    from export.quantize import quantize_int8

    fp32 = folder / "model.onnx"
    export_onnx(model, input_shape, fp32)
    quantize_int8(fp32, folder / "model.int8.onnx")
    files = {"onnxruntime": fp32, "onnxruntime-int8": folder / "model.int8.onnx"}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    return {backend: ort.InferenceSession(str(path), options,
                                          providers=["CPUExecutionProvider"])
            for backend, path in files.items()}


def runners_for(case: dict, folder: Path, shared: dict) -> tuple[dict, torch.nn.Module]:
    """{backend: one forward pass of the case's batch} and the model; cases with the same
    "serve" key share one model and its ONNX sessions (`shared`)."""
    key = case.get("serve")
    if key and key in shared:
        model, sessions = shared[key]
    else:
        model, sessions = case["build"](), {}
        if key:
            shape = tuple(case_input({**case, "batch": 1}, model).shape[1:])
            sessions = onnx_sessions(model, shape, folder)
            shared[key] = model, sessions
    x = case_input(case, model)

    def eager():
        with torch.inference_mode():
            model(x)

    runners = {"torch": eager}
    feed = {"images": x.numpy()}
    for backend, session in sessions.items():
        runners[backend] = lambda s=session: s.run(None, feed)
    return runners, model


def forward_flops(case: dict, model) -> int:
    """FLOPs of one image's forward pass, from FlopCounterMode (training/flops.py)."""
    from training.flops import count_forward_flops

    one = case_input({**case, "batch": 1}, model)
    return int(count_forward_flops(case["build"], (lambda: torch.empty(one.shape),)))


def model_rows(quick: bool, rounds: int, seconds: float) -> list[dict]:
    """Every case under every backend, with the GEMM, in alternating rounds -> one row each."""
    cases = case_list(quick)
    fns, meta, shared = {}, {}, {}
    gemm, gemm_flops = gemm_call()
    fns["gemm"] = gemm
    with tempfile.TemporaryDirectory(prefix="pixtok-bench-infer-") as tmp:
        for i, case in enumerate(cases):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            runners, model = runners_for(case, folder, shared)
            flops = forward_flops(case, model)
            for backend, fn in runners.items():
                fns[(i, backend)] = fn
                meta[(i, backend)] = {k: v for k, v in case.items() if k not in ("build",
                                                                                  "serve")}
                meta[(i, backend)].update(backend=backend, flops_per_image=flops)
        times = interleaved(fns, rounds, seconds)
    gemm_rates = [gemm_flops / t for t in times["gemm"]]
    rows = []
    for key, row in meta.items():
        rates = [row["batch"] / t for t in times[key]]
        row["images_per_s"] = statistics.median(rates)
        row["gemm_flops_per_s"] = statistics.median(gemm_rates)
        row["rounds"] = rounds
        if row["flops_per_image"]:
            row["fraction_of_gemm"] = statistics.median(
                r * row["flops_per_image"] / g for r, g in zip(rates, gemm_rates))
        rows.append(row)
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_torch: a row's images/s over the torch row of the same model and batch."""
    torch_rate = {(r["model"], str(r["image_size"]), r["batch"]): r["images_per_s"]
                  for r in rows if r["backend"] == "torch"}
    for r in rows:
        base = torch_rate.get((r["model"], str(r["image_size"]), r["batch"]))
        if base:
            r["speedup_vs_torch"] = r["images_per_s"] / base


def _peak_memory_child(name: str, side: int, impl: str, depth: int, queue) -> None:
    from pixtok.models.vit import ViT, vit_config

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
    """The suite: the models' rows, then the attention memory probes."""
    rounds, seconds = (4, 0.5) if quick else (7, 1.0)
    results = model_rows(quick, rounds, seconds)
    sides = [32, 64] if quick else [32, 64, 128]         # 1024, 4096, 16384 tokens
    depth = 1 if quick else 12
    memory = [{"tokens": s * s, "attention": impl, "peak_mb": peak_forward_mb("ViT-T/1", s, impl,
                                                                              depth)}
              for s in sides for impl in ("sdpa", "naive")]
    return {"suite": "infer", "device": "cpu", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rounds": rounds, "window_s": seconds,
            "flops": "torch.utils.flop_counter.FlopCounterMode",
            "results": results, "memory": memory,
            "memory_model": f"ViT-T/1 depth {depth}, batch 1"}
