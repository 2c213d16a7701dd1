"""`pixtok serve` / `pixtok serve --stop`: check the options, start the server (TorchServe
behind the gate, or KServe's ModelServer) and the page, say where everything is, and in the
foreground stay until told to stop (serving/foreground.py)."""
from __future__ import annotations

import os
import sys
import time

from serving.foreground import LogFollower, catch_stop_signals, hold
from serving.gate_start import gate_setting, request_timeout
from serving.kserve_start import start_kserve
from serving.launcher import SERVERS, stop
from serving.page_settings import UI_PASSWORD_FILE
from serving.page_start import (
    FrontEnd,
    check_ui_port_free,
    refuse_second_page,
    start_ui,
    stop_ui,
    ui_port_from_env,
)
from serving.run_folder import ServeError, Server, bracketed, prepare_run_dir
from serving.torchserve import drain_seconds, start
from serving.torchserve_config import BATCHING, batching, grpc_host


def check_serve_args(args, host: str, with_ui: bool) -> str:
    """The server kind `pixtok serve` was asked for, once its options and the page's port are
    known to be usable (checked before any server starts, not after)."""
    if with_ui:
        refuse_second_page(prepare_run_dir(), "")
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
        grpc = bracketed(grpc_host())
        print(f"  gRPC        {grpc}:{server.ports['grpc_inference']} (inference), "
              f"{grpc}:{server.ports['grpc_management']} (management; the key as metadata)")
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
        where = (f"{ui.login[1]}   (also in {rd / UI_PASSWORD_FILE}, mode 0600)"
                 if ui.password_generated else "from $PIXTOK_UI_PASSWORD")
        print(f"  ui login    user {ui.login[0]}, password {where}")


def start_server(args, kind: str, host: str, build) -> Server:
    if kind == "kserve":
        return start_kserve(getattr(args, "model_store", None), host, build=build,
                            auth=not getattr(args, "no_auth", False),
                            batch_size=getattr(args, "batch_size", None),
                            max_batch_delay=getattr(args, "max_batch_delay", None))
    return start(getattr(args, "model_store", None), host, build=build)


def run_cli(args, build=None, examples=None) -> int:
    """`pixtok serve`; build and examples as for serving.torchserve.start() and
    serving.page_start.start_ui()."""
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
    server = start_server(args, kind, host, build)
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
