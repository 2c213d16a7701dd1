"""TorchServe's config.properties for a run (serving/config.properties filled in), the per-task
batching and overload settings it carries, and the environment TorchServe's workers run in."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from string import Template

from pixtok.inference.validate import MAX_BODY_BYTES
from pixtok.tasks import served_tasks
from serving.client import read_properties
from serving.run_folder import ServeError, bracketed, positive_int_env

TEMPLATE = Path(__file__).with_name("config.properties")
# task -> TorchServe batching, as the task registry (pixtok/tasks.py) gives it
BATCHING = {name: dict(t.serving.batching) for name, t in served_tasks().items()}
# BATCHING's settings an operator may set: $PIXTOK_<TASK>_<suffix>, e.g. PIXTOK_CLASSIFY_BATCH_SIZE
BATCHING_ENV = {"batchSize": ("BATCH_SIZE", 1), "maxBatchDelay": ("MAX_BATCH_DELAY_MS", 0),
                "workers": ("WORKERS", 1)}      # setting -> (variable suffix, smallest value)
# TorchServe answers a body over max_request_size with a bare 413 (no JSON) and a reset
# connection; set above the handler's own limit, bodies up to twice it get the handler's JSON 413.
MAX_REQUEST_BYTES = 2 * MAX_BODY_BYTES
MAX_RESPONSE_BYTES = 64 * 2**20       # 16 generated images as base64 PNGs fit with room
# overload (docs/reliability.md): how many requests may wait per model (TorchServe's job queue;
# one more is answered 503 at once), and how long a worker may take over one batch before
# TorchServe kills and restarts it (responseTimeout; by default 120 s, a generator's 600 s).
# TorchServe 0.12 ignores clientTimeoutInMills given here, so the wait in the queue is bounded
# by the queue's size, not by a timeout.
QUEUE_SIZE_ENV, RESPONSE_TIMEOUT_ENV = "PIXTOK_QUEUE_SIZE", "PIXTOK_RESPONSE_TIMEOUT_S"
THREADS_ENV = "PIXTOK_WORKER_THREADS"   # torch threads per TorchServe worker (worker_threads)
DEFAULT_QUEUE_SIZE = 100


def grpc_host() -> str:
    """Where gRPC listens: 127.0.0.1, whatever `--host` says, unless PIXTOK_GRPC_HOST opens it."""
    return os.environ.get("PIXTOK_GRPC_HOST", "").strip() or "127.0.0.1"


def overload_settings() -> tuple[dict, dict]:
    """(settings for every model, settings that override the task's BATCHING) from
    PIXTOK_QUEUE_SIZE and PIXTOK_RESPONSE_TIMEOUT_S."""
    settings = {"jobQueueSize": positive_int_env(QUEUE_SIZE_ENV, DEFAULT_QUEUE_SIZE)}
    timeout_s = positive_int_env(RESPONSE_TIMEOUT_ENV, 0, minimum=0)
    return settings, ({"responseTimeout": timeout_s} if timeout_s else {})


def batching(task: str) -> dict:
    """A task's TorchServe model settings: BATCHING's, each overridable by its variable."""
    settings = dict(BATCHING.get(task, BATCHING["classify"]))
    for key, (suffix, least) in BATCHING_ENV.items():
        settings[key] = positive_int_env(f"PIXTOK_{task.upper()}_{suffix}", settings[key], least)
    workers = settings.pop("workers")
    return {"minWorkers": workers, "maxWorkers": workers, "responseTimeout": 120, **settings}


def render_config(run_dir: Path, store: Path, host: str, ports: dict, models: dict,
                  token_expiration_min: float | None = None, gated: bool = False) -> Path:
    """Fill serving/config.properties in for this run; values are escaped for Java properties.
    gated: the inference, management and gRPC APIs listen on 127.0.0.1 (the gate answers on
    `host`, gRPC on PIXTOK_GRPC_HOST); else gRPC listens on PIXTOK_GRPC_HOST, default 127.0.0.1."""
    overload, forced = overload_settings()
    per_model = {name: {version: {"defaultVersion": True, "marName": mar, **overload,
                                  **batching(task), **forced}}
                 for name, (mar, version, task) in models.items()}
    values = {
        "host": host, "address": bracketed(host),
        "grpc_address": "127.0.0.1" if gated else grpc_host(),
        "inference_address": bracketed("127.0.0.1" if gated else host),
        "management_address": bracketed("127.0.0.1" if gated else host),
        **{f"{api}_port": number for api, number in ports.items()},
        "token_expiration_min": token_expiration_min
        or os.environ.get("PIXTOK_TOKEN_EXPIRATION_MIN", "60"),
        "model_store": str(store),
        "allowed_urls": f"file://{re.escape(str(store))}/.*",
        "load_models": ",".join(mar for mar, _, _ in models.values()),
        "models": json.dumps(per_model),
        "max_request_size": MAX_REQUEST_BYTES, "max_response_size": MAX_RESPONSE_BYTES,
        "job_queue_size": overload["jobQueueSize"],
    }
    # a .properties value treats a backslash as an escape: double them (allowed_urls has some)
    escaped = {k: str(v).replace("\\", "\\\\") for k, v in values.items()}
    path = run_dir / "config.properties"
    path.write_text(Template(TEMPLATE.read_text()).substitute(escaped))
    os.chmod(path, 0o600)
    return path


def install_config(run_dir: Path, config: Path) -> Path:
    """A finished config.properties (a KServe one, say) copied into the run folder (0600)."""
    path = run_dir / "config.properties"
    try:
        text = Path(config).read_text()
    except OSError as e:
        raise ServeError(f"{config}: cannot read the TorchServe config ({e.strerror})") from None
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def snapshot_models(config: Path) -> list[str]:
    """The model names of a config's model_snapshot ([] without one)."""
    snapshot = read_properties(config).get("model_snapshot")
    if not snapshot:
        return []
    try:
        return list(json.loads(snapshot)["models"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ServeError(f"{config}: model_snapshot is not TorchServe's snapshot JSON "
                         '{"name", "modelCount", "models": {...}}') from None


def worker_threads(models: dict) -> int:
    """Torch threads per TorchServe worker: PIXTOK_WORKER_THREADS, else OMP_NUM_THREADS where
    the user set it, else the usable CPUs shared out between all the workers (at least 1). Every
    worker left at torch's default (one thread per core) oversubscribes the cores as soon as two
    are busy, and OpenMP's threads then wait on each other: docs/reliability.md measures it."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip():
            return positive_int_env(name, 1)
    workers = sum(batching(task)["minWorkers"] for _, _, task in models.values())
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))


def torchserve_env(run_dir: Path, threads: int | None = None) -> dict:
    """The environment TorchServe and its workers run in: no PYTHONPATH, so an archive that is
    not self-contained fails here instead of on a user's server; temp files in the run folder;
    OMP_NUM_THREADS = `threads`, which torch in each worker takes as its thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TS_CONFIG_FILE")}
    tmp = str(run_dir / "tmp")
    env.update(TMPDIR=tmp, TEMP=tmp, LOG_LOCATION=str(run_dir / "logs"),
               METRICS_LOCATION=str(run_dir / "logs"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


