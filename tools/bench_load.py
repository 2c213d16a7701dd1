"""`pixtok bench load`: mixed traffic against the running `pixtok serve` of the run folder.

    pixtok bench load [--users 16] [--seconds 60] [--mix classify=0.7,depth=0.2,generate=0.1]
                      [--ramp] [--soak MINUTES] [--json OUT] [--plot OUT.png]

The server is the one of $PIXTOK_RUN_DIR (its config.properties gives the address, its
key_file.json the key); nothing is started here and only loopback addresses are loaded. This
process makes the request bodies first (real Fashion-MNIST test images and scenes rendered by
training/data/scenes.py, from tools/load_inputs.py; generator requests with a seed) and writes
them to a temporary folder; the load itself runs in tools/load_users.py, a locust process that
imports no training code.
While it runs, this process samples the resident memory (RSS) of TorchServe's worker processes,
and of the gate in front of TorchServe (model name "gate"), every few seconds (psutil).

Modes:
- default: --users closed-loop users for --seconds;
- --ramp: stages of --seconds each, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64 users sending one
  request a second each, until the classify p99 of a stage passes 2 s (or 1% of its requests
  fail); `ramp.max_rate_under_p99` is the highest achieved rate of a stage that stayed under;
- --soak MINUTES: --users closed-loop users for that long; `memory.slope_mb_per_h` per worker is
  the least-squares slope of its RSS over the run (first 10% left out as warm-up).

The JSON: requests/s, p50/p95/p99 per route, errors by status and by type, memory samples and
slopes; --plot writes a PNG of latency and worker memory over time (and p99 against the rate
for a ramp). Figures and how they were taken: docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pixtok.errors import UserError
from pixtok.tasks import served_tasks
from tools.load_inputs import load_inputs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIX = "classify=0.7,depth=0.2,generate=0.1"
RAMP_USERS = [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64]
RAMP_P99_S = 2.0
CONTENT_TYPES = {name: t.serving.content_type for name, t in served_tasks().items()}
MODEL_ENV = {name: t.serving.model_env for name, t in served_tasks().items()}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
N_BODIES = 64


def parse_mix(text: str) -> dict[str, float]:
    """"classify=0.7,depth=0.2,generate=0.1" -> shares that add up to 1."""
    mix = {}
    for part in text.split(","):
        route, _, share = part.partition("=")
        route = route.strip()
        if route not in CONTENT_TYPES:
            raise UserError(f"--mix: unknown route {route!r}; expected classify, depth, generate")
        try:
            value = float(share)
        except ValueError:
            raise UserError(f"--mix: {part!r} is not route=share") from None
        if not value >= 0 or value == float("inf"):
            raise UserError(f"--mix: the share of {route} must be a number >= 0")
        mix[route] = value
    total = sum(mix.values())
    if total <= 0:
        raise UserError("--mix: the shares add up to 0")
    return {r: v / total for r, v in mix.items() if v > 0}


def make_bodies(mix: dict, folder: Path, labels: int = 10) -> dict[str, list[str]]:
    """Request bodies per route, written as files into folder -> {route: [paths]}: real
    Fashion-MNIST test images and rendered scenes (tools/load_inputs.py), seeded generator
    requests."""
    bodies = dict(load_inputs([r for r in mix if r != "generate"]))
    if "generate" in mix:
        bodies["generate"] = [json.dumps({"label": i % labels, "seed": i}).encode()
                              for i in range(N_BODIES)]
    paths = {}
    for route in mix:
        paths[route] = []
        for i, body in enumerate(bodies[route]):
            path = folder / f"{route}-{i:03d}.bin"
            path.write_bytes(body)
            paths[route].append(str(path))
    return paths


def worker_processes(client, models: dict) -> dict[int, str]:
    """{pid: model name} of the served models' TorchServe workers (the management API's)."""
    found = {}
    for name in models.values():
        try:
            info = client.describe(name) or {}
        except Exception:  # noqa: BLE001 - the server is busy or restarting: no sample this time
            continue
        for worker in info.get("workers", []):
            if worker.get("pid"):
                found[int(worker["pid"])] = name
    return found


def sample_memory(client, models: dict, t0: float, others: dict | None = None) -> list[dict]:
    """RSS of every worker now, and of `others` ({pid: name}, e.g. the gate)."""
    import psutil

    out = []
    for pid, name in {**worker_processes(client, models), **(others or {})}.items():
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
        out.append({"t": round(time.time() - t0, 2), "pid": pid, "model": name,
                    "rss_mb": round(rss / 2**20, 1)})
    return out


def slope_mb_per_h(points: list[tuple[float, float]], warmup: float = 0.1) -> float | None:
    """Least-squares slope of (seconds, MB) after the first `warmup` share of the time."""
    if len(points) < 3:
        return None
    t = np.array([p[0] for p in points])
    keep = t >= t.min() + warmup * (t.max() - t.min())
    if keep.sum() < 3:
        return None
    slope = np.polyfit(t[keep], np.array([p[1] for p in points])[keep], 1)[0]
    return round(float(slope) * 3600, 2)


def summarise(samples: list, seconds: float) -> dict:
    """Per route: count, requests/s, p50/p95/p99 of the answered ones; errors by status, type."""
    routes = {}
    for route in sorted({s[2] for s in samples}):
        mine = [s for s in samples if s[2] == route]
        ok = [s[3] for s in mine if s[4] == 200]
        q = np.percentile(ok, [50, 95, 99]) if ok else [None] * 3
        routes[route] = {"requests": len(mine), "ok": len(ok),
                         "requests_per_s": round(len(mine) / seconds, 3),
                         **{f"p{p}_s": (round(float(v), 3) if v is not None else None)
                            for p, v in zip((50, 95, 99), q)}}
    by_status: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for s in samples:
        if s[4] != 200:
            by_status[str(s[4])] = by_status.get(str(s[4]), 0) + 1
            by_type[str(s[5])] = by_type.get(str(s[5]), 0) + 1
    return {"requests": len(samples), "requests_per_s": round(len(samples) / seconds, 3),
            "routes": routes, "errors": {"total": sum(by_status.values()),
                                         "by_status": by_status, "by_type": by_type}}


def plan(args) -> tuple[list[dict], dict]:
    users = 16 if args.users is None else args.users
    seconds = 60.0 if args.seconds is None else args.seconds
    if users < 1 or seconds <= 0:
        raise UserError("--users must be >= 1 and --seconds > 0")
    if args.soak is not None and args.soak <= 0:
        raise UserError("--soak: minutes must be > 0")
    if args.ramp and args.soak is not None:
        raise UserError("--ramp and --soak are separate runs: choose one")
    if args.ramp:
        return ([{"users": u, "seconds": seconds, "rate_per_user": 1.0} for u in RAMP_USERS],
                {"stop_p99_s": RAMP_P99_S, "watch_route": "classify"})
    if args.soak is not None:
        return [{"users": users, "seconds": args.soak * 60, "rate_per_user": None}], {}
    return [{"users": users, "seconds": seconds, "rate_per_user": None}], {}


def served(client, mix: dict) -> dict[str, str]:
    """{route: model name}: the default model of each route in the mix, which must be READY."""
    from serving.client import DEFAULT_MODELS

    models = {}
    for route in mix:
        env = MODEL_ENV[route]                  # the page's variable for it, the same name
        name = os.environ.get(env, DEFAULT_MODELS[route])
        if not client.is_ready(name):
            raise UserError(f"model {name!r} ({route}) has no READY worker on the server of "
                            f"{client.run_dir}; set {env} or leave {route} out of --mix")
        models[route] = name
    return models


def bench_load(quick: bool = False, args=None) -> dict:
    """The load bench; args: `pixtok bench`'s options (--users, --seconds, --mix, ...)."""
    from serving.client import Client, ServerUnreachable, default_run_dir
    from serving.launcher import running_gate_pid, running_pid

    mix = parse_mix(args.mix if args else DEFAULT_MIX)
    stages, extra = plan(args)
    if quick:
        stages = [{**s, "seconds": min(s["seconds"], 10)} for s in stages[:3]]
    run_dir = Path(default_run_dir()).expanduser().resolve()
    if running_pid(run_dir) is None:
        raise UserError(f"no `pixtok serve` running for the run folder {run_dir} "
                        "(start it with `make serve`, or set PIXTOK_RUN_DIR)")
    client = Client(run_dir=run_dir, retry_seconds=0)
    if not any(host in client.base_url for host in LOOPBACK):
        raise UserError(f"{client.base_url}: the load bench only loads a loopback server")
    try:
        models = served(client, mix)
    except ServerUnreachable as e:
        raise UserError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="pixtok-load-") as tmp:
        tmp = Path(tmp)
        bodies = make_bodies(mix, tmp)
        t0 = time.time()
        spec = {"base_url": client.base_url, "run_dir": str(run_dir), "t0": t0,
                "stages": stages, **extra,
                "routes": {r: {"model": models[r], "content_type": CONTENT_TYPES[r],
                               "share": share, "bodies": bodies[r]}
                           for r, share in mix.items()}}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        total = sum(s["seconds"] for s in stages)
        proc = subprocess.Popen([sys.executable, "-m", "tools.load_users",
                                 str(tmp / "spec.json"), str(tmp / "out.json")],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        memory, period = [], max(1.0, min(30.0, total / 200))
        gate = running_gate_pid(run_dir)
        others = {gate: "gate"} if gate else {}      # the proxy in front of TorchServe
        deadline = time.monotonic() + total + 120          # bounded: the stages, then a margin
        while proc.poll() is None:
            memory += sample_memory(client, models, t0, others)
            if time.monotonic() > deadline:
                proc.kill()
                break
            time.sleep(period)
        _, err = proc.communicate()
        if proc.returncode != 0 or not (tmp / "out.json").is_file():
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["killed"]
            raise UserError(f"the load process failed: {tail[0]}")
        out = json.loads((tmp / "out.json").read_text())
    return report(out, stages, memory, mix, models, args)


def report(out: dict, stages: list, memory: list, mix: dict, models: dict, args) -> dict:
    samples = out["samples"]
    run = [stages[i] for i in out["stages_run"]]
    seconds = sum(s["seconds"] for s in run) or 1
    result = {"suite": "load", "mode": "ramp" if args and args.ramp else
              "soak" if args and args.soak is not None else "fixed",
              "server_models": models, "mix": mix, "users": run[-1]["users"] if run else 0,
              "seconds": seconds, "locust": out["locust"], "cpu_count": os.cpu_count(),
              "load_average": [round(x, 2) for x in os.getloadavg()],
              **summarise(samples, seconds)}
    if args and args.ramp:
        table = []
        for i in out["stages_run"]:
            row = summarise([s for s in samples if s[0] == i], stages[i]["seconds"])
            table.append({"users": stages[i]["users"], "offered_per_s": stages[i]["users"],
                          "achieved_per_s": row["requests_per_s"],
                          "classify_p99_s": row["routes"].get("classify", {}).get("p99_s"),
                          "errors": row["errors"]["total"]})
        under = [r for r in table if r["classify_p99_s"] is not None
                 and r["classify_p99_s"] <= RAMP_P99_S and r["errors"] <= 0.01 * max(
                     1, r["achieved_per_s"] * stages[0]["seconds"])]
        result["ramp"] = {"p99_limit_s": RAMP_P99_S, "stages": table,
                          "max_rate_under_p99": max((r["achieved_per_s"] for r in under),
                                                    default=None)}
    by_worker: dict[int, list] = {}
    for m in memory:
        by_worker.setdefault(m["pid"], []).append(m)
    result["memory"] = {"samples": memory, "workers": {
        str(pid): {"model": ms[0]["model"], "first_mb": ms[0]["rss_mb"],
                   "last_mb": ms[-1]["rss_mb"], "max_mb": max(m["rss_mb"] for m in ms),
                   "slope_mb_per_h": slope_mb_per_h([(m["t"], m["rss_mb"]) for m in ms])}
        for pid, ms in by_worker.items()}}
    if args and getattr(args, "plot", None):
        plot(result, samples, Path(args.plot))
        result["plot"] = str(args.plot)
    return result


def plot(result: dict, samples: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "ramp" in result else 2
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels))
    for route in sorted({s[2] for s in samples}):
        pts = [(s[1], s[3]) for s in samples if s[2] == route and s[4] == 200]
        if pts:
            axes[0].scatter(*zip(*pts), s=4, label=route)
        bad = [(s[1], s[3]) for s in samples if s[2] == route and s[4] != 200]
        if bad:
            axes[0].scatter(*zip(*bad), s=10, marker="x", label=f"{route} errors")
    axes[0].set(xlabel="time (s)", ylabel="latency (s)", yscale="log",
                title=f"pixtok bench load: {result['requests_per_s']} req/s, "
                      f"{result['errors']['total']} errors")
    axes[0].legend(fontsize=7)
    by_worker: dict = {}
    for m in result["memory"]["samples"]:
        by_worker.setdefault((m["pid"], m["model"]), []).append((m["t"], m["rss_mb"]))
    for (pid, model), pts in by_worker.items():
        axes[1].plot(*zip(*pts), label=f"{model} ({pid})")
    axes[1].set(xlabel="time (s)", ylabel="worker RSS (MB)")
    if by_worker:
        axes[1].legend(fontsize=7)
    if "ramp" in result:
        rows = [r for r in result["ramp"]["stages"] if r["classify_p99_s"] is not None]
        axes[2].plot([r["achieved_per_s"] for r in rows], [r["classify_p99_s"] for r in rows],
                     "o-")
        axes[2].axhline(RAMP_P99_S, color="grey", linestyle="--")
        axes[2].set(xlabel="achieved requests/s", ylabel="classify p99 (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
