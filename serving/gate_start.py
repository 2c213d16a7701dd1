"""Starting and stopping pixtok's gate (serving/gate.py) in front of TorchServe: it answers on
the inference, management and gRPC ports (pid file tmp/gate.pid, output logs/gate.out, its
addresses in gate.json) and passes requests on to TorchServe's own loopback ports.
PIXTOK_GATE=off leaves it out."""
from __future__ import annotations

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
from serving.torchserve_config import MAX_REQUEST_BYTES, grpc_host

GATE_ENV = "PIXTOK_GATE"     # on (default): serving/gate.py answers on the inference port
REQUEST_TIMEOUT_ENV = "PIXTOK_REQUEST_TIMEOUT_S"   # the gate's limit on a request's wait
# TorchServe's APIs the gate fronts (TorchServe's metrics API stays on its own port)
GATED_APIS = ("inference", "management", "grpc_inference", "grpc_management")


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


def start_gate(server: Server, public: dict, timeout: float = 30.0) -> Server:
    """Start the gate in front of the TorchServe `server` (listening on loopback ports of its
    own): on server.host at public["inference"] and ["management"], on grpc_host() at the
    public gRPC ports; return the Server as clients see it once the gate takes connections on
    all of them. On a ServeError the caller stops TorchServe (and with it the gate)."""
    run_dir, host, behind = server.run_dir, server.host, server.ports
    upstream = f"http://127.0.0.1:{behind['inference']}"
    management = f"http://127.0.0.1:{behind['management']}"
    listen = {api: f"{bracketed(grpc_host() if api.startswith('grpc') else host)}:{public[api]}"
              for api in GATED_APIS}
    cmd = [sys.executable, "-m", GATE_MODULE, "--listen", listen["inference"],
           "--upstream", upstream, "--run-dir", str(run_dir), "--max-body",
           str(MAX_REQUEST_BYTES), "--request-timeout", str(request_timeout()),
           "--management", f"{listen['management']}={management}",
           *(arg for api in ("inference", "management") for arg in (
               f"--grpc-{api}", f"{listen['grpc_' + api]}=127.0.0.1:{behind['grpc_' + api]}"))]
    gate = gate_process(run_dir)
    proc = gate.spawn(cmd, run_dir, module_env(run_dir, None))
    gated = Server(run_dir, server.pid, host, {**behind, **{api: public[api] for api in listen}},
                   server.models, server.broken, upstream=upstream)
    gate_file(run_dir).write_text(json.dumps({
        "address": gated.inference_url, "management": gated.management_url,
        "upstream": upstream, "management_upstream": management, "pid": proc.pid}) + "\n")

    def takes_connections() -> bool:
        for address in listen.values():
            where, _, number = address.rpartition(":")
            try:
                socket.create_connection((url_host(where.strip("[]")).strip("[]"),
                                          int(number)), timeout=1).close()
            except OSError:
                return False
        return True

    outcome = gate.wait_ready(lambda: proc.poll() is None, takes_connections, timeout, poll=0.1)
    if outcome == READY:
        return gated
    if outcome == EXITED:
        raise ServeError(f"the gate in front of TorchServe exited (code {proc.returncode}); "
                         f"see {gate.out_path} ({gate.tail()})")
    raise ServeError(f"the gate did not take connections on {', '.join(listen.values())} "
                     f"within {timeout:.0f} s; see {gate.out_path}")


def stop_gate(run_dir, timeout: float = 10.0) -> int | None:
    """Stop this run folder's gate (it lets the answers in flight finish); its pid, or None."""
    pid = gate_process(run_dir).stop(timeout)
    gate_file(run_dir).unlink(missing_ok=True)
    return pid
