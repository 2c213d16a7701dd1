"""`make gpu-check OUT=DIR` (scripts/gpu_check.sh runs this after installing): one lent GPU,
measured to the minute, results as JSON in DIR/gpu_check.json (rewritten after every step, so a
run cut short keeps what it measured).

Steps, in order, each with its own time limit inside BUDGET_S (9 minutes in all):
1. `env`: torch, CUDA, the device's name and its bf16 peak (PEAK_BF16), ONNX Runtime's
   providers, Java (TorchServe needs it).
2. `serve-torchserve`: `pixtok serve` on a copy of the default store (archives built as a user's
   first start builds them: ONNX files in the image models' archives), TorchServe + handlers +
   the Gradio page, on CUDA where there is one; real requests to every default model (Fashion-MNIST
   test images, rendered scenes, seeded generator requests): batch-1 latency (sequential
   requests, p50 / p99, the X-Pixtok-Backend header, the workers' ready lines) and throughput at
   16 clients; the page's front door; then `pixtok serve --stop`.
3. `serve-kserve`: the same through `pixtok serve --server kserve`.
4. `mfu`: a bf16 training step (forward, backward, AdamW) of ViT-S/1 at 32x32 (CIFAR shape, 1025
   tokens) and of DiT-L/1 on 32x32x4 latents (1024 tokens): FLOPs from FlopCounterMode
   (training/flops.py) over one step, seconds per step over timed steps, MFU against the peak.
5. `study`: if time is left, the 28x28 p = 1 arms of the patch-size study, through the CLI
   (STUDY_ARGS below), cut off by the budget (--resume continues it on a later GPU).

`--dry-run` (a test in `make test`): tiny models and sizes, a few requests and steps, the KServe
server only unless --servers says otherwise; what needs CUDA (MFU against a peak, the study)
is skipped with a message in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 540            # 9 minutes: the device lends 15, and a rerun must fit
DEFAULT_MODELS = ("fashion-vit1", "scenes-vit1-depth", "fashion-dit1")

# The study a lent GPU spends what is left on: the 28x28 patch-size grid with its GPU set-up
# (bf16), one process per arm side by side on the one GPU (shard i of 4 holds every lr and seed
# of one arm: p7, p4, p2, p1); each finished run's record comes back under OUT/study/records
# (copy it to docs/studies/patch-size-fashion-28/scale-gpu/records/ and commit it).
STUDY_ARGS = ["patch-size-fashion-28", "scale=gpu"]
STUDY_SHARDS = 4

# dense bf16 tensor-core peaks (FLOP/s) by a name torch.cuda.get_device_name() contains; the
# first match wins, so the more specific names come first
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
             ("A10", 125e12)]


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


class Run:
    """The results file and the clock: record(step, result) rewrites DIR/gpu_check.json."""

    def __init__(self, out: Path, dry: bool, budget: float):
        self.out, self.dry, self.budget, self.start = out, dry, budget, time.monotonic()
        self.results = {"dry_run": dry, "budget_s": budget, "steps": {}, "skipped": {}}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def record(self, step: str, result: dict) -> None:
        self.results["steps"][step] = result
        self.write()

    def skip(self, step: str, why: str) -> None:
        print(f"gpu-check: {step} skipped: {why}", flush=True)
        self.results["skipped"][step] = why
        self.write()

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1) + "\n")


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "python": sys.version.split()[0], "java": shutil.which("java") is not None}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info.update(device=name, peak_bf16_flops=peak_flops(name),
                    cuda_version=torch.version.cuda)
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    for module in ("ts", "model_archiver", "kserve", "diffusers", "gradio"):
        import importlib.util

        info[f"has_{module}"] = importlib.util.find_spec(module) is not None
    return info


# --- serving ------------------------------------------------------------------------------------
def request_bodies(task: str, count: int) -> list[bytes]:
    """Real request bodies: Fashion-MNIST test images, rendered scenes (tools/load_inputs.py)."""
    from tools.load_inputs import load_inputs

    try:
        return load_inputs([task], count=count, scenes=count)[task]
    except Exception as e:          # no Debian data set on the machine: noise of the same shape
        print(f"gpu-check: {task} inputs: {e}; sending noise images", flush=True)
        from tools.bench_serve import noise_pngs

        return noise_pngs(count)


def model_tasks(run_dir: Path) -> dict[str, str]:
    from serving.page_settings import served_models

    return {name: task for task, names in served_models(run_dir).items() for name in names}


def call_for(client, name: str, task: str, bodies: list[bytes], steps: int | None):
    """One request to the model -> (answer headers' backend, seconds); a failure raises."""
    import json as _json

    url = f"{client.base_url}/predictions/{name}"

    def call(i: int = 0):
        if task == "generate":
            payload = {"label": 0, "seed": i}
            if steps:
                payload["steps"] = steps
            body, ctype = _json.dumps(payload).encode(), "application/json"
        else:
            body, ctype = bodies[i % len(bodies)], "application/octet-stream"
        resp = client.request("POST", url, body, {"Content-Type": ctype}, kind="inference")
        if resp.status != 200:
            raise RuntimeError(f"{name}: HTTP {resp.status}: {resp.json()}")
        return resp.header("X-Pixtok-Backend")
    return call


def measure_model(client, name: str, task: str, sequential: int, per_client: int,
                  steps: int | None) -> dict:
    """Batch-1 latency (sequential requests) and throughput at 16 clients."""
    from tools.bench_serve import drive

    bodies = request_bodies(task, min(32, 4 * per_client)) if task != "generate" else []
    call = call_for(client, name, task, bodies, steps)
    backend = call(0)                                           # warm-up, and the backend
    ms = []
    for i in range(sequential):
        t0 = time.perf_counter()
        call(i)
        ms.append((time.perf_counter() - t0) * 1000)
    counter = iter(range(10 ** 9))
    busy = drive(lambda _body: call(next(counter)), [b""], 16, per_client)
    unit = "images" if task != "generate" else "requests (1 image each)"
    return {"task": task, "backend": backend, "batch1_p50_ms": round(float(np.median(ms)), 2),
            "batch1_p99_ms": round(float(np.percentile(ms, 99)), 2), "batch1_n": len(ms),
            "clients16": busy, "unit": unit}


def ready_lines(run_dir: Path) -> list[str]:
    lines = []
    for log in ("logs/model_log.log", "logs/kserve.out"):
        path = run_dir / log
        if path.is_file():
            lines += [line.strip()[-200:] for line in path.read_text(errors="replace")
                      .splitlines() if "pixtok: " in line and " ready on " in line]
    return lines


def serve_env(run_dir: Path) -> dict:
    from serving import launcher

    env = {**os.environ, "PIXTOK_RUN_DIR": str(run_dir), "PYTHONPATH": str(ROOT),
           "TQDM_DISABLE": "1"}
    for api, port in launcher.free_ports().items():
        env[launcher.PORTS[api][0]] = str(port)
    env["PIXTOK_UI_PORT"] = str(launcher.free_ports()["inference"])
    return env


def page_answers(port: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/", timeout=30) as resp:
        return resp.status


def serve_step(run: Run, server: str, store: Path, sizes: dict) -> dict:
    """`pixtok serve` (the CLI, as a user starts it) on the store, every model measured, stop."""
    from serving.client import Client

    run_dir = run.out / f"run-{server}"
    env = serve_env(run_dir)
    page = server == "torchserve"
    cmd = [sys.executable, "-m", "pixtok", "serve", "--server", server, "--model-store",
           str(store), *([] if page else ["--no-ui"])]
    t0 = time.perf_counter()
    started = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             timeout=max(30.0, run.left() - 30))
    result = {"command": " ".join(cmd[2:]), "start_s": round(time.perf_counter() - t0, 1)}
    try:
        if started.returncode:
            result["error"] = (started.stderr or started.stdout).strip()[-1500:]
            return result
        if page:
            result["page_status"] = page_answers(env["PIXTOK_UI_PORT"])
        client = Client(run_dir=run_dir)
        result["models"] = {name: measure_model(client, name, task, sizes["sequential"],
                                                sizes["per_client"], sizes.get("steps"))
                            for name, task in sorted(model_tasks(run_dir).items())}
        result["ready_lines"] = ready_lines(run_dir)
        return result
    finally:
        subprocess.run([sys.executable, "-m", "pixtok", "serve", "--stop"], env=env,
                       capture_output=True, text=True, timeout=120)


def default_store(out: Path) -> Path:
    """A copy of the default models' folders (archives are built into it, not the checkout)."""
    store = out / "store"
    for name in DEFAULT_MODELS:
        if not (store / name).is_dir():
            shutil.copytree(ROOT / "model_store" / name, store / name)
    return store


# --- MFU ----------------------------------------------------------------------------------------
def mfu_case(kind: str, dry: bool, device):
    """(name, model, loss function) of one training step's work."""
    import torch
    import torch.nn.functional as F

    from pixtok.models.dit import PixelDiT, dit_config
    from pixtok.models.vit import ViT, vit_config

    if kind == "vit":
        name, side, batch = ("ViT-F/1", 8, 4) if dry else ("ViT-S/1", 32, 256)
        model = ViT(vit_config(name, image_size=(side, side), num_classes=100)).to(device)
        x = torch.randn(batch, 3, side, side, device=device)
        y = torch.randint(0, 100, (batch,), device=device)
        return f"{name} {side}x{side} batch {batch}", model, lambda: F.cross_entropy(model(x), y)
    name, side, batch = ("DiT-F/1", 4, 4) if dry else ("DiT-L/1", 32, 64)
    model = PixelDiT(**dit_config(name, sample_size=side, in_channels=4,
                                  num_classes=1000)).to(device)
    x = torch.randn(batch, 4, side, side, device=device)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return (f"{name} on {side}x{side}x4 latents batch {batch}", model,
            lambda: F.mse_loss(model(x, t, y)[:, :4].float(), noise))


def mfu_step(kind: str, dry: bool, steps: int) -> dict:
    import torch

    from training.flops import FlopCounter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label, model, loss_fn = mfu_case(kind, dry, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounter() as fc:          # forward and backward of one step (the optimizer's
        step()                         # elementwise work is not counted, as usual)
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    peak = peak_flops(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
    out = {"model": label, "device": str(device), "flops_per_step": fc.total,
           "seconds_per_step": seconds, "achieved_flops_per_s": fc.total / seconds,
           "steps_timed": steps, "peak_bf16_flops_per_s": peak,
           "mfu": fc.total / seconds / peak if peak else None}
    if peak is None:
        out["note"] = "no peak known for this device (CPU: bf16 is emulated); MFU not computed"
    return out


# --- the run ------------------------------------------------------------------------------------
def run_study(run: Run) -> dict:
    """The study's shards side by side until the budget is spent; what finished is recorded."""
    folder = run.out / "study"
    cmd = [sys.executable, "-m", "pixtok", "study", *STUDY_ARGS, "--out", str(folder),
           "--records", str(folder / "records"), "--resume"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    limit = run.left() - 15
    folder.mkdir(parents=True, exist_ok=True)
    logs = [open(folder / f"shard{i}.log", "w") for i in range(STUDY_SHARDS)]
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/{STUDY_SHARDS}"], env=env, stdout=log,
                              stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    deadline, codes = time.monotonic() + limit, []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append("cut off by the budget (--resume continues it)")
    for log in logs:
        log.close()
    subprocess.run([*cmd, "--report"], env=env, capture_output=True, timeout=60)
    results = folder / "results.json"
    return {"command": " ".join(cmd[2:]), "shards": STUDY_SHARDS, "limit_s": round(limit),
            "returncodes": codes, "records": sorted(str(p.relative_to(folder)) for p in
                                                    (folder / "records").rglob("*.json")),
            "results": json.loads(results.read_text()) if results.is_file() else None}


def check_servers(run: Run, servers: list[str], store: Path, sizes: dict) -> None:
    env = run.results["steps"]["env"]
    for server in servers:
        step = f"serve-{server}"
        if server == "torchserve" and not env["java"]:
            run.skip(step, "no Java on this machine: TorchServe needs a JRE")
        elif run.left() < 60:
            run.skip(step, f"{run.left():.0f} s left of the budget")
        else:
            try:
                run.record(step, serve_step(run, server, store, sizes))
            except Exception as e:        # one server failing must not lose the other steps
                run.record(step, {"error": f"{type(e).__name__}: {e}"[:1500]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU: a test")
    parser.add_argument("--store", help="model store to serve (default: a copy of the "
                                        "default models)")
    parser.add_argument("--servers", help="comma-separated: torchserve,kserve (default: both; "
                                          "a dry run: kserve)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds in all")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.dry_run, args.budget)
    run.record("env", environment())
    cuda = run.results["steps"]["env"]["cuda"]
    if not cuda and not args.dry_run:
        print("gpu-check: no CUDA device; this is a GPU check (--dry-run runs it on a CPU)",
              file=sys.stderr)
        return 2
    store = Path(args.store).resolve() if args.store else default_store(out)
    servers = (args.servers or ("kserve" if args.dry_run else "torchserve,kserve")).split(",")
    sizes = ({"sequential": 3, "per_client": 1, "steps": 2} if args.dry_run
             else {"sequential": 30, "per_client": 4})
    for server in {"torchserve", "kserve"} - set(servers):
        run.skip(f"serve-{server}", "not asked for (--servers); a dry run serves KServe only: "
                 "TorchServe's start alone takes a minute on 2 busy cores")
    check_servers(run, servers, store, sizes)
    for kind in ("vit", "dit"):
        if run.left() < 30:
            run.skip(f"mfu-{kind}", f"{run.left():.0f} s left of the budget")
            continue
        run.record(f"mfu-{kind}", mfu_step(kind, args.dry_run, 2 if args.dry_run else 10))
    if not cuda:
        run.skip("study", "needs CUDA (a p = 1 run at 28x28 takes hours on a CPU); would run: "
                 f"pixtok study {' '.join(STUDY_ARGS)}")
    elif run.left() < 90:
        run.skip("study", f"{run.left():.0f} s left of the budget")
    else:
        run.record("study", run_study(run))
    print(f"gpu-check: wrote {out / 'gpu_check.json'} in {run.results['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
