"""`pixtok bench serve`: classifier throughput and latency through TorchServe, KServe's
ModelServer and in process, each with each backend (PyTorch eager, ONNX Runtime), in one run.

Every path runs the same checkpoint with the same batching rule (up to BATCHING["classify"]
requests, waiting at most its delay) and the same thread count, so the gaps are what each
server's HTTP side and worker protocol cost. Paths: `torchserve` (REST, through pixtok's gate,
as `pixtok serve` runs it), `kserve` (the same REST route on `pixtok serve --server kserve`),
`in-process` (the inference core called from this process), each with `torch` (an archive
exported --no-onnx) and `onnxruntime` (the default archive, which carries its ONNX file).

Both servers run at once, and the six paths are measured in alternating rounds: each round
drives every path at 1, 4 and 16 clients, in one order on even rounds and the reverse on odd
ones (ABC.. ..CBA), so load from other work on a shared machine falls on all of them alike.
Each row is the median over rounds; `of_in_process` is the median over rounds of the path's
images/s over the in-process images/s of the same backend, clients and round.
Each server gets its own run folder and free ports, so a user's running server is never
touched. startup_s / startup_kserve_s: start (archives already built) to the first answer.
"""
from __future__ import annotations

import io
import queue
import tempfile
import threading
import time
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.archive import export_archive
from pixtok.inference.classifier import load_classifier
from pixtok.inference.runtime import pick_device
from serving import launcher
from serving.client import Client, ServerError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "model_store" / "fashion-vit1"


def bench_checkpoint(tmp: Path) -> tuple[Path, str]:
    """The shipped Fashion-MNIST classifier, or an untrained one of the same shape (speed only)."""
    if (SHIPPED / "config.json").is_file():
        return SHIPPED, "fashion-vit1"
    from pixtok.checkpoint import save_weights, write_json
    from pixtok.models.vit import ViT, vit_config

    torch.manual_seed(0)
    cfg = vit_config("ViT-P/1", image_size=(28, 28), in_channels=1, num_classes=10)
    ckpt = tmp / "bench-vit1"
    write_json(ckpt / "config.json", {
        "format": "pixtok-checkpoint/1", "task": "classify",
        "model": {"arch": "vit", "name": "ViT-P/1", "args": cfg.to_dict()},
        "labels": [f"class{i}" for i in range(10)],
        "input": {"image_size": [28, 28], "channels": 1, "resize": "bicubic"},
        "data": {"name": "untrained, for speed only"}, "recipe": {}, "git_commit": None,
        "step": 0})
    save_weights(ckpt / "model.safetensors", ViT(cfg).state_dict())
    return ckpt, "bench-vit1 (untrained ViT-P/1, 28x28)"


class InProcessBatcher:
    """Requests from many threads -> batches, by TorchServe's rule: up to batch_size requests,
    waiting at most max_delay_s after the first."""

    def __init__(self, core, batch_size: int, max_delay_s: float):
        self.core, self.batch_size, self.max_delay_s = core, batch_size, max_delay_s
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def submit(self, body: bytes) -> dict:
        done, slot = threading.Event(), {}
        self.queue.put((body, done, slot))
        done.wait()
        return slot["result"]

    def run(self):
        while (first := self.queue.get()) is not None:
            batch, deadline = [first], time.monotonic() + self.max_delay_s
            while len(batch) < self.batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)     # finish this batch, then stop
                    break
                batch.append(item)
            inputs = [self.core.preprocess(body, "image/png") for body, _, _ in batch]
            for (_, done, slot), result in zip(batch, self.core.predict(inputs)):
                slot["result"] = result
                done.set()

    def close(self):
        self.queue.put(None)
        self.thread.join()


def drive(call, bodies: list[bytes], clients: int, per_client: int) -> dict:
    """`clients` threads, each sending per_client requests back to back -> throughput, latency."""
    latencies, lock = [], threading.Lock()

    def client(i: int):
        for j in range(per_client):
            t0 = time.perf_counter()
            call(bodies[(i * per_client + j) % len(bodies)])
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"clients": clients, "images_per_s": round(len(ms) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def ping_round_trips(gated, direct, n: int) -> dict:
    """GET /ping through the gate and straight to TorchServe, n of each taken in turns: the
    round trip with no model work in it, so the difference is the gate's own cost per request."""
    ms = {"torchserve": [], "torchserve-direct": []}
    for _ in range(n):
        for path, client in (("torchserve", gated), ("torchserve-direct", direct)):
            t0 = time.perf_counter()
            resp = client.request("GET", f"{client.base_url}/ping")
            ms[path].append((time.perf_counter() - t0) * 1000)
            if resp.status != 200:
                raise ServerError(resp.status, resp.json())
    out = {path: {"p50_ms": round(float(np.percentile(v, 50)), 3),
                  "p99_ms": round(float(np.percentile(v, 99)), 3)} for path, v in ms.items()}
    out["n"] = n
    out["gate_p50_ms"] = round(out["torchserve"]["p50_ms"] - out["torchserve-direct"]["p50_ms"],
                               3)
    return out


def noise_pngs(n: int, seed: int = 0) -> list[bytes]:
    """n random 28x28 grey PNG files: the benchmark's request bodies."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
        bodies.append(buf.getvalue())
    return bodies


BACKENDS = ("torch", "onnxruntime")
CLIENTS = (1, 4, 16)


def median_rows(samples: dict, in_process: str = "in-process") -> list[dict]:
    """{(path, backend, clients): [one drive() result per round]} -> one row each: the medians,
    and where the path is a server, of_in_process (the median of the per-round ratios)."""
    rows = []
    for (path, backend, clients), runs in samples.items():
        row = {"path": path, "backend": backend, "clients": clients, "rounds": len(runs)}
        for key in ("images_per_s", "p50_ms", "p99_ms"):
            row[key] = round(float(np.median([r[key] for r in runs])), 2)
        base = samples.get((in_process, backend, clients))
        if path != in_process and base:
            row["of_in_process"] = round(float(np.median(
                [r["images_per_s"] / b["images_per_s"] for r, b in zip(runs, base)])), 3)
        rows.append(row)
    eager = {(r["path"], r["clients"]): r["images_per_s"] for r in rows
             if r["backend"] == "torch"}
    for r in rows:                      # the same path and clients: ONNX Runtime over eager
        if r["backend"] != "torch" and eager.get((r["path"], r["clients"])):
            r["speedup_vs_torch"] = round(r["images_per_s"] / eager[(r["path"],
                                                                      r["clients"])], 3)
    return rows


def alternate(paths: dict, bodies: list[bytes], rounds: int, per_client: int) -> list[dict]:
    """Every path at every client count, in rounds of alternating order -> median rows."""
    samples: dict = {(path, backend, c): [] for (path, backend) in paths for c in CLIENTS}
    order = list(paths)
    for r in range(rounds):
        for clients in CLIENTS:
            for key in order if r % 2 == 0 else order[::-1]:
                samples[(*key, clients)].append(drive(paths[key], bodies, clients, per_client))
    return median_rows(samples)


class Servers:
    """TorchServe and the KServe server started on one store (both models each), stopped on
    exit; start-up times to the first answer."""

    def __init__(self, store: Path, tmp: Path, bodies: list[bytes]):
        self.store, self.tmp, self.bodies, self.startup = store, tmp, bodies, {}

    def __enter__(self):
        quiet = {"log": lambda *_: None}
        t0 = time.perf_counter()
        self.torchserve = launcher.start(self.store, run_dir=self.tmp / "run",
                                         ports=launcher.free_ports(), **quiet)
        self.ts_client = self.torchserve.client()
        self.ts_client.classify(self.bodies[0], model="bench-torch")
        self.startup["torchserve"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.kserve = launcher.start_kserve(
            self.store, run_dir=self.tmp / "run-kserve",
            ports={"inference": launcher.free_ports()["inference"]}, **quiet)
        self.ks_client = self.kserve.client()
        self.ks_client.classify(self.bodies[0], model="bench-torch")
        self.startup["kserve"] = time.perf_counter() - t0
        return self

    def __exit__(self, *exc):
        for run in ("run", "run-kserve"):
            if (self.tmp / run).is_dir():
                launcher.stop(self.tmp / run, log=lambda *_: None)


def threads_for_every_path(threads: int) -> None:
    """One thread count for TorchServe's workers, the KServe server and this process (torch and
    ONNX Runtime alike), so that no path wins by taking more cores."""
    import os

    os.environ["PIXTOK_WORKER_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def bench_serve(quick: bool = False) -> dict:
    """{"suite": "serve", "model", "threads", "rounds", "results": [{"path", "backend",
    "clients", "images_per_s", "p50_ms", "p99_ms", "of_in_process", "speedup_vs_torch"}],
    "ping": {path: {"p50_ms", "p99_ms"}, "n", "gate_p50_ms"}, "startup_s", "startup_kserve_s"}.
    The benchmark model's two archives are built by export, as `pixtok export` builds them."""
    per_client, rounds = (2, 2) if quick else (4, 4)
    threads = torch.get_num_threads()
    threads_for_every_path(threads)
    device = pick_device(0)     # where TorchServe puts the worker: GPU 0 when there is one
    bodies = noise_pngs(32)
    rule = launcher.BATCHING["classify"]
    with tempfile.TemporaryDirectory(prefix="pixtok-bench-") as tmp:
        tmp = Path(tmp)
        ckpt, model_label = bench_checkpoint(tmp)
        store = tmp / "store"
        export_archive(ckpt, store, name="bench-torch", onnx=False, log=lambda *_: None)
        onnx_mar = export_archive(ckpt, store, name="bench-onnxruntime", log=lambda *_: None)
        local = tmp / "local"
        zipfile.ZipFile(onnx_mar).extractall(local)
        batchers = {b: InProcessBatcher(load_classifier(local, device, prefer_onnx=b != "torch"),
                                        rule["batchSize"], rule["maxBatchDelay"] / 1000)
                    for b in BACKENDS}
        try:
            with Servers(store, tmp, bodies) as servers:
                paths = {}
                for b in BACKENDS:
                    paths[("torchserve", b)] = partial(servers.ts_client.classify,
                                                       model=f"bench-{b}")
                    paths[("kserve", b)] = partial(servers.ks_client.classify,
                                                   model=f"bench-{b}")
                    paths[("in-process", b)] = batchers[b].submit
                results = alternate(paths, bodies, rounds, per_client)
                direct = Client(servers.torchserve.upstream, servers.torchserve.run_dir)
                ping = ping_round_trips(servers.ts_client, direct, 50 if quick else 300)
                startup = servers.startup
        finally:
            for batcher in batchers.values():
                batcher.close()
    return {"suite": "serve", "model": model_label, "device": str(device), "threads": threads,
            "rounds": rounds, "requests_per_client": per_client, "results": results,
            "ping": ping, "startup_s": round(startup["torchserve"], 2),
            "startup_kserve_s": round(startup["kserve"], 2)}
