"""`pixtok bench drill`: a worker-kill drill against the running `pixtok serve` of the run folder.

    pixtok bench drill [--users 6] [--seconds 20] [--json OUT]       (docs/reliability.md)

--users threads of the retrying client (serving/client.py) send classify, depth and seeded generate
requests in a loop; after --seconds, and then every --seconds, one worker of each served
default model is SIGKILLed in turn.
For each kill it measures the seconds until TorchServe has a new READY worker for that model;
over the whole run it counts requests sent, answered and lost (an error the retrying client
gave up on), and the client's retries. Prints one JSON object. It kills only workers of the
run folder's server (their pids come from its management API) and sends to loopback only.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from pixtok.errors import UserError
from serving.bench_load import CONTENT_TYPES, LOOPBACK, make_bodies, served
from serving.client import Client, default_run_dir
from serving.launcher import running_pid


def drill(inputs, threads: int = 6, settle: float = 20.0, ready_limit: float = 300.0) -> dict:
    """inputs: as for serving.bench_load.make_bodies (pixtok's CLI passes it)."""
    run_dir = Path(default_run_dir()).expanduser().resolve()
    if running_pid(run_dir) is None:
        raise UserError(f"no `pixtok serve` running for the run folder {run_dir}")
    probe = Client(run_dir=run_dir, retry_seconds=0)
    if not any(host in probe.base_url for host in LOOPBACK):
        raise UserError(f"{probe.base_url}: the drill only runs against a loopback server")
    models = {}
    for route in ("classify", "depth", "generate"):     # the routes whose model is served
        try:
            models.update(served(probe, {route: 1.0}))
        except UserError:
            continue
    if not models:
        raise UserError(f"no model of the server of {run_dir} is READY (PIXTOK_CLASSIFIER, "
                        "PIXTOK_DEPTH_MODEL, PIXTOK_GENERATOR name them)")
    mix = dict.fromkeys(models, 1.0)
    with tempfile.TemporaryDirectory(prefix="pixtok-drill-") as tmp:
        paths = make_bodies(mix, Path(tmp), inputs)
        bodies = {r: [Path(p).read_bytes() for p in ps] for r, ps in paths.items()}
    client = Client(run_dir=run_dir, retry_seconds=120)
    stop = threading.Event()
    counts = {"sent": 0, "answered": 0, "lost": 0}
    lost: list[str] = []
    lock = threading.Lock()
    routes = [r for r, n in (("classify", 4), ("depth", 1), ("generate", 1)) if r in models
              for _ in range(n)]

    def user(i: int):
        k = 0
        while not stop.is_set():
            route = routes[(i + k) % len(routes)]
            body = bodies[route][k % len(bodies[route])]
            k += 1
            with lock:
                counts["sent"] += 1
            try:
                client.predict(models[route], body, CONTENT_TYPES[route])
                with lock:
                    counts["answered"] += 1
            except UserError as e:
                with lock:
                    counts["lost"] += 1
                    lost.append(f"{route}: {e}")

    workers = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    kills = []
    try:
        time.sleep(settle)
        for model in models.values():
            old = probe.describe(model)["workers"][0]["pid"]
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            ready_s = None
            while time.monotonic() - t0 < ready_limit:
                info = probe.describe(model) or {}
                if any(w.get("status") == "READY" and w["pid"] != old
                       for w in info.get("workers", [])):
                    ready_s = round(time.monotonic() - t0, 2)
                    break
                time.sleep(0.25)
            kills.append({"model": model, "killed_pid": old, "ready_again_s": ready_s})
            time.sleep(settle)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=700)
    return {"drill": "worker-kill", "threads": threads, "models": models, "kills": kills,
            **counts, "retries": client.retries, "lost_examples": lost[:5],
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def bench_drill(quick: bool = False, args=None, inputs=None) -> dict:
    threads = args.users if args and args.users is not None else 6
    settle = args.seconds if args and args.seconds is not None else 20.0
    if threads < 1 or settle <= 0:
        raise UserError("--users must be >= 1 and --seconds > 0")
    return drill(inputs, threads, min(settle, 5.0) if quick else settle)
