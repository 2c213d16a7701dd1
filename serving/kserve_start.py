"""Starting and stopping `pixtok serve --server kserve`: KServe's ModelServer
(serving/kserve_server.py) on the same archives, as one process on the inference port (pid file
tmp/kserve.pid, output logs/kserve.out).

The launcher writes its key_file.json (a fresh inference key, TorchServe's format, mode 0600)
and a config.properties that only describes it (server=kserve, the inference address, the model
store and its models), so serving/client.py and the page find it as they find TorchServe.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from serving.client import local_url
from serving.gate_start import stop_gate
from serving.model_store import check_room, model_store_path, servable_models
from serving.process import EXITED, READY, cleared_on_error, ready_bar, waiting_for
from serving.run_folder import (
    KSERVE_MODULE,
    ROOT,
    ServeError,
    Server,
    bracketed,
    check_ports_free,
    kserve_process,
    ports_from_env,
    positive_int_env,
    prepare_run_dir,
    refuse_second_server,
    run_dir_writes,
)
from serving.torchserve_config import DEFAULT_QUEUE_SIZE, QUEUE_SIZE_ENV


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
    return kserve_process(run_dir).tail(lines)


def kserve_command(store: Path, run_dir: Path, host: str, port: int, auth: bool,
                   batch_size: int | None, max_batch_delay: float | None,
                   queue_size: int) -> list[str]:
    cmd = [sys.executable, "-m", KSERVE_MODULE, "--model-store", str(store), "--run-dir",
           str(run_dir), "--host", host, "--port", str(port)]
    if not auth:
        cmd.append("--no-auth")
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    if max_batch_delay is not None:
        cmd += ["--max-batch-delay", str(max_batch_delay)]
    return cmd + ["--queue-size", str(queue_size)]


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
    cmd = kserve_command(store, run_dir, host, ports["inference"], auth, batch_size,
                         max_batch_delay, queue_size)
    proc = kserve_process(run_dir).spawn(cmd, run_dir, kserve_env(run_dir))
    server = Server(run_dir, proc.pid, host, {"inference": ports["inference"]}, list(models),
                    broken, kind="kserve")
    wait_kserve_ready(server, proc, timeout or float(os.environ.get("PIXTOK_SERVE_TIMEOUT",
                                                                    180)))
    return server


def wait_kserve_ready(server: Server, proc, timeout: float) -> None:
    """Until /v2/health/ready says every model is loaded, or the server exits."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"{local_url(server.inference_url)}/v2/health/ready"

    def all_ready() -> bool:
        try:
            with opener.open(url, timeout=5) as r:
                return r.status == 200 and bool(json.loads(r.read()).get("ready"))
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return False

    run_dir, process = server.run_dir, kserve_process(server.run_dir)
    bar = ready_bar(list(server.models))    # KServe says ready for all models at once
    with cleared_on_error(bar):
        outcome = process.wait_ready(lambda: proc.poll() is None, all_ready, timeout)
        if outcome == EXITED:
            raise ServeError(f"the KServe server exited while starting (code {proc.returncode}); "
                             f"see {process.out_path} ({kserve_log_tail(run_dir)})")
        if outcome != READY:
            stop_kserve(run_dir, log=lambda *_: None)
            raise ServeError(f"the KServe server was not ready after {timeout:.0f} s; see "
                             f"{process.out_path} ({kserve_log_tail(run_dir)})")
        bar.update(len(server.models))
        bar.set_description(waiting_for([]))


def stop_kserve(run_dir: Path, log=print, timeout: float = 30.0) -> bool:
    """Stop this run folder's KServe server (uvicorn finishes the requests in flight, then
    exits). False if none was running."""
    pid = kserve_process(run_dir).stop(timeout)
    if pid is None:
        return False
    (run_dir / "key_file.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tmp" / "kserve-models", ignore_errors=True)
    log(f"pixtok serve: stopped KServe (pid {pid})")
    return True
