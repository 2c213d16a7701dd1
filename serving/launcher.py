"""What `pixtok serve` starts and stops, in one import for the CLI, the benchmarks and the tests.

Each part lives in a file named for it, and each process of the run folder is a
serving.process.ManagedProcess (pid file, spawn, wait until ready, stop, the tail of its output):

    serving/run_folder.py        the run folder, ports, pid files, which server runs, Server
    serving/model_store.py       the store's archives, damaged models, room on the disk
    serving/torchserve_config.py TorchServe's config.properties, per-task batching, overload
    serving/torchserve.py        start()/stop_torchserve(): TorchServe, drained workers
    serving/gate_start.py        the gate (serving/gate.py) in front of TorchServe
    serving/kserve_start.py      start_kserve()/stop_kserve(): KServe's ModelServer
    serving/page_start.py        start_ui()/stop_ui(): the Gradio page (serving/gradio_app.py)
    serving/page_settings.py     the page's settings, read by the page and by page_start
    serving/foreground.py        `pixtok serve --foreground`: signals, log echo, the stop
    serving/serve_cli.py         `pixtok serve` / `pixtok serve --stop`

`pixtok serve --stop` (stop() here, then stop_ui()) stops whichever server runs.
"""
from __future__ import annotations

from serving.client import PORTS, local_url
from serving.gate_start import stop_gate
from serving.kserve_start import start_kserve, stop_kserve
from serving.model_store import servable_models
from serving.page_start import FrontEnd, check_ui_port_free, start_ui, stop_ui
from serving.run_folder import (
    ServeError,
    Server,
    free_ports,
    gate_file,
    gate_pid_file,
    pid_file,
    resolved,
    running_gate_pid,
    running_kserve_pid,
    running_pid,
    running_ui_pid,
)
from serving.torchserve import start, stop_torchserve
from serving.torchserve_config import (
    BATCHING,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    QUEUE_SIZE_ENV,
    torchserve_env,
    worker_threads,
)

SERVERS = ("torchserve", "kserve")
__all__ = ["BATCHING", "MAX_REQUEST_BYTES", "MAX_RESPONSE_BYTES", "PORTS", "QUEUE_SIZE_ENV",
           "SERVERS", "FrontEnd", "ServeError", "Server", "check_ui_port_free", "free_ports",
           "gate_file", "gate_pid_file", "local_url", "pid_file", "running_gate_pid",
           "running_kserve_pid", "running_pid", "running_ui_pid", "servable_models", "start",
           "start_kserve", "start_ui", "stop", "stop_gate", "stop_ui", "torchserve_env",
           "worker_threads"]


def stop(run_dir=None, log=print, timeout: float = 30.0, drain_for: float | None = None) -> bool:
    """Stop this run folder's server (TorchServe and every worker it started, or KServe's
    ModelServer); TorchServe's workers answer the requests in flight for up to drain_for seconds
    ($PIXTOK_DRAIN_SECONDS by default) and refuse the later ones (503). False if none was
    running."""
    run_dir = resolved(run_dir)
    if stop_kserve(run_dir, log, timeout):
        return True
    return stop_torchserve(run_dir, log, timeout, drain_for)
