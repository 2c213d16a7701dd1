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
from serving.client import Client, default_run_dir
from serving.launcher import running_pid
from tools.bench_load import CONTENT_TYPES, LOOPBACK, make_bodies, served


def drill_models(run_dir: Path, probe: Client) -> dict[str, str]:
    """{route: model} of the loopback server of run_dir whose models are READY."""
    if running_pid(run_dir) is None:
        raise UserError(f"no `pixtok serve` running for the run folder {run_dir}")
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
    return models


class Traffic:
    """Threads that send requests round the routes through a retrying client until stopped,
    counting what was sent, answered and lost (an error after the client's retries)."""

    def __init__(self, client: Client, models: dict, bodies: dict, threads: int):
        self.client, self.models, self.bodies = client, models, bodies
        self.routes = [r for r, n in (("classify", 4), ("depth", 1), ("generate", 1))
                       if r in models for _ in range(n)]
        self.counts = {"sent": 0, "answered": 0, "lost": 0}
        self.lost: list[str] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.workers = [threading.Thread(target=self.user, args=(i,), daemon=True)
                        for i in range(threads)]

    def count(self, key: str, lost: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if lost:
                self.lost.append(lost)

    def user(self, i: int) -> None:
        k = 0
        while not self.stop.is_set():
            route = self.routes[(i + k) % len(self.routes)]
            body = self.bodies[route][k % len(self.bodies[route])]
            k += 1
            self.count("sent")
            try:
                self.client.predict(self.models[route], body, CONTENT_TYPES[route])
                self.count("answered")
            except Exception as e:   # noqa: BLE001 - anything a user's request would have hit
                self.count("lost", f"{route}: {type(e).__name__}: {e}")

    def __enter__(self):
        for w in self.workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for w in self.workers:
            w.join(timeout=700)


def kill_worker(probe: Client, model: str, ready_limit: float) -> dict:
    """SIGKILL the model's worker; seconds until a new one is READY (None: not within limit)."""
    old = probe.describe(model)["workers"][0]["pid"]
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    while time.monotonic() - t0 < ready_limit:
        info = probe.describe(model) or {}
        if any(w.get("status") == "READY" and w["pid"] != old for w in info.get("workers", [])):
            return {"model": model, "killed_pid": old,
                    "ready_again_s": round(time.monotonic() - t0, 2)}
        time.sleep(0.25)
    return {"model": model, "killed_pid": old, "ready_again_s": None}


def drill(threads: int = 6, settle: float = 20.0, ready_limit: float = 300.0) -> dict:
    """`threads` users of the retrying client; after `settle` seconds, and `settle` seconds
    after each kill, one worker of the next served model is SIGKILLed -> the drill's JSON."""
    run_dir = Path(default_run_dir()).expanduser().resolve()
    probe = Client(run_dir=run_dir, retry_seconds=0)
    models = drill_models(run_dir, probe)
    with tempfile.TemporaryDirectory(prefix="pixtok-drill-") as tmp:
        paths = make_bodies(dict.fromkeys(models, 1.0), Path(tmp))
        bodies = {r: [Path(p).read_bytes() for p in ps] for r, ps in paths.items()}
    # an accepted request that is merely slow (a contended machine) is waited for: lost means
    # an error the retries could not get past, not a slow answer
    client = Client(run_dir=run_dir, timeout=600, retry_seconds=300)
    kills = []
    with Traffic(client, models, bodies, threads) as traffic:
        time.sleep(settle)
        for model in models.values():
            kills.append(kill_worker(probe, model, ready_limit))
            time.sleep(settle)
    return {"drill": "worker-kill", "threads": threads, "models": models, "kills": kills,
            **traffic.counts, "retries": client.retries, "lost_examples": traffic.lost[:5],
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def bench_drill(quick: bool = False, args=None) -> dict:
    threads = args.users if args and args.users is not None else 6
    settle = args.seconds if args and args.seconds is not None else 20.0
    if threads < 1 or settle <= 0:
        raise UserError("--users must be >= 1 and --seconds > 0")
    return drill(threads, min(settle, 5.0) if quick else settle)
