"""Starting and stopping pixtok's gate (serving/gate.py) in front of TorchServe: it answers on
the inference port (pid file tmp/gate.pid, output logs/gate.out, its address in gate.json) and
passes requests on to TorchServe's own loopback port. PIXTOK_GATE=off leaves it out."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys

from serving.process import EXITED, READY
from serving.run_folder import (
    GATE_MODULE,
    ServeError,
    Server,
    bracketed,
    gate_file,
    gate_process,
    module_env,
    url_host,
)
from serving.torchserve_config import MAX_REQUEST_BYTES

GATE_ENV = "PIXTOK_GATE"     # on (default): serving/gate.py answers on the inference port
REQUEST_TIMEOUT_ENV = "PIXTOK_REQUEST_TIMEOUT_S"   # the gate's limit on a request's wait


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


def start_gate(server: Server, port: int, timeout: float = 30.0) -> Server:
    """Start the gate on server.host:port in front of the TorchServe `server`; return the
    Server as clients see it (the gate's port) once the gate takes connections. On a
    ServeError the caller stops TorchServe (and with it the gate)."""
    run_dir, host = server.run_dir, server.host
    upstream = f"http://127.0.0.1:{server.ports['inference']}"
    cmd = [sys.executable, "-m", GATE_MODULE, "--listen", f"{bracketed(host)}:{port}",
           "--upstream", upstream, "--run-dir", str(run_dir), "--max-body",
           str(MAX_REQUEST_BYTES), "--request-timeout", str(request_timeout())]
    gate = gate_process(run_dir)
    proc = gate.spawn(cmd, run_dir, module_env(run_dir, None))
    public = {**server.ports, "inference": port}
    gated = Server(run_dir, server.pid, host, public, server.models, server.broken,
                   upstream=upstream)
    gate_file(run_dir).write_text(json.dumps({"address": gated.inference_url,
                                              "upstream": upstream, "pid": proc.pid}) + "\n")

    def takes_connections() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(
                (url_host(host).strip("[]"), port), timeout=1):
            return True
        return False

    outcome = gate.wait_ready(lambda: proc.poll() is None, takes_connections, timeout, poll=0.1)
    if outcome == READY:
        return gated
    if outcome == EXITED:
        raise ServeError(f"the gate in front of TorchServe exited (code {proc.returncode}); "
                         f"see {gate.out_path} ({gate.tail()})")
    raise ServeError(f"the gate did not take connections on port {port} within "
                     f"{timeout:.0f} s; see {gate.out_path}")


def stop_gate(run_dir, timeout: float = 10.0) -> int | None:
    """Stop this run folder's gate (it lets the answers in flight finish); its pid, or None."""
    pid = gate_process(run_dir).stop(timeout)
    gate_file(run_dir).unlink(missing_ok=True)
    return pid
