"""Starting and stopping TorchServe on the model store's archives, with the gate in front.

TorchServe's inference API listens on a loopback port of its own; pixtok's gate
(serving/gate_start.py) answers on the inference port in front of it. A stop first drains the
workers (each finishes or refuses what it holds: pixtok/inference/drain.py), since TorchServe's
own shutdown resets every open connection.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pixtok.errors import UserError
from serving.client import Client
from serving.gate_start import GATED_APIS, gate_setting, start_gate, stop_gate
from serving.load_failures import LoadFailures, load_attempts
from serving.model_store import (
    check_room,
    model_store_path,
    nothing_servable,
    say_damaged,
    servable_models,
)
from serving.page_settings import UI_PORT_ENV
from serving.process import (
    EXITED,
    READY,
    alive,
    cleared_on_error,
    command_line,
    ready_bar,
    tail_of,
    waiting_for,
)
from serving.run_folder import (
    ServeError,
    Server,
    check_ports_free,
    free_ports,
    ports_from_env,
    prepare_run_dir,
    refuse_second_server,
    run_dir_writes,
    running_pid,
    torchserve_process,
)
from serving.torchserve_config import (
    install_config,
    render_config,
    snapshot_models,
    torchserve_env,
    worker_threads,
)


def log_tail(run_dir: Path, lines: int = 5) -> str:
    """Why TorchServe stopped where its output says (the Java exception that ended it, e.g. a
    port it could not bind), else the last lines of the model log."""
    out = run_dir / "logs" / "torchserve.out"
    text = out.read_text(errors="replace").splitlines() if out.is_file() else []
    starts = [i for i, line in enumerate(text) if line.startswith("Torchserve version:")]
    text = text[starts[-1] if starts else 0:]     # this start's output, not an earlier one's
    raised = [line.strip() for line in text
              if re.match(r"(java\.|io\.|org\.|Caused by: )\S*(Exception|Error)\b", line)]
    if raised:
        return " | ".join(raised[-2:])
    path = run_dir / "logs" / "model_log.log"
    return tail_of(path if path.is_file() else out, lines)


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


def load_attempts_setting() -> int:
    try:
        return load_attempts()
    except UserError as e:
        raise ServeError(str(e)) from None


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
    # behind the gate, TorchServe's inference, management and gRPC APIs listen on loopback
    # ports of their own
    ts_ports = {**ports, **upstream_ports(ports)} if gated else ports
    while True:
        path, names = write_config(run_dir, store, host, ts_ports, models, token_expiration_min,
                                   gated, config)
        failures = LoadFailures(run_dir / "logs", attempts,
                                {m: store / mar for m, (mar, _, _) in models.items()})
        server = launch(run_dir, store, path, host, ts_ports, names, broken,
                        worker_threads(models))
        if gated:
            server = gated_server(server, ports)
        unloadable = wait_ready(server, timeout, failures)
        if not unloadable:
            break
        stop_torchserve(run_dir, log=lambda *_: None)
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


def write_config(run_dir: Path, store: Path, host: str, ports: dict, models: dict,
                 token_expiration_min: float | None, gated: bool, config) -> tuple[Path, list]:
    """The run's config.properties (rendered, or the given `config` installed) and the models
    to wait for."""
    with run_dir_writes(run_dir):
        if config is None:
            return (render_config(run_dir, store, host, ports, models, token_expiration_min,
                                  gated), list(models))
        path = install_config(run_dir, config)
        return path, snapshot_models(path) or list(models)


def upstream_ports(ports: dict) -> dict:
    """Loopback ports for TorchServe's APIs behind the gate (all but metrics), none of the
    ports named for the APIs or the page: nothing listens on those yet, so the kernel may
    offer one."""
    page = os.environ.get(UI_PORT_ENV, "")
    free = free_ports(avoid={*ports.values(), *([int(page)] if page.isdigit() else [])})
    return {api: free[api] for api in GATED_APIS}


def gated_server(server: Server, ports: dict) -> Server:
    """The gate started on the public `ports` in front of TorchServe; TorchServe is stopped if
    it fails."""
    try:
        return start_gate(server, ports)
    except ServeError:
        stop_torchserve(server.run_dir, log=lambda *_: None)
        raise


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


def wait_ready(server: Server, timeout: float, failures: LoadFailures | None = None) -> dict:
    """Until every model has a READY worker (the management API; /ping is not enough) or has
    failed to load as often as `failures` allows; returns {model: why} of the latter."""
    client = server.client(timeout=10)
    waiting = list(server.models)
    bar = ready_bar(waiting)
    with cleared_on_error(bar):
        return wait_each_ready(server, client, waiting, timeout, bar, failures)


def wait_each_ready(server: Server, client: Client, waiting: list[str], timeout: float, bar,
                    failures: LoadFailures | None) -> dict:
    failed: dict = {}
    run_dir = server.run_dir

    def all_ready() -> bool:
        nonlocal waiting
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
        return not waiting

    outcome = torchserve_process(run_dir).wait_ready(
        lambda: running_pid(run_dir) is not None, all_ready, timeout)
    if outcome == READY:
        return failed
    if outcome == EXITED:
        raise ServeError(f"TorchServe exited while starting; see {run_dir / 'logs'} "
                         f"({log_tail(run_dir)})")
    stop_torchserve(run_dir, log=lambda *_: None)
    raise ServeError(f"model(s) {', '.join(waiting)} not ready after {timeout:.0f} s; "
                     f"see {run_dir / 'logs' / 'model_log.log'} ({log_tail(run_dir)})")


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


def stop_torchserve(run_dir: Path, log=print, timeout: float = 30.0,
                    drain_for: float | None = None) -> bool:
    """Stop this run folder's TorchServe and every worker it started, then the gate; the
    workers answer the requests in flight for up to drain_for seconds ($PIXTOK_DRAIN_SECONDS
    by default) and refuse the later ones (503). False if it was not running."""
    process = torchserve_process(run_dir)
    pid = process.running_pid()
    if pid is None:
        gate = stop_gate(run_dir)
        log(f"pixtok serve: not running (run folder {run_dir})"
            + (f"; stopped the gate it left (pid {gate})" if gate else ""))
        return False
    seconds = drain_seconds() if drain_for is None else drain_for

    def drain_workers(server) -> list:
        workers = server.children(recursive=True)
        busy = drain(run_dir, workers, seconds)
        log(f"pixtok serve: workers drained{f', {busy} still busy' if busy else ''}; "
            "stopping TorchServe")
        return workers       # TorchServe's shutdown hook stops them; waited for with it

    process.stop(timeout, drain=drain_workers)
    stop_gate(run_dir, timeout=min(timeout, 10.0))     # after TorchServe: answers in flight pass
    (run_dir / "key_file.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tmp" / "models", ignore_errors=True)   # unpacked archives
    log(f"pixtok serve: stopped (pid {pid})")
    return True
