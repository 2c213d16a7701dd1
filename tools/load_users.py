"""The load loop of `pixtok bench load`: locust users, run as a library in a process of their own.

`python -m tools.load_users SPEC.json OUT.json` (started by tools/bench_load.py). locust
patches the standard library for gevent when it is imported, so it runs here, away from the
process that made the request bodies (that one imports training code and numpy; this one imports
neither). The spec names the server, the routes and their shares, the request bodies (files in
a folder), and the stages: [{"users", "seconds", "rate_per_user"}]; rate_per_user null means
closed loop (each user sends its next request as soon as the last one is answered). Every
request is written to OUT.json as [stage, start offset s, route, latency s, status, error type].
A ramp (spec "stop_p99_s") ends after the first stage whose p99 on spec "watch_route" is over it.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import gevent
import locust  # before serving.client: it patches the standard library for gevent
from locust import HttpUser, constant, constant_throughput, task
from locust.env import Environment

from serving.client import Client, Response, is_key_refused

ROUTE_TIMEOUT_S = {"classify": 60, "depth": 120, "generate": 600}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, interpolated linearly as numpy's default (the report's) does."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_user(spec: dict, keys: Client, samples: list, stage: list):
    routes = spec["routes"]          # {route: {"model", "content_type", "share", "bodies": [...]}}
    bodies = {r: [Path(p).read_bytes() for p in v["bodies"]] for r, v in routes.items()}
    names, weights = list(routes), [routes[r]["share"] for r in routes]
    t0 = spec["t0"]

    class PixtokUser(HttpUser):
        host = spec["base_url"]
        wait_time = constant(0)

        def on_start(self):
            self.rng = random.Random(id(self))
            self.client.trust_env = False    # loopback only: never through an http_proxy

        @task
        def one(self):
            route = self.rng.choices(names, weights)[0]
            info = routes[route]
            body = self.rng.choice(bodies[route])
            for _ in range(3):          # a refused (expired) key is renewed, not counted
                key = keys.key("inference")
                headers = {"Content-Type": info["content_type"]}
                if key:
                    headers["Authorization"] = f"Bearer {key}"
                start = time.time()
                with self.client.post(f"/predictions/{info['model']}", data=body,
                                      headers=headers, name=route, catch_response=True,
                                      timeout=ROUTE_TIMEOUT_S[route]) as r:
                    latency = time.time() - start
                    status = r.status_code or 0
                    answer = Response(status, dict(r.headers or {}), r.content or b"")
                    if status and is_key_refused(answer):
                        keys.refresh_key("inference", key)
                        r.success()          # not a server failure: the key rolled over
                        continue
                    if status == 200:
                        r.success()
                        kind = None
                    else:
                        kind = (answer.json().get("type") if status
                                else type(r.error).__name__ if r.error else "no_answer")
                        r.failure(f"{status} {kind}")
                samples.append([stage[0], round(start - t0, 3), route, round(latency, 4),
                                status, kind])
                return

    if spec["stages"][0].get("rate_per_user"):
        PixtokUser.wait_time = constant_throughput(spec["stages"][0]["rate_per_user"])
    return PixtokUser


def run(spec: dict) -> dict:
    keys = Client(spec["base_url"], spec["run_dir"], retry_seconds=0)
    samples: list = []
    stage = [0]
    user = make_user(spec, keys, samples, stage)
    env = Environment(user_classes=[user], host=spec["base_url"])
    runner = env.create_local_runner()
    done_stages = []
    try:
        for i, st in enumerate(spec["stages"]):
            stage[0] = i
            first = len(samples)
            runner.start(st["users"], spawn_rate=max(st["users"], 1))
            gevent.sleep(st["seconds"])
            done_stages.append(i)
            limit, watch = spec.get("stop_p99_s"), spec.get("watch_route", "classify")
            if limit is not None:
                lat = [s[3] for s in samples[first:] if s[2] == watch]
                errors = sum(1 for s in samples[first:] if s[4] != 200)
                p99 = percentile(lat, 99)
                if p99 is None or p99 > limit or errors > 0.01 * max(len(samples) - first, 1):
                    break
    finally:
        runner.quit()
        runner.greenlet.join(timeout=10)
    return {"samples": samples, "stages_run": done_stages, "locust": locust.__version__}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
