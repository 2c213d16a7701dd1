"""Worker-kill drill against the running `pixtok serve` of the run folder (docs/reliability.md).

    python -m serving.fault_drill [--threads 6] [--settle 20] [--json OUT]

Threads of the retrying client (serving/client.py) send classify, depth and seeded generate
requests in a loop; meanwhile one worker of each served default model is SIGKILLed in turn.
For each kill it measures the seconds until TorchServe has a new READY worker for that model;
over the whole run it counts requests sent, answered and lost (an error the retrying client
gave up on), and the client's retries. Prints one JSON object. It kills only workers of the
run folder's server (their pids come from its management API) and sends to loopback only.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from pixtok.errors import UserError
from serving.bench_load import CONTENT_TYPES, make_bodies, served
from serving.client import Client, default_run_dir
from serving.launcher import running_pid


def drill(threads: int = 6, settle: float = 20.0, ready_limit: float = 300.0) -> dict:
    run_dir = Path(default_run_dir()).expanduser().resolve()
    if running_pid(run_dir) is None:
        raise UserError(f"no `pixtok serve` running for the run folder {run_dir}")
    probe = Client(run_dir=run_dir, retry_seconds=0)
    mix = {"classify": 0.7, "depth": 0.2, "generate": 0.1}
    models = served(probe, mix)
    with tempfile.TemporaryDirectory(prefix="pixtok-drill-") as tmp:
        paths = make_bodies(mix, Path(tmp))
        bodies = {r: [Path(p).read_bytes() for p in ps] for r, ps in paths.items()}
    client = Client(run_dir=run_dir, retry_seconds=120)
    stop = threading.Event()
    counts = {"sent": 0, "answered": 0, "lost": 0}
    lost: list[str] = []
    lock = threading.Lock()
    routes = ["classify"] * 4 + ["depth"] * 1 + ["generate"] * 1

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.fault_drill",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds of load before the first kill and after each")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    try:
        result = drill(args.threads, args.settle)
    except UserError as e:
        print(f"fault_drill: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
