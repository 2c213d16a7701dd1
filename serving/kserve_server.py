"""`pixtok serve --server kserve`: KServe's Python ModelServer over the same inference core.

One kserve.Model per task (classifier, depth, generator), each as thin as our TorchServe
handlers: it unpacks the model's archive from the model store and runs it with pixtok's inference
core (pixtok/inference/), so both servers answer alike. It speaks two protocols on one port:

- the Open Inference Protocol v2 with typed tensors (/v2/health/live, /v2/health/ready, /v2,
  /v2/models/NAME, /v2/models/NAME/ready, /v2/models/NAME/infer; names and types in
  docs/architecture.md), its binary tensor extension and Triton's model configuration
  (/v2/models/NAME/config); errors as {"error": message} with a short 4xx message;
- our REST routes as TorchServe answers them (POST /predictions/NAME, GET /ping), errors as
  {"code", "type", "message"}, so serving/client.py and the Gradio page work unchanged; a
  generator request with "stream": true is answered as a stream of JSON lines.

Requests of one model are batched across clients (up to --batch-size items, waiting at most
--max-batch-delay ms after the first; defaults per task: the task registry, pixtok/tasks.py)
and run on one thread per model; decoding runs on a thread pool. A bad input answers its own 4xx
and nothing a client sends ends the process.

Locked down as our TorchServe: it listens on 127.0.0.1 unless --host says otherwise; every route
but the health checks asks for `Authorization: Bearer <key>`, the inference key of the run
folder's key_file.json (TorchServe's format; the launcher writes a fresh one at each start);
--no-auth only behind a gateway that authenticates. The model repository routes (load/unload)
and KServe's gRPC server are off; bodies are limited as TorchServe's max_request_size.

Overload: at most --queue-size requests wait per model (`pixtok serve` passes PIXTOK_QUEUE_SIZE,
default 100); one more is answered at once with 503, TorchServe's JSON shape (type
ServiceUnavailableException; v2: {"error"}) and a Retry-After, which serving/client.py waits
before it retries.

This file starts the server (serve, the command line); its parts, each importing only those
before it:
    serving/kserve_v2.py        v2 bodies decoded, inputs read, typed outputs, Triton's config
    serving/kserve_batching.py  the batcher, the queue limit and its Retry-After
    serving/kserve_models.py    the task models and their loading from the model store
    serving/kserve_guard.py     the key, closed routes and body limit; error bodies; log clipping
    serving/kserve_routes.py    the v2 and REST routes, the stream, the error handlers

    python -m serving.kserve_server --model-store DIR --run-dir DIR [--host 127.0.0.1]
        [--port 8080] [--no-auth] [--batch-size N] [--max-batch-delay MS] [--models a,b]
        [--queue-size N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from pixtok.inference.validate import MAX_BODY_BYTES
from serving.kserve_guard import Guard, clip_log_lines
from serving.kserve_models import load_models
from serving.kserve_routes import install_error_handlers, install_routes, install_v2_routes

MAX_REQUEST_BYTES = 2 * MAX_BODY_BYTES      # as TorchServe's max_request_size in `pixtok serve`
PID_FILE = "kserve.pid"          # in the run folder's tmp/, beside TorchServe's pid file


def inference_key(run_dir: Path) -> str:
    """The inference key of the run folder's key_file.json (TorchServe's format)."""
    path = Path(run_dir) / "key_file.json"
    try:
        key = json.loads(path.read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"kserve_server: {path} holds no inference key; start it with "
                         "`pixtok serve --server kserve`, or pass --no-auth behind a gateway "
                         "that authenticates") from None
    if not isinstance(key, str) or len(key) < 16:
        raise SystemExit(f"kserve_server: the inference key in {path} is too short")
    return key


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    key = None if args.no_auth else inference_key(run_dir)
    sock = listen(args.host, args.port)       # fail early (port taken) before loading models
    sys.argv = sys.argv[:1]                   # kserve parses sys.argv when it is imported
    import kserve
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer

    only = [m for m in (args.models or "").split(",") if m]
    models = load_models(Path(args.model_store), run_dir, only, args.batch_size,
                         args.max_batch_delay, args.queue_size)
    if not models:
        raise SystemExit(f"kserve_server: no models in {args.model_store}")
    server = kserve.ModelServer(http_port=args.port, enable_grpc=False, workers=1,
                                enable_docs_url=False)
    for model in models:
        server.register_model(model)
    by_name = {m.name: m for m in models}
    install_v2_routes(app, server.dataplane, by_name)     # ahead of KServe's own routes
    install_routes(app, by_name)
    app.add_middleware(Guard, key=key, max_body=args.max_request_bytes)

    class Server(RESTServer):
        def create_application(self):
            super().create_application()
            install_error_handlers(app)       # over KServe's, which it adds here
            clip_log_lines()

    rest = Server("kserve.model_server:app", server.dataplane,
                      server.model_repository_extension, args.port, workers=1,
                      timeout_keep_alive=65)
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    (run_dir / "tmp" / PID_FILE).write_text(f"{os.getpid()}\n")
    print(f"pixtok kserve: {len(models)} model(s) on http://{args.host}:{args.port} "
          f"({'no auth' if key is None else 'bearer key'})", flush=True)
    try:
        rest.run(sockets=[sock])              # uvicorn: SIGTERM/SIGINT stop it gracefully
    finally:
        (run_dir / "tmp" / PID_FILE).unlink(missing_ok=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.kserve_server",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model-store", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PIXTOK_INFERENCE_PORT",
                                                                   8080)))
    p.add_argument("--no-auth", action="store_true",
                   help="no bearer key: only behind a gateway that authenticates")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most items per batch (default per task: classify 16, depth 4, "
                        "generate 1)")
    p.add_argument("--max-batch-delay", type=float, default=None,
                   help="ms a batch waits for more requests (default: classify and depth 10)")
    p.add_argument("--models", default=None, help="comma-separated names (default: all)")
    p.add_argument("--queue-size", type=int, default=None,
                   help="requests that may wait per model; one more is answered 503 at once "
                        "with Retry-After (default: no limit; `pixtok serve` passes "
                        "PIXTOK_QUEUE_SIZE, 100)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit("kserve_server: --batch-size must be >= 1")
    if args.max_batch_delay is not None and args.max_batch_delay < 0:
        raise SystemExit("kserve_server: --max-batch-delay must be >= 0")
    if args.queue_size is not None and args.queue_size < 1:
        raise SystemExit("kserve_server: --queue-size must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
