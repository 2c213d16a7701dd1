"""`pixtok serve` / `pixtok serve --stop`: TorchServe on the model store, state in one run folder.

The run folder ($PIXTOK_RUN_DIR, default ~/.cache/pixtok/run/, mode 0700) holds everything a
server writes: config.properties, key_file.json (TorchServe writes it into its working directory,
which is this folder), logs/, and tmp/ with TorchServe's pid file, worker sockets and unpacked
archives. TorchServe's own "one server per machine" pid file lives in $TMPDIR, so pointing
TMPDIR at tmp/ lets two run folders (a user's server and a test's) run side by side.

TorchServe's inference API listens on a loopback port of its own; pixtok's gate
(serving/gate.py, a reverse proxy; pid file tmp/gate.pid, output logs/gate.out, its address in
gate.json) answers on the inference port in front of it and gives the overload answers TorchServe
cannot (Retry-After, a request timeout). PIXTOK_GATE=off leaves it out.

Unless --no-ui, the Gradio front end (serving/gradio_app.py, a REST client) then starts as a
process of its own: pid file gradio.pid, output logs/gradio.out, Gradio's temp files tmp/gradio/.
Beyond loopback the page asks for a login (user pixtok; $PIXTOK_UI_PASSWORD or a password made
at each start, kept in ui_password, mode 0600, and printed once).

`pixtok serve --foreground` (a container's entry point) then stays until SIGTERM/SIGINT (exit 0)
or until TorchServe or the gate dies (exit 1), and stops the page, TorchServe and its workers and
the gate either way.

`pixtok serve --server kserve` runs KServe's ModelServer (serving/kserve_server.py) on the same
archives instead, as one process on the inference port (pid file tmp/kserve.pid, output
logs/kserve.out). The launcher writes its key_file.json (a fresh inference key, TorchServe's
format, mode 0600) and a config.properties that only describes it (server=kserve, the inference
address, the model store and its models), so serving/client.py and the page find it as they find
TorchServe. `pixtok serve --stop` stops whichever server runs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from pixtok.archive import read_archive_json
from pixtok.errors import UserError
from pixtok.inference.validate import MAX_BODY_BYTES
from serving.client import PORTS, Client, default_run_dir, local_url, read_properties
from serving.load_failures import LoadFailures, load_attempts

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("config.properties")
BATCHING = {   # task -> TorchServe batching; a generator batches inside one request instead
    "classify": {"batchSize": 16, "maxBatchDelay": 10, "workers": 1},
    "depth": {"batchSize": 4, "maxBatchDelay": 10, "workers": 1},
    # 16 images x 1000 steps on a CPU worker takes minutes, not TorchServe's default 120 s
    "generate": {"batchSize": 1, "maxBatchDelay": 0, "workers": 1, "responseTimeout": 600},
}
# BATCHING's settings an operator may set: $PIXTOK_<TASK>_<suffix>, e.g. PIXTOK_CLASSIFY_BATCH_SIZE
BATCHING_ENV = {"batchSize": ("BATCH_SIZE", 1), "maxBatchDelay": ("MAX_BATCH_DELAY_MS", 0),
                "workers": ("WORKERS", 1)}      # setting -> (variable suffix, smallest value)
# TorchServe answers a body over max_request_size with a bare 413 (no JSON) and a reset
# connection; set above the handler's own limit, bodies up to twice it get the handler's JSON 413.
MAX_REQUEST_BYTES = 2 * MAX_BODY_BYTES
MAX_RESPONSE_BYTES = 64 * 2**20       # 16 generated images as base64 PNGs fit with room
SERVER_CLASS = "org.pytorch.serve.ModelServer"
KSERVE_MODULE = "serving.kserve_server"
SERVERS = ("torchserve", "kserve")
UI_MODULE = "serving.gradio_app"
GATE_MODULE = "serving.gate"
GATE_ENV = "PIXTOK_GATE"     # on (default): serving/gate.py answers on the inference port
REQUEST_TIMEOUT_ENV = "PIXTOK_REQUEST_TIMEOUT_S"   # the gate's limit on a request's wait
UI_MODEL_FLAGS = {"classify": "--classifier", "depth": "--depth-model", "generate": "--generator"}
# overload (docs/reliability.md): how many requests may wait per model (TorchServe's job queue;
# one more is answered 503 at once), and how long a worker may take over one batch before
# TorchServe kills and restarts it (responseTimeout; by default 120 s, a generator's 600 s).
# TorchServe 0.12 ignores clientTimeoutInMills given here, so the wait in the queue is bounded
# by the queue's size, not by a timeout.
QUEUE_SIZE_ENV, RESPONSE_TIMEOUT_ENV = "PIXTOK_QUEUE_SIZE", "PIXTOK_RESPONSE_TIMEOUT_S"
THREADS_ENV = "PIXTOK_WORKER_THREADS"   # torch threads per TorchServe worker (worker_threads)
DEFAULT_QUEUE_SIZE = 100


class ServeError(UserError):
    """The server cannot start, is already running, or did not come up."""


@dataclass
class Server:
    """A running `pixtok serve`: where it listens and where its state is."""
    run_dir: Path
    pid: int
    host: str
    ports: dict
    models: list[str] = field(default_factory=list)
    broken: dict = field(default_factory=dict)      # {name: why} of damaged models left out
    kind: str = "torchserve"
    upstream: str | None = None      # TorchServe's own inference URL when the gate is in front

    @property
    def inference_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.ports['metrics']}/metrics"

    def client(self, timeout: float = 120.0) -> Client:
        management = self.management_url if self.kind == "torchserve" else None
        return Client(self.inference_url, self.run_dir, management, timeout)


def bracketed(host: str) -> str:
    """A host as it appears in a URL: IPv6 addresses go in brackets."""
    return f"[{host}]" if ":" in host else host


def url_host(host: str) -> str:
    """Where a client reaches a server bound to host: all interfaces are reached locally."""
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    return bracketed(local.get(host, host))


def free_ports() -> dict:
    """A port that nothing listens on right now for every API (tests, benchmarks)."""
    socks = [socket.socket() for _ in PORTS]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {api: s.getsockname()[1] for api, s in zip(PORTS, socks)}
    finally:
        for s in socks:
            s.close()


def ports_from_env() -> dict:
    ports = {}
    for api, (env, default) in PORTS.items():
        value = os.environ.get(env, str(default))
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ServeError(f"{env}={value!r}: expected a port number 1..65535")
        ports[api] = int(value)
    return ports


def prepare_run_dir(run_dir=None) -> Path:
    """The run folder, created private (0700) with its logs/ and tmp/."""
    run_dir = Path(run_dir or default_run_dir()).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "tmp").mkdir(exist_ok=True)
    return run_dir


def pid_file(run_dir: Path) -> Path:
    return Path(run_dir) / "tmp" / ".model_server.pid"


def live_pid(path: Path, marker: str) -> int | None:
    """The pid that the pid file `path` holds, if that process is alive and its command line
    names `marker` (a recycled pid does not count); a stale pid file is removed."""
    import psutil

    try:
        pid = int(path.read_text().strip())
        if marker in psutil.Process(pid).cmdline():
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    path.unlink(missing_ok=True)
    return None


def running_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's TorchServe if it is alive."""
    return live_pid(pid_file(run_dir), SERVER_CLASS)


def kserve_pid_file(run_dir: Path) -> Path:
    return Path(run_dir) / "tmp" / "kserve.pid"


def running_kserve_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's KServe ModelServer if it is alive."""
    return live_pid(kserve_pid_file(run_dir), KSERVE_MODULE)


def running_server(run_dir: Path) -> tuple[str, int] | None:
    """(kind, pid) of the server this run folder runs, or None."""
    pid = running_pid(run_dir)
    if pid is not None:
        return "torchserve", pid
    pid = running_kserve_pid(run_dir)
    return ("kserve", pid) if pid is not None else None


def check_ports_free(host: str, ports: dict) -> None:
    for api, number in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, number))
            except OSError as e:
                raise ServeError(f"cannot listen on {host}:{number} for the {api} API "
                                 f"({e.strerror}); set {PORTS[api][0]} to a free port") from None


def model_store_path(model_store=None) -> Path:
    """The model store: the argument, $PIXTOK_MODEL_STORE, or the repository's model_store/."""
    store = Path(model_store or os.environ.get("PIXTOK_MODEL_STORE") or ROOT / "model_store")
    return store.expanduser().resolve()


def collect_models(store: Path, broken: dict | None = None) -> dict[str, tuple[str, str, str]]:
    """{model name: (archive, version, task)} for the archives in the store.

    TorchServe names a model by the archive's manifest, not by its file name. A damaged model
    (an archive that cannot be read, or one `broken` already names: its checkpoint folder could
    not be built) is left out and noted in `broken` as {name: one-line reason}; the others are
    served."""
    broken = {} if broken is None else broken
    models = {}
    for mar in sorted(store.glob("*.mar")):
        if mar.stem in broken:      # its folder is damaged: an older archive is not served
            continue
        manifest = read_archive_json(mar, "MAR-INF/MANIFEST.json")
        if manifest is None:
            why = cannot_open(mar) or ("not a readable TorchServe archive (damaged or cut "
                                       "short: no MAR-INF/MANIFEST.json)")
            broken[mar.stem] = f"{mar}: {why}"
            continue
        name = manifest.get("model", {}).get("modelName", mar.stem)
        version = manifest.get("model", {}).get("modelVersion", "1.0")
        if name in models:
            raise ServeError(f"{mar.name} and {models[name][0]} both hold a model named {name!r}")
        task = (read_archive_json(mar, "config.json") or {}).get("task", "classify")
        models[name] = (mar.name, version, task)
    return models


def cannot_open(path: Path) -> str | None:
    """Why a file cannot be opened for reading (no permission, say), or None if it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"


def positive_int_env(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, str(default)).strip()
    if not value.isdigit() or int(value) < minimum:
        raise ServeError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


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
    gated: the inference API listens on 127.0.0.1 (the gate answers on `host`)."""
    overload, forced = overload_settings()
    per_model = {name: {version: {"defaultVersion": True, "marName": mar, **overload,
                                  **batching(task), **forced}}
                 for name, (mar, version, task) in models.items()}
    values = {
        "host": host, "address": bracketed(host),
        "grpc_address": os.environ.get("PIXTOK_GRPC_HOST", "").strip() or "127.0.0.1",
        "inference_address": bracketed("127.0.0.1" if gated else host),
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


def log_tail(run_dir: Path, lines: int = 5) -> str:
    path = run_dir / "logs" / "model_log.log"
    if not path.is_file():
        path = run_dir / "logs" / "torchserve.out"
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:])


def wait_ready(server: Server, timeout: float, failures: LoadFailures | None = None) -> dict:
    """Until every model has a READY worker (the management API; /ping is not enough) or has
    failed to load as often as `failures` allows; returns {model: why} of the latter."""
    client = server.client(timeout=10)
    deadline = time.monotonic() + timeout
    waiting = list(server.models)
    bar = ready_bar(waiting)
    with cleared_on_error(bar):
        return wait_each_ready(server, client, waiting, deadline, timeout, bar, failures)


@contextlib.contextmanager
def cleared_on_error(bar):
    """Close a bar when the block ends; on an error clear it first, so that the error is the
    one line it leaves on stderr."""
    try:
        yield bar
    except BaseException:
        bar.leave = False
        bar.close()
        raise
    bar.close()


def ready_bar(models: list[str]):
    """A bar on stderr over the models that have a READY worker (or were given up on); its
    description names the ones still loading. TQDM_DISABLE=1 turns it off."""
    from tqdm import tqdm

    return tqdm(total=len(models), desc=waiting_for(models), unit="model", dynamic_ncols=True,
                file=sys.stderr)


def waiting_for(models: list[str]) -> str:
    return f"pixtok serve: waiting for READY: {', '.join(models)}" if models else \
        "pixtok serve: every model READY"


def wait_each_ready(server: Server, client: Client, waiting: list[str], deadline: float,
                    timeout: float, bar, failures: LoadFailures | None) -> dict:
    failed = {}
    while waiting:
        if running_pid(server.run_dir) is None:
            raise ServeError(f"TorchServe exited while starting; see {server.run_dir / 'logs'} "
                             f"({log_tail(server.run_dir)})")
        try:
            still = [m for m in waiting if not client.is_ready(m)]
        except UserError:
            still = waiting    # the management API is not listening yet
        if failures is not None:
            failed.update(failures.failed(still))
            still = [m for m in still if m not in failed]
        if still != waiting:
            bar.update(len(waiting) - len(still))
            bar.set_description(waiting_for(still))
            waiting = still
        if waiting and time.monotonic() > deadline:
            stop(server.run_dir, log=lambda *_: None)
            raise ServeError(f"model(s) {', '.join(waiting)} not ready after {timeout:.0f} s; "
                             f"see {server.run_dir / 'logs' / 'model_log.log'} "
                             f"({log_tail(server.run_dir)})")
        if waiting:
            time.sleep(0.25)
    return failed


def check_can_start(run_dir: Path, store: Path) -> None:
    """ServeError unless no server runs in run_dir, the store exists, and TorchServe and Java
    are installed."""
    refuse_second_server(run_dir)
    if not store.is_dir():
        raise ServeError(f"{store}: no such model store folder")
    if importlib.util.find_spec("ts") is None:
        raise ServeError("TorchServe is not installed (pip install -c constraints.txt "
                         "torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml)")
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise ServeError("TorchServe needs Java 11 or newer: no java on PATH and no JAVA_HOME")


def servable_models(store: Path, build=None, log=print) -> tuple[dict, dict[str, str]]:
    """(the store's models that can be served, {damaged model: why}); build: as for start().
    Each damaged model is named in a line on stderr; a store with none to serve is an error."""
    broken: dict[str, str] = {}
    if build is not None:
        build(store, log=log, broken=broken)
    models = collect_models(store, broken)
    say_damaged(broken)
    if not models:
        if broken:
            raise nothing_servable(store, broken)
        raise ServeError(f"no models in {store}: add checkpoint folders or .mar archives "
                         f"(pixtok export CKPT --out {store})")
    return models, broken


def say_damaged(broken: dict[str, str]) -> None:
    for why in broken.values():
        print(f"pixtok serve: not serving a damaged model: {why}", file=sys.stderr, flush=True)


def nothing_servable(store: Path, broken: dict[str, str]) -> ServeError:
    return ServeError(f"no model in {store} can be served: {len(broken)} damaged "
                      f"({', '.join(sorted(broken))}); see the lines above")


def start(model_store=None, host: str = "127.0.0.1", run_dir=None, timeout: float | None = None,
          log=print, ports: dict | None = None, token_expiration_min: float | None = None,
          config=None, build=None) -> Server:
    """Start TorchServe on the store's archives, return once every model answers.

    build(store, log=, broken=): called first, to build missing or stale archives, noting damaged
    folders in `broken` (`pixtok serve` passes export's build_missing_archives; serving itself
    never imports export).
    ports ({api: port}) and token_expiration_min default to the PIXTOK_* environment variables.
    config: a finished config.properties to run as it is instead of one rendered from
    serving/config.properties (host and ports must then be its addresses); the models waited
    for are its model_snapshot's.
    A model whose archive opens but whose worker fails to load it PIXTOK_LOAD_ATTEMPTS times is
    damaged too: TorchServe cannot unregister it (its model API is off), so it is stopped and
    started again without it (with a given config, that is an error instead).
    """
    run_dir = prepare_run_dir(run_dir)
    store = model_store_path(model_store)
    check_can_start(run_dir, store)
    stop_gate(run_dir)      # one a TorchServe that died left behind holds the inference port
    ports = {**ports_from_env(), **(ports or {})}
    check_ports_free(host, ports)
    attempts = load_attempts_setting()
    models, broken = servable_models(store, build, log)
    timeout = timeout or float(os.environ.get("PIXTOK_SERVE_TIMEOUT", 180))
    check_room(run_dir, store, models)
    gated = config is None and gate_setting()
    # behind the gate, TorchServe's inference API listens on a loopback port of its own
    ts_ports = {**ports, "inference": free_ports()["inference"]} if gated else ports
    while True:
        with run_dir_writes(run_dir):
            if config is None:
                path = render_config(run_dir, store, host, ts_ports,
                                     models, token_expiration_min, gated)
                names = list(models)
            else:
                path = install_config(run_dir, config)
                names = snapshot_models(path) or list(models)
        failures = LoadFailures(run_dir / "logs", attempts,
                                {m: store / mar for m, (mar, _, _) in models.items()})
        server = launch(run_dir, store, path, host, ts_ports, names, broken,
                        worker_threads(models))
        if gated:
            server = start_gate(server, ports["inference"])
        unloadable = wait_ready(server, timeout, failures)
        if not unloadable:
            break
        stop(run_dir, log=lambda *_: None)
        say_damaged(unloadable)
        broken.update(unloadable)
        models = {m: v for m, v in models.items() if m not in unloadable}
        if config is not None:
            raise ServeError(f"{config}: model(s) {', '.join(sorted(unloadable))} cannot be "
                             "loaded; see the lines above")
        if not models:
            raise nothing_servable(store, broken)
    key_file = run_dir / "key_file.json"
    if key_file.exists():
        os.chmod(key_file, 0o600)
    return server


LOG_ROOM = 16 * 2**20      # bytes a start's logs and pid files need in the run folder


def unpacked_size(store: Path, models: dict) -> int:
    """Bytes the server unpacks the models' archives into (the run folder's tmp/)."""
    total = 0
    for mar, _, _ in models.values():
        with contextlib.suppress(OSError, zipfile.BadZipFile), zipfile.ZipFile(store / mar) as z:
            total += sum(info.file_size for info in z.infolist())
    return total


def check_room(run_dir: Path, store: Path, models: dict) -> None:
    """ServeError, in one line, unless the run folder's disk has room for the unpacked archives
    and the logs: a full disk is refused before any server starts, not found out by a worker."""
    need = unpacked_size(store, models) + LOG_ROOM
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ServeError(f"the run folder {run_dir} has {free / 2**20:.1f} MB free; the server "
                         f"needs about {need / 2**20:.0f} MB there (unpacked archives and logs): "
                         "free some space or set PIXTOK_RUN_DIR to a folder on another disk")


@contextlib.contextmanager
def run_dir_writes(run_dir: Path):
    """An OSError writing the run folder's files (a full or read-only disk) is a ServeError."""
    try:
        yield
    except OSError as e:
        raise ServeError(f"cannot write into the run folder {run_dir} ({e.strerror or e}): "
                         "free some space or set PIXTOK_RUN_DIR to another folder") from None


def load_attempts_setting() -> int:
    try:
        return load_attempts()
    except UserError as e:
        raise ServeError(str(e)) from None


def launch(run_dir: Path, store: Path, config: Path, host: str, ports: dict, models: list[str],
           broken: dict, threads: int | None = None) -> Server:
    """Start TorchServe in the background on a written config, its workers on `threads` torch
    threads each; return once its pid file is."""
    (run_dir / "key_file.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-c", "from ts.model_server import start; start()", "--start",
           "--ts-config", str(config), "--model-store", str(store), "--ncs"]
    with open(run_dir / "logs" / "torchserve.out", "ab") as out:
        done = subprocess.run(cmd, cwd=run_dir, env=torchserve_env(run_dir, threads), stdout=out,
                              stderr=subprocess.STDOUT, timeout=120)
    if done.returncode:
        raise ServeError(f"torchserve did not start; see {run_dir / 'logs' / 'torchserve.out'}")
    deadline = time.monotonic() + 30
    while (pid := running_pid(run_dir)) is None:
        if time.monotonic() > deadline:
            raise ServeError(f"torchserve did not start; see {run_dir / 'logs'}")
        time.sleep(0.1)
    return Server(run_dir, pid, host, ports, models, broken)


def spawn(cmd: list[str], run_dir: Path, env: dict, out_path: Path,
          pid_path: Path) -> subprocess.Popen:
    """Start one of the run folder's processes (the gate, the KServe server, the page) in the
    background, its output appended to out_path and its pid written to pid_path. It runs in a
    session of its own, so it outlives `pixtok serve` and its terminal's Ctrl-C."""
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pid_path.write_text(f"{proc.pid}\n")
    return proc


# --- the gate in front of TorchServe (serving/gate.py) -------------------------------------------
def gate_setting() -> bool:
    value = os.environ.get(GATE_ENV, "on").strip().lower()
    if value not in ("on", "off", "1", "0"):
        raise ServeError(f"{GATE_ENV}={value!r}: expected on or off")
    return value in ("on", "1")


def request_timeout() -> float:
    """PIXTOK_REQUEST_TIMEOUT_S: seconds the gate lets a request wait for its answer to begin
    (0, the default: no limit)."""
    value = os.environ.get(REQUEST_TIMEOUT_ENV, "0").strip() or "0"
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise ServeError(f"{REQUEST_TIMEOUT_ENV}={value!r}: expected seconds from 0 (no limit) "
                         "to 3600")
    return seconds


def gate_pid_file(run_dir: Path) -> Path:
    return Path(run_dir) / "tmp" / "gate.pid"


def gate_file(run_dir: Path) -> Path:
    """gate.json: where the gate answers and where TorchServe does; serving/client.py reads the
    first (config.properties' inference address is TorchServe's, behind the gate)."""
    return Path(run_dir) / "gate.json"


def running_gate_pid(run_dir: Path) -> int | None:
    return live_pid(gate_pid_file(run_dir), GATE_MODULE)


def start_gate(server: Server, port: int, timeout: float = 30.0) -> Server:
    """Start the gate on server.host:port in front of the TorchServe `server`; return the
    Server as clients see it (the gate's port) once the gate takes connections."""
    run_dir, host = server.run_dir, server.host
    upstream = f"http://127.0.0.1:{server.ports['inference']}"
    cmd = [sys.executable, "-m", GATE_MODULE, "--listen", f"{bracketed(host)}:{port}",
           "--upstream", upstream, "--run-dir", str(run_dir), "--max-body",
           str(MAX_REQUEST_BYTES), "--request-timeout", str(request_timeout())]
    out_path = run_dir / "logs" / "gate.out"
    proc = spawn(cmd, run_dir, ui_env(run_dir, None), out_path, gate_pid_file(run_dir))
    public = {**server.ports, "inference": port}
    gated = Server(run_dir, server.pid, host, public, server.models, server.broken,
                   upstream=upstream)
    gate_file(run_dir).write_text(json.dumps({"address": gated.inference_url,
                                              "upstream": upstream, "pid": proc.pid}) + "\n")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            gate_pid_file(run_dir).unlink(missing_ok=True)
            stop(run_dir, log=lambda *_: None)
            tail = " | ".join(out_path.read_text(errors="replace").strip().splitlines()[-3:])
            raise ServeError(f"the gate in front of TorchServe exited (code {proc.returncode}); "
                             f"see {out_path} ({tail})")
        with contextlib.suppress(OSError), socket.create_connection(
                (url_host(host).strip("[]"), port), timeout=1):
            return gated
        if time.monotonic() > deadline:
            stop(run_dir, log=lambda *_: None)
            raise ServeError(f"the gate did not take connections on port {port} within "
                             f"{timeout:.0f} s; see {out_path}")
        time.sleep(0.1)


def stop_gate(run_dir: Path, timeout: float = 10.0) -> int | None:
    """Stop this run folder's gate (it lets the answers in flight finish); its pid, or None."""
    import psutil

    pid = running_gate_pid(run_dir)
    if pid is not None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            reap([proc], timeout)
    gate_pid_file(run_dir).unlink(missing_ok=True)
    gate_file(run_dir).unlink(missing_ok=True)
    return pid


def refuse_second_server(run_dir: Path) -> None:
    running = running_server(run_dir)
    if running is not None:
        kind, pid = running
        raise ServeError(f"already running ({kind}, pid {pid}, run folder {run_dir}); stop it "
                         "with `pixtok serve --stop`")


# --- KServe's ModelServer ----------------------------------------------------------------------
def write_key_file(run_dir: Path) -> str:
    """A fresh inference key in key_file.json (TorchServe's format, mode 0600). It does not
    expire: KServe's server reads it once, at start; every start makes a new one."""
    key = secrets.token_urlsafe(24)
    path = run_dir / "key_file.json"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"inference": {"key": key, "expiration time": "never"}}, f, indent=2)
    return key


def render_kserve_config(run_dir: Path, store: Path, host: str, port: int,
                         models: dict) -> Path:
    """config.properties that describes the KServe server for serving/client.py and the page
    (not a TorchServe config): where it listens and which archives it serves."""
    per_model = {name: {version: {"defaultVersion": True, "marName": mar}}
                 for name, (mar, version, _task) in models.items()}
    lines = ["# `pixtok serve --server kserve` (serving/kserve_server.py): not a TorchServe",
             "# config; serving/client.py and the Gradio page read the address and models here",
             "server=kserve", f"inference_address=http://{bracketed(host)}:{port}",
             f"model_store={store}", f"models={json.dumps(per_model)}"]
    path = run_dir / "config.properties"
    path.write_text("\n".join(line.replace("\\", "\\\\") if "=" in line and not
                              line.startswith("#") else line for line in lines) + "\n")
    os.chmod(path, 0o600)
    return path


def kserve_env(run_dir: Path) -> dict:
    """The server's environment: this repository importable, temp files in the run folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    tmp = str(run_dir / "tmp")
    env.update(TMPDIR=tmp, TEMP=tmp, PYTHONUNBUFFERED="1")
    return env


def kserve_log_tail(run_dir: Path, lines: int = 5) -> str:
    path = run_dir / "logs" / "kserve.out"
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:])


def wait_kserve_ready(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    """Until /v2/health/ready says every model is loaded, or the server exits."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"{local_url(server.inference_url)}/v2/health/ready"
    deadline = time.monotonic() + timeout
    bar = ready_bar(list(server.models))    # KServe says ready for all models at once
    with cleared_on_error(bar):
        wait_all_ready(server, proc, opener, url, deadline, timeout)
        bar.update(len(server.models))
        bar.set_description(waiting_for([]))


def wait_all_ready(server: Server, proc: subprocess.Popen, opener, url: str, deadline: float,
                   timeout: float) -> None:
    import urllib.error

    while True:
        if proc.poll() is not None:
            kserve_pid_file(server.run_dir).unlink(missing_ok=True)
            raise ServeError(f"the KServe server exited while starting (code {proc.returncode}); "
                             f"see {server.run_dir / 'logs' / 'kserve.out'} "
                             f"({kserve_log_tail(server.run_dir)})")
        try:
            with opener.open(url, timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("ready"):
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        if time.monotonic() > deadline:
            stop(server.run_dir, log=lambda *_: None)
            raise ServeError(f"the KServe server was not ready after {timeout:.0f} s; see "
                             f"{server.run_dir / 'logs' / 'kserve.out'} "
                             f"({kserve_log_tail(server.run_dir)})")
        time.sleep(0.25)


def start_kserve(model_store=None, host: str = "127.0.0.1", run_dir=None,
                 timeout: float | None = None, log=print, ports: dict | None = None,
                 build=None, auth: bool = True, batch_size: int | None = None,
                 max_batch_delay: float | None = None) -> Server:
    """Start KServe's ModelServer (serving/kserve_server.py) on the store's archives, on the
    inference port; return once every model is ready. auth=False: no bearer key (only behind a
    gateway that authenticates). build as for start()."""
    run_dir = prepare_run_dir(run_dir)
    refuse_second_server(run_dir)
    stop_gate(run_dir)      # one a TorchServe that died left behind holds the inference port
    store = model_store_path(model_store)
    if not store.is_dir():
        raise ServeError(f"{store}: no such model store folder")
    if importlib.util.find_spec("kserve") is None:
        raise ServeError("the KServe SDK is not installed (pip install -c constraints.txt "
                         "-e '.[kserve]')")
    ports = {**ports_from_env(), **(ports or {})}
    check_ports_free(host, {"inference": ports["inference"]})
    queue_size = positive_int_env(QUEUE_SIZE_ENV, DEFAULT_QUEUE_SIZE)
    models, broken = servable_models(store, build, log)
    check_room(run_dir, store, models)
    with run_dir_writes(run_dir):
        render_kserve_config(run_dir, store, host, ports["inference"], models)
        if auth:
            write_key_file(run_dir)
        else:
            (run_dir / "key_file.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", KSERVE_MODULE, "--model-store", str(store), "--run-dir",
           str(run_dir), "--host", host, "--port", str(ports["inference"])]
    if not auth:
        cmd.append("--no-auth")
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    if max_batch_delay is not None:
        cmd += ["--max-batch-delay", str(max_batch_delay)]
    cmd += ["--queue-size", str(queue_size)]
    proc = spawn(cmd, run_dir, kserve_env(run_dir), run_dir / "logs" / "kserve.out",
                 kserve_pid_file(run_dir))
    server = Server(run_dir, proc.pid, host, {"inference": ports["inference"]}, list(models),
                    broken, kind="kserve")
    wait_kserve_ready(server, proc, timeout or float(os.environ.get("PIXTOK_SERVE_TIMEOUT",
                                                                    180)))
    return server


def reap(procs: list, timeout: float) -> None:
    """Wait up to timeout s for terminated processes to exit; SIGKILL the ones still running."""
    import psutil

    _, running = psutil.wait_procs(procs, timeout=timeout)
    for proc in running:
        proc.kill()
    psutil.wait_procs(running, timeout=5)


def stop_kserve(run_dir: Path, log=print, timeout: float = 30.0) -> bool:
    import psutil

    pid = running_kserve_pid(run_dir)
    if pid is None:
        return False
    proc = psutil.Process(pid)
    proc.terminate()         # uvicorn finishes the requests in flight, then exits
    reap([proc], timeout)
    kserve_pid_file(run_dir).unlink(missing_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tmp" / "kserve-models", ignore_errors=True)
    log(f"pixtok serve: stopped KServe (pid {pid})")
    return True


def drain_seconds() -> float:
    from pixtok.inference.drain import DRAIN_SECONDS

    value = os.environ.get("PIXTOK_DRAIN_SECONDS", str(DRAIN_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 60:
        raise ServeError(f"PIXTOK_DRAIN_SECONDS={value!r}: expected seconds from 0 to 60")
    return seconds


def drain(run_dir: Path, workers: list, seconds: float) -> int:
    """Before TorchServe stops (its shutdown resets every open connection): SIGTERM each worker,
    which finishes or refuses what it holds (pixtok/inference/drain.py), and wait until
    each says it is idle or has gone, or for `seconds` and a second more. Returns the workers
    still busy."""
    import psutil

    from pixtok.inference.drain import drained_file

    workers = [w for w in workers if any("model_service_worker" in a for a in command_line(w))]
    tmp = run_dir / "tmp"
    for w in workers:
        with contextlib.suppress(psutil.Error):
            w.terminate()
    deadline = time.monotonic() + seconds + 1.0
    busy = workers
    while True:
        busy = [w for w in busy if alive(w) and not (tmp / drained_file(w.pid).name).exists()]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.3)     # the last answers are on their way from the workers to the clients
    for w in workers:
        (tmp / drained_file(w.pid).name).unlink(missing_ok=True)
    return len(busy)


def command_line(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(run_dir=None, log=print, timeout: float = 30.0, drain_for: float | None = None) -> bool:
    """Stop this run folder's server (TorchServe and every worker it started, or KServe's
    ModelServer); TorchServe's workers answer the requests in flight for up to drain_for seconds
    ($PIXTOK_DRAIN_SECONDS by default) and refuse the later ones (503). False if none was
    running."""
    import psutil

    run_dir = Path(run_dir or default_run_dir()).expanduser().resolve()
    if stop_kserve(run_dir, log, timeout):
        return True
    pid = running_pid(run_dir)
    if pid is None:
        gate = stop_gate(run_dir)
        log(f"pixtok serve: not running (run folder {run_dir})"
            + (f"; stopped the gate it left (pid {gate})" if gate else ""))
        return False
    server = psutil.Process(pid)
    workers = server.children(recursive=True)
    busy = drain(run_dir, workers, drain_seconds() if drain_for is None else drain_for)
    log(f"pixtok serve: workers drained{f', {busy} still busy' if busy else ''}; "
        "stopping TorchServe")
    server.terminate()        # TorchServe's shutdown hook stops its workers
    reap([server, *workers], timeout)
    stop_gate(run_dir, timeout=min(timeout, 10.0))     # after TorchServe: answers in flight pass
    pid_file(run_dir).unlink(missing_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tmp" / "models", ignore_errors=True)   # unpacked archives
    log(f"pixtok serve: stopped (pid {pid})")
    return True


# --- the Gradio front end ----------------------------------------------------------------------
@dataclass
class FrontEnd:
    """A running Gradio front end of a run folder; login is (user, password) or None."""
    run_dir: Path
    pid: int
    host: str
    port: int
    login: tuple[str, str] | None = None
    password_generated: bool = False

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}/"


def ui_pid_file(run_dir: Path) -> Path:
    return Path(run_dir) / "gradio.pid"


def running_ui_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's Gradio front end if it is alive."""
    return live_pid(ui_pid_file(run_dir), UI_MODULE)


def ui_port_from_env() -> int:
    from serving.gradio_app import ui_port

    try:
        return ui_port()
    except UserError as e:
        raise ServeError(str(e)) from None


def check_ui_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port} for the Gradio front end "
                             f"({e.strerror}); set PIXTOK_UI_PORT to a free port, or serve "
                             "without it (--no-ui)") from None


def ui_env(run_dir: Path, env: dict | None) -> dict:
    """The front end's environment: this repository importable, Gradio's files in the run folder."""
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), merged.get("PYTHONPATH")) if p)
    merged.setdefault("GRADIO_TEMP_DIR", str(run_dir / "tmp" / "gradio"))
    merged["GRADIO_ANALYTICS_ENABLED"] = "False"
    return merged


def start_ui(run_dir=None, host: str = "127.0.0.1", port: int | None = None,
             models: dict | None = None, env: dict | None = None, timeout: float | None = None,
             log=print, login: bool = False, examples=None) -> FrontEnd:
    """Start the Gradio front end for the server of `run_dir`; return once its page answers.

    models ({task: name}) and env (extra environment variables) override the defaults. The page
    asks for user pixtok's password when host is not loopback, or always with login=True.
    examples(folder): writes the page's example inputs first (`pixtok serve` passes training's
    writer; the page only reads the folder)."""

    run_dir = prepare_run_dir(run_dir)
    pid = running_ui_pid(run_dir)
    if pid is not None:
        raise ServeError(f"the Gradio front end is already running (pid {pid}, run folder "
                         f"{run_dir}); stop it with `pixtok serve --stop`")
    port = port or ui_port_from_env()
    check_ui_port_free(host, port)
    from serving.gradio_app import (
        UI_PASSWORD_ENV,
        UI_PASSWORD_FILE,
        UI_USER,
        examples_dir,
        needs_login,
        new_ui_password,
    )

    if examples is not None:    # written here, so the front end never loads torch or data code
        examples(examples_dir(run_dir))
    cmd = [sys.executable, "-m", UI_MODULE, "--host", host, "--port", str(port),
           "--run-dir", str(run_dir)]
    for task, name in (models or {}).items():
        cmd += [UI_MODEL_FLAGS[task], name]
    credentials, generated = None, False
    if needs_login(host, login):
        given = {**os.environ, **(env or {})}.get(UI_PASSWORD_ENV, "")
        password, generated = new_ui_password(run_dir, given)
        credentials = (UI_USER, password)
        cmd.append("--login")       # the app reads the same variable, or the file just written
    else:
        (run_dir / UI_PASSWORD_FILE).unlink(missing_ok=True)
    out_path = run_dir / "logs" / "gradio.out"
    proc = spawn(cmd, run_dir, ui_env(run_dir, env), out_path, ui_pid_file(run_dir))
    ui = FrontEnd(run_dir, proc.pid, host, port, credentials, generated)
    wait_for_page(ui, proc, out_path, timeout or float(os.environ.get("PIXTOK_UI_TIMEOUT", 120)))
    return ui


def wait_for_page(ui: FrontEnd, proc: subprocess.Popen, out_path: Path, timeout: float) -> None:
    """Until the page answers (or asks for its login); ServeError if it exits or stays silent
    for `timeout` seconds (then it is stopped)."""
    import urllib.error
    import urllib.request

    run_dir = ui.run_dir
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            ui_pid_file(run_dir).unlink(missing_ok=True)
            tail = " | ".join(out_path.read_text(errors="replace").strip().splitlines()[-3:])
            raise ServeError(f"the Gradio front end exited (code {proc.returncode}); see "
                             f"{out_path} ({tail})")
        try:
            with opener.open(local_url(ui.url) + "/config", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 401 and ui.login:     # up, and asking for the login
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            stop_ui(run_dir, log=lambda *_: None)
            raise ServeError(f"the Gradio front end did not answer on {ui.url} within "
                             f"{timeout:.0f} s; see {out_path}")
        time.sleep(0.25)


def stop_ui(run_dir=None, log=print, timeout: float = 10.0) -> bool:
    """Stop this run folder's Gradio front end. False if none was running."""
    import psutil

    run_dir = Path(run_dir or default_run_dir()).expanduser().resolve()
    pid = running_ui_pid(run_dir)
    if pid is None:
        return False
    proc = psutil.Process(pid)
    proc.terminate()
    reap([proc], timeout)
    ui_pid_file(run_dir).unlink(missing_ok=True)
    from serving.gradio_app import UI_PASSWORD_FILE

    (run_dir / UI_PASSWORD_FILE).unlink(missing_ok=True)     # valid for this start only
    log(f"pixtok serve: Gradio front end stopped (pid {pid})")
    return True


# --- `pixtok serve --foreground` ---------------------------------------------------------------
STOP_WITHIN = 8.0     # seconds from SIGTERM to the end of the stop: `docker stop` kills at 10 s
FOLLOWED_LOGS = {"torchserve.out": "torchserve", "gradio.out": "page", "gate.out": "gate"}
# TorchServe's console output (torchserve.out) holds its frontend log at INFO and, by log4j's
# additivity, every line of access_log.log and model_log.log too; those lines are marked so
TORCHSERVE_SOURCES = {" ACCESS_LOG - ": "access", " MODEL_LOG - ": "model"}


def log_source(line: str, source: str) -> str:
    """[access] and [model] for TorchServe's access and worker lines, else the file's source."""
    if source == "torchserve":
        return next((s for mark, s in TORCHSERVE_SOURCES.items() if mark in line), source)
    return source


class LogFollower:
    """Every line TorchServe's and the page's output gain from now on, also on stdout with its
    source in brackets, so `docker logs` / `podman logs` show it. A truncated file is read anew.
    (TorchServe's metrics logs are not followed: the metrics API serves them.)"""

    def __init__(self, logs: Path, out=None):
        self.logs, self.out = logs, out
        self.at = {}        # file name -> (inode, offset read up to)
        for name in FOLLOWED_LOGS:
            with contextlib.suppress(OSError):
                st = (logs / name).stat()
                self.at[name] = (st.st_ino, st.st_size)

    def poll(self) -> None:
        out = self.out or sys.stdout
        for name, source in FOLLOWED_LOGS.items():
            try:
                st = (self.logs / name).stat()
            except OSError:
                continue
            inode, offset = self.at.get(name, (st.st_ino, 0))
            if inode != st.st_ino or st.st_size < offset:      # replaced or truncated
                offset = 0
            if st.st_size > offset:
                with open(self.logs / name, "rb") as f:
                    f.seek(offset)
                    data = f.read(st.st_size - offset)
                whole = data.rfind(b"\n") + 1      # a line still being written waits
                for line in data[:whole].decode(errors="replace").splitlines():
                    print(f"[{log_source(line, source)}] {line}", file=out)
                offset += whole
            self.at[name] = (st.st_ino, offset)
        out.flush()


def catch_stop_signals() -> list[int]:
    """From now on SIGTERM and SIGINT are noted in the returned list instead of ending the process,
    so the foreground loop stops what it started (a container's PID 1 ignores an unhandled
    SIGTERM, and dying on it would leave TorchServe and the page running)."""
    caught: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: caught.append(signum))
    return caught


def reap_children() -> None:
    """Collect exited children: as a container's PID 1 this process inherits every orphan."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def hold(server: Server, ui: FrontEnd | None, caught: list[int], poll: float = 0.25,
         follower: LogFollower | None = None) -> int:
    """Until a stop signal (-> 0) or TorchServe's death (-> 1); then stop the page, TorchServe
    and every worker it had (a dead server's workers are orphans nobody else stops), within
    STOP_WITHIN seconds of the signal. The follower echoes the logs meanwhile."""
    import psutil

    run_dir, workers, ui_gone = server.run_dir, [], False
    follower = follower or LogFollower(run_dir / "logs")
    server_pid = running_kserve_pid if server.kind == "kserve" else running_pid
    gated = server.upstream is not None
    while (not caught and server_pid(run_dir) is not None
           and (not gated or running_gate_pid(run_dir) is not None)):
        follower.poll()
        try:
            workers = psutil.Process(server.pid).children(recursive=True)
        except psutil.Error:
            pass
        if ui and not ui_gone and running_ui_pid(run_dir) is None:
            ui_gone = True
            print(f"pixtok serve: the Gradio front end exited; see {run_dir / 'logs'} "
                  "(the REST API keeps serving)", file=sys.stderr, flush=True)
        reap_children()
        time.sleep(poll)
    t0 = time.monotonic()
    deadline = t0 + STOP_WITHIN
    if caught:
        print(f"pixtok serve: {signal.Signals(caught[0]).name}, stopping", flush=True)
    elif gated and server_pid(run_dir) is not None:
        print(f"pixtok serve: the gate on the inference port exited; see "
              f"{run_dir / 'logs' / 'gate.out'}", file=sys.stderr, flush=True)
    else:
        name, tail = (("KServe", kserve_log_tail(run_dir)) if server.kind == "kserve"
                      else ("TorchServe", log_tail(run_dir)))
        print(f"pixtok serve: {name} (pid {server.pid}) exited; see {run_dir / 'logs'} "
              f"({tail})", file=sys.stderr, flush=True)
        for proc in workers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    stop_ui(run_dir, timeout=1.5)
    follower.poll()
    # a live server stops its own workers; the drain (which may overrun by 1.3 s) leaves
    # TorchServe's own shutdown about 2 s of the budget
    drain_for = min(drain_seconds(), max(0.0, deadline - time.monotonic() - 3.0))
    stop(run_dir, log=lambda msg: print(f"{msg} ({time.monotonic() - t0:.1f} s)",
                                        file=sys.stderr, flush=True),
         drain_for=drain_for, timeout=max(0.5, deadline - time.monotonic()))
    reap_children()
    follower.poll()
    print(f"pixtok serve: stopped in {time.monotonic() - t0:.1f} s", flush=True)
    return 0 if caught else 1


def check_serve_args(args, host: str, with_ui: bool) -> str:
    """The server kind `pixtok serve` was asked for, once its options and the page's port are
    known to be usable (checked before any server starts, not after)."""
    if with_ui:
        pid = running_ui_pid(prepare_run_dir())
        if pid is not None:
            raise ServeError(f"the Gradio front end is already running (pid {pid}); stop it "
                             "with `pixtok serve --stop`")
        check_ui_port_free(host, ui_port_from_env())
    for task in BATCHING:     # an operator's bad setting fails now, not after the archives build
        batching(task)
    drain_seconds()
    gate_setting()
    request_timeout()
    kind = getattr(args, "server", None) or "torchserve"
    if kind not in SERVERS:
        raise ServeError(f"--server {kind!r}: expected one of {', '.join(SERVERS)}")
    if getattr(args, "no_auth", False) and kind != "kserve":
        raise ServeError("--no-auth is for `--server kserve` behind a gateway that "
                         "authenticates; TorchServe always asks for its key")
    return kind


def print_addresses(server: Server, ui: FrontEnd | None, foreground: bool) -> None:
    """Where everything is: routes, key file (the key itself once in the foreground), logs."""
    rd, kind = server.run_dir, server.kind
    print(f"  inference   {server.inference_url}/predictions/<model>   "
          f"models: {', '.join(server.models)}")
    if server.upstream:
        print(f"              (pixtok's gate; TorchServe's own inference API: {server.upstream})")
    if server.broken:
        print(f"  NOT served  {', '.join(sorted(server.broken))} (damaged; see above)")
    if kind == "kserve":
        print(f"  v2          {server.inference_url}/v2/models/<model>/infer   "
              "(health: /v2/health/live, /v2/health/ready)")
        print(f"  metrics     {server.inference_url}/metrics")
    else:
        print(f"  management  {server.management_url}")
        print(f"  metrics     {server.metrics_url}")
    key = server.client().key("inference")
    if key:
        print(f"  key file    {rd / 'key_file.json'} "
              "(header: Authorization: Bearer <inference key>)")
    else:
        print("  auth        off (--no-auth): the gateway in front must authenticate")
    if key and foreground:    # once, for `docker logs`; the key file always holds the current one
        minutes = os.environ.get("PIXTOK_TOKEN_EXPIRATION_MIN", "60")
        valid = "until the server stops" if kind == "kserve" else f"valid {minutes} min"
        print(f"  inference key  {key}   ({valid}; the key file holds the current one)")
    print(f"  logs        {rd / 'logs'}")
    if ui:
        print(f"  ui          {ui.url}   (Gradio; API names /generate /classify /depth)")
    if ui and ui.login:    # a generated password is printed this once
        from serving.gradio_app import UI_PASSWORD_FILE

        where = (f"{ui.login[1]}   (also in {rd / UI_PASSWORD_FILE}, mode 0600)"
                 if ui.password_generated else "from $PIXTOK_UI_PASSWORD")
        print(f"  ui login    user {ui.login[0]}, password {where}")


def run_cli(args, build=None, examples=None) -> int:
    """`pixtok serve`; build and examples as for start() and start_ui()."""
    if getattr(args, "stop", False):
        stop_ui()
        stop()
        return 0
    host = getattr(args, "host", "127.0.0.1")
    with_ui = not getattr(args, "no_ui", False)
    foreground = getattr(args, "foreground", False)
    kind = check_serve_args(args, host, with_ui)
    caught = catch_stop_signals() if foreground else []
    # --foreground: the logs' lines from this start on reach stdout (hold() echoes them)
    follower = LogFollower(prepare_run_dir() / "logs") if foreground else None
    t0 = time.monotonic()
    if kind == "kserve":
        server = start_kserve(getattr(args, "model_store", None), host, build=build,
                              auth=not getattr(args, "no_auth", False),
                              batch_size=getattr(args, "batch_size", None),
                              max_batch_delay=getattr(args, "max_batch_delay", None))
    else:
        server = start(getattr(args, "model_store", None), host, build=build)
    name = "KServe ModelServer" if kind == "kserve" else "TorchServe"
    print(f"pixtok serve: {name} up in {time.monotonic() - t0:.1f} s (pid {server.pid})")
    ui = None
    if with_ui:
        try:
            ui = start_ui(server.run_dir, host, examples=examples)
        except ServeError:
            stop(server.run_dir, log=lambda *_: None)
            raise
        print(f"pixtok serve: Gradio front end up (pid {ui.pid})")
    print_addresses(server, ui, foreground)
    if not foreground:
        print("  stop with   pixtok serve --stop")
        return 0
    print("pixtok serve: in the foreground; stop with Ctrl-C or SIGTERM", flush=True)
    code = hold(server, ui, caught, follower=follower)
    # Everything is stopped and said; Python's own teardown with torch loaded takes 2-3 s on a
    # busy 2-core machine, which `docker stop`'s 10 s cannot spare.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
