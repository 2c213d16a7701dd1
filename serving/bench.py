"""`pixtok bench serve`: classifier throughput and latency through TorchServe, KServe's
ModelServer and in process, in one run.

Every path runs the same archive with the same batching rule (up to BATCHING["classify"]
requests, waiting at most its delay), so the gaps are what each server's HTTP side and worker
protocol cost. Paths: `torchserve` (REST, through pixtok's gate, as `pixtok serve` runs it),
`torchserve-direct` (the same server's own inference port, behind the gate: the gap between the
two is what the gate costs), `kserve` (the same REST route on `pixtok serve
--server kserve`), `kserve-v2` (the same image as a v2 `image` BYTES input), `in-process`. Each
server gets its own run folder and free ports, so a user's running server is never touched.
startup_s / startup_kserve_s: `pixtok serve` (archives already built) to the first answer.
"""
from __future__ import annotations

import base64
import io
import json
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixtok.inference.backend import load_classifier, pick_device
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


class V2Caller:
    """One image per v2 request (an `image` BYTES [1] input) to the KServe server."""

    def __init__(self, client, model: str):
        self.client, self.url = client, f"{client.base_url}/v2/models/{model}/infer"

    def __call__(self, body: bytes) -> dict:
        payload = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(body).decode()]}]}
        resp = self.client.request("POST", self.url, json.dumps(payload).encode(),
                                   {"Content-Type": "application/json"})
        if resp.status != 200:
            raise ServerError(resp.status, {"message": resp.json()})
        return resp.json()


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


def bench_serve(quick: bool = False, export_archive=None) -> dict:
    """{"suite": "serve", "model", "results": [{"path", "clients", "images_per_s", "p50_ms",
    "p99_ms"}], "ping": {path: {"p50_ms", "p99_ms"}, "n", "gate_p50_ms"}, "startup_s"}.
    export_archive(ckpt, store, name=, log=) builds the benchmark
    model's archive (`pixtok bench serve` passes export's; serving never imports export)."""
    from pixtok.models import build_model
    from pixtok.resize import resize_image

    per_client = 8 if quick else 48
    device = pick_device(0)     # where TorchServe puts the worker: GPU 0 when there is one
    bodies = noise_pngs(32)
    results = []
    with tempfile.TemporaryDirectory(prefix="pixtok-bench-") as tmp:
        tmp = Path(tmp)
        ckpt, model_label = bench_checkpoint(tmp)
        store = tmp / "store"
        export_archive(ckpt, store, name="bench", log=lambda *_: None)
        t0 = time.perf_counter()
        server = launcher.start(store, run_dir=tmp / "run", log=lambda *_: None,
                                ports=launcher.free_ports())
        try:
            client = server.client()
            client.classify(bodies[0], model="bench")
            startup_s = time.perf_counter() - t0
            direct = Client(server.upstream, server.run_dir)
            for clients in (1, 4, 16):     # through the gate and around it, side by side
                for path, via in (("torchserve", client), ("torchserve-direct", direct)):
                    row = drive(lambda b, via=via: via.classify(b, model="bench"), bodies,
                                clients, per_client)
                    results.append({"path": path, **row})
            ping = ping_round_trips(client, direct, 50 if quick else 300)
        finally:
            launcher.stop(tmp / "run", log=lambda *_: None)
        t0 = time.perf_counter()
        server = launcher.start_kserve(store, run_dir=tmp / "run-kserve", log=lambda *_: None,
                                       ports={"inference": launcher.free_ports()["inference"]})
        try:
            client = server.client()
            client.classify(bodies[0], model="bench")
            startup_kserve_s = time.perf_counter() - t0
            v2 = V2Caller(client, "bench")
            for clients in (1, 4, 16):
                row = drive(lambda b: client.classify(b, model="bench"), bodies, clients,
                            per_client)
                results.append({"path": "kserve", **row})
            for clients in (1, 4, 16):
                results.append({"path": "kserve-v2", **drive(v2, bodies, clients, per_client)})
        finally:
            launcher.stop(tmp / "run-kserve", log=lambda *_: None)
        core = load_classifier(ckpt, build_model, resize_image, device)
        rule = launcher.BATCHING["classify"]
        batcher = InProcessBatcher(core, rule["batchSize"], rule["maxBatchDelay"] / 1000)
        try:
            for clients in (1, 4, 16):
                results.append({"path": "in-process",
                                **drive(batcher.submit, bodies, clients, per_client)})
        finally:
            batcher.close()
    return {"suite": "serve", "model": model_label, "device": str(device),
            "results": results, "ping": ping, "startup_s": round(startup_s, 2),
            "startup_kserve_s": round(startup_kserve_s, 2)}
