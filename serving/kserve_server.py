"""`pixtok serve --server kserve`: KServe's Python ModelServer over the same inference core.

One kserve.Model per task (classifier, depth, generator), each as thin as our TorchServe
handlers: it unpacks the model's archive from the model store and runs it with pixtok's inference
core (pixtok/inference/), so both servers answer alike. It speaks two protocols on one port:

- the Open Inference Protocol v2 with typed tensors (/v2/health/live, /v2/health/ready, /v2,
  /v2/models/NAME, /v2/models/NAME/ready, /v2/models/NAME/infer; names and types in
  docs/architecture.md), its binary tensor extension (an `image` element is an image file's
  raw bytes or its base64; a body is JSON unless Inference-Header-Content-Length splits it, as
  tritonclient sends it) and Triton's model configuration (/v2/models/NAME/config, what
  perf_analyzer reads); errors as {"error": message} with a short 4xx message;
- our REST routes as TorchServe answers them (POST /predictions/NAME, GET /ping), errors as
  {"code", "type", "message"}, so serving/client.py and the Gradio page work unchanged; a
  generator request with "stream": true is answered as a stream of JSON lines, one per sampler
  step and the answer last, and a client that leaves stops its generation at the next step.

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
ServiceUnavailableException; v2: {"error"}) and a Retry-After of the seconds the requests waiting
now need at the last batch's pace (1 to 60), which serving/client.py waits before it retries.

    python -m serving.kserve_server --model-store DIR --run-dir DIR [--host 127.0.0.1]
        [--port 8080] [--no-auth] [--batch-size N] [--max-batch-delay MS] [--models a,b]
        [--queue-size N]
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import socket
import sys
from pathlib import Path

from fastapi import Request, Response  # at module level: route annotations resolve here

from pixtok.inference.handler_base import STREAM_CONTENT_TYPE
from pixtok.inference.validate import MAX_BODY_BYTES, RequestError
from serving.kserve_models import load_models
from serving.kserve_v2 import (
    HEADER_LENGTH,
    IMAGE_CONTENT,
    V2Error,
    clip,
    decode_v2,
    triton_config,
)

log = logging.getLogger("pixtok.kserve")

MAX_REQUEST_BYTES = 2 * MAX_BODY_BYTES      # as TorchServe's max_request_size in `pixtok serve`
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/ping")    # probes: no key needed
CLOSED_PREFIXES = ("/v2/repository", "/v1/", "/docs", "/openapi.json", "/redoc")
# a body over the limit but under DRAIN_FACTOR times it is read and dropped before the 413, so
# the client reads a JSON answer instead of a reset connection; a larger one is cut off
DRAIN_FACTOR = 4
PID_FILE = "kserve.pid"          # in the run folder's tmp/, beside TorchServe's pid file


# --- the HTTP side ----------------------------------------------------------------------------
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


def json_bytes(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def rest_error(code: int, type_: str, message: str) -> tuple[int, bytes]:
    return code, json_bytes({"code": code, "type": type_, "message": message})


def is_v2(path: str) -> bool:
    return path.startswith("/v2")


class Guard:
    """ASGI middleware: the bearer key, closed routes and the body limit, before any route runs.
    Refusals speak the protocol of the route: v2 {"error"}, REST {"code", "type", "message"}."""

    def __init__(self, app, key: str | None, max_body: int):
        self.app, self.key, self.max_body = app, key, max_body

    async def refuse(self, send, path: str, code: int, type_: str, message: str):
        body = (json_bytes({"error": message}) if is_v2(path)
                else rest_error(code, type_, message)[1])
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if code == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if path.startswith(CLOSED_PREFIXES):
            return await self.refuse(send, path, 403, "Forbidden", f"{path} is off on this "
                                     "server (models come from the model store only)")
        if self.key is not None and path not in OPEN_PATHS:
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.key.encode()):
                return await self.refuse(send, path, 401, "Unauthorized",
                                         "send the inference key of the run folder's "
                                         "key_file.json as `Authorization: Bearer <key>`")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if length.isdigit() and int(length) <= DRAIN_FACTOR * self.max_body:
                await drain(receive)     # read it, so the client is not reset mid-upload
            return await self.refuse(send, path, 413, "body_too_large",
                                     f"the body is {length} bytes; the limit is {self.max_body}")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(seen)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge as e:      # a chunked body that grew past the limit
            await self.refuse(send, path, 413, "body_too_large",
                              f"the body is over {e.args[0]} bytes; the limit is {self.max_body}")


class BodyTooLarge(Exception):
    pass


async def drain(receive) -> None:
    """Read a request body to its end and drop it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def form_parts(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/form-data body, each as the bytes sent: a field without a
    filename (curl -F "data=<shoe.png") is bytes as a file is, never re-encoded as text."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise RequestError(400, "bad_request", "a multipart body needs a boundary in its "
                           "Content-Type")
    parts: list[bytearray] = []
    parser = MultipartParser(boundary, {
        "on_part_begin": lambda: parts.append(bytearray()),
        "on_part_data": lambda data, start, end: parts[-1].extend(data[start:end])})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:
        raise RequestError(400, "bad_request", "the body is not a well-formed multipart "
                           "form") from None
    return [bytes(p) for p in parts]


async def request_body(request: Request, content_type: str | None) -> bytes:
    """The payload of a REST request as TorchServe hands it to a handler: the raw body, or the
    one field of a multipart form (with or without a filename)."""
    if (content_type or "").lower().startswith("multipart/form-data"):
        parts = form_parts(await request.body(), content_type)
        if len(parts) != 1:
            raise RequestError(400, "bad_request", f"a multipart upload must hold one field "
                               f"(the image), got {len(parts)}")
        return parts[0]
    return await request.body()


def install_v2_routes(app, dataplane, models: dict) -> None:
    """Routes ahead of KServe's own: /infer with our decoder (raw image bytes in BYTES, JSON
    whatever the Content-Type, short 400s), the server metadata without extensions we do not
    serve, and Triton's model configuration."""
    from fastapi.responses import JSONResponse
    from kserve.protocol.rest.v2_endpoints import V2Endpoints

    endpoints = V2Endpoints(dataplane)

    async def infer(model_name: str, request: Request, response: Response):
        if model_name not in models:
            raise V2Error(404, f"model {clip(model_name, 64)!r} is not served here")
        body = await request.body()
        infer_request = decode_v2(body, request.headers.get(HEADER_LENGTH), model_name)
        return await endpoints.infer(request, response, model_name, infer_request)

    async def server_metadata():
        from importlib.metadata import version

        return JSONResponse({"name": "pixtok-kserve", "version": version("kserve"),
                             "extensions": ["binary_tensor_data", "model_configuration"]})

    async def config(model_name: str):
        model = models.get(model_name)
        if model is None:
            raise V2Error(404, f"model {clip(model_name, 64)!r} is not served here")
        return JSONResponse(triton_config(model))

    async def model_metadata(model_name: str):
        model = models.get(model_name)
        if model is None:
            raise V2Error(404, f"model {clip(model_name, 64)!r} is not served here")
        return JSONResponse({"name": model.name, "versions": [], "platform": "pixtok",
                             "inputs": [{**i, "parameters": IMAGE_CONTENT}
                                        if i["name"] == "image" else i for i in model.inputs],
                             "outputs": model.outputs})

    async def versioned(model_name: str, model_version: str):
        # KServe's own route would decode the body with its decoder (the one that fails on
        # raw image bytes); the models have no versions here
        raise V2Error(404, f"model {clip(model_name, 64)!r} has no version "
                      f"{clip(model_version, 32)!r} here: POST /v2/models/NAME/infer")

    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/infer", versioned,
                      methods=["POST"])
    app.add_api_route("/v2/models/{model_name}", model_metadata, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/infer", infer, methods=["POST"])
    app.add_api_route("/v2", server_metadata, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/config", config, methods=["GET"])


async def streamed(model, item: dict, request: Request, headers: dict):
    """A streamed generation: one line {"step", "total"} per sampler step, then the answer (or
    the error that ended it) as the last line. A request refused before its first step gets a
    plain JSON error, as without a stream."""
    from fastapi.responses import StreamingResponse

    events = model.stream(item, request)
    kind, payload, size = await anext(events)
    headers = {**headers, "X-Pixtok-Batch-Size": str(max(1, size))}
    if kind == "done" and isinstance(payload, RequestError):
        await events.aclose()
        raise payload

    async def lines():
        nonlocal kind, payload
        try:
            while True:
                if isinstance(payload, RequestError):
                    payload = payload.to_dict()
                yield json.dumps(payload) + "\n"
                if kind == "done":
                    return
                kind, payload, _ = await anext(events)
        finally:
            await events.aclose()

    return StreamingResponse(lines(), 200, media_type=STREAM_CONTENT_TYPE, headers=headers)


def install_routes(app, models: dict) -> None:
    """Our REST routes beside KServe's v2 ones, and the handlers that keep every refusal a 4xx
    in the route's own protocol."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    async def predictions(model_name: str, request: Request):
        model = models.get(model_name)
        if model is None:
            code, body = rest_error(404, "ModelNotFoundException",
                                    f"Model not found: {model_name}")
            return Response(body, code, media_type="application/json")
        content_type = request.headers.get("content-type")
        headers = {"X-Pixtok-Backend": model.backend}
        try:
            body = await request_body(request, content_type)
            item = await model.in_thread(model.core.preprocess, body, content_type)
            if isinstance(item, dict) and item.get("stream"):
                return await streamed(model, item, request, headers)
            answer, batch_size = await model.answer(item)
        except RequestError as e:
            headers.update(getattr(e, "headers", {}))     # Retry-After of a full queue
            return Response(e.to_json().encode(), e.code, media_type="application/json",
                            headers=headers)
        except Exception as e:
            log.error("pixtok: REST request failed: %s", clip(str(e), 300))
            code, payload = rest_error(400, "bad_request",
                                       f"could not read the request ({type(e).__name__})")
            return Response(payload, code, media_type="application/json", headers=headers)
        headers["X-Pixtok-Batch-Size"] = str(batch_size)
        return Response(json_bytes(answer), 200, media_type="application/json", headers=headers)

    async def ping():
        ready = all(m.ready for m in models.values())
        return JSONResponse({"status": "Healthy" if ready else "Unhealthy"},
                            200 if ready else 500)

    async def v2_error(request, exc):
        return JSONResponse({"error": exc.message}, exc.code, headers=exc.headers)

    async def invalid_body(request, exc):
        if not is_v2(request.url.path):
            code, body = rest_error(400, "bad_request", str(exc))
            return Response(body, code, media_type="application/json")
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return JSONResponse({"error": f"not a v2 inference request ({problems})"}, 400)

    async def request_error(request, exc):
        headers = getattr(exc, "headers", None)
        if is_v2(request.url.path):
            return JSONResponse({"error": exc.message}, exc.code, headers=headers)
        return Response(exc.to_json().encode(), exc.code, media_type="application/json",
                        headers=headers)

    app.add_api_route("/predictions/{model_name}", predictions, methods=["POST"])
    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_exception_handler(V2Error, v2_error)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, invalid_body)


MAX_LOG_LINE = 2000       # characters; a line that quotes a request is cut there


class ClippedFormatter(logging.Formatter):
    """Formats as the handler's own formatter did, then cuts every line (a traceback's too) to
    MAX_LOG_LINE characters, so no request a client sends can write a huge log line."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        return "\n".join(line if len(line) <= MAX_LOG_LINE else
                         f"{line[:MAX_LOG_LINE]}... ({len(line)} characters)"
                         for line in text.split("\n"))


def clip_log_lines() -> None:
    """Every handler of every logger configured now (ours, KServe's, uvicorn's) clips."""
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler.formatter, ClippedFormatter):
                handler.setFormatter(ClippedFormatter(handler.formatter))


def install_error_handlers(app) -> None:
    """After KServe's own (which answer str(exc), a repr of the payload at times, and log the
    whole of it): short messages; v2 routes {"error"}, the others {"code", "type", "message"},
    unknown routes and methods too."""
    from fastapi.responses import JSONResponse, Response
    from kserve.errors import InferenceError, InvalidInput
    from starlette.exceptions import HTTPException

    def answer(request, code: int, type_: str, message: str, headers=None):
        if is_v2(request.url.path):
            return JSONResponse({"error": message}, code, headers=headers)
        return Response(rest_error(code, type_, message)[1], code,
                        media_type="application/json", headers=headers)

    async def http_error(request, exc):
        names = {404: "NotFound", 405: "MethodNotAllowed"}
        message = {404: f"no route {clip(request.url.path, 100)} on this server (see "
                        "docs/openapi.yaml)",
                   405: f"{request.method} is not allowed on {clip(request.url.path, 100)}"
                   }.get(exc.status_code, clip(str(exc.detail), 200))
        return answer(request, exc.status_code, names.get(exc.status_code, "HTTPException"),
                      message, getattr(exc, "headers", None))

    async def invalid(request, exc):
        log.info("pixtok: refused a request: %s", clip(str(exc), 300))
        return answer(request, 400, "bad_request", clip(str(exc), 300))

    async def failed(request, exc):
        log.error("pixtok: %s on %s: %s", type(exc).__name__, clip(request.url.path, 100),
                  clip(str(exc), 300))
        return answer(request, 500, "internal_error", f"the server failed on this request "
                      f"({type(exc).__name__})")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(InvalidInput, invalid)
    app.add_exception_handler(InferenceError, failed)
    app.add_exception_handler(Exception, failed)


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
