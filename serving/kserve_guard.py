"""What stands between a client and the KServe server's routes (serving/kserve_server.py): the
Guard middleware, the error bodies of both protocols, and log lines cut short.

The Guard runs before any route: every route but the health checks (OPEN_PATHS) asks for
`Authorization: Bearer <key>`; the model repository routes (load/unload), the v1 protocol and
the API docs are off (403, CLOSED_PREFIXES); a body over the limit (TorchServe's
max_request_size) is refused with 413, one under DRAIN_FACTOR times the limit read first, so the
client gets the answer, not a reset. Its
refusals, as every error of the server, speak the route's protocol: v2 {"error": message},
REST TorchServe's {"code", "type", "message"}. No line a request can put into the log is longer
than MAX_LOG_LINE characters.
"""
from __future__ import annotations

import hmac
import json
import logging

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/ping")    # probes: no key needed
CLOSED_PREFIXES = ("/v2/repository", "/v1/", "/docs", "/openapi.json", "/redoc")
# a body over the limit but under DRAIN_FACTOR times it is read and dropped before the 413, so
# the client reads a JSON answer instead of a reset connection; a larger one is cut off
DRAIN_FACTOR = 4


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
