"""pixtok's gate: the small HTTP reverse proxy that `pixtok serve` puts in front of TorchServe's
inference API, for the answers TorchServe 0.12's frontend cannot give (docs/reliability.md).

TorchServe listens on a loopback port of its own; the gate listens on the inference address
(PIXTOK_INFERENCE_PORT, `--host`) and passes every request through unchanged (method, path,
query, headers, body; the key too: TorchServe still checks it) and every answer back (streamed
answers as they come), on two routes only: /ping and /predictions/MODEL[/VERSION]. Any other
route (TorchServe's /api-description, OPTIONS, the undocumented aliases /explanations,
/v1/models/M:predict, /v2/models/M/infer) is a JSON 404 NotFound, and a model name that is not
letters, digits, '_', '.' and '-' (an encoded newline or '/') a JSON 404 ModelNotFoundException;
the path goes on as it came, never decoded. TorchServe's internal ts_stream_next header is
dropped. It changes six answers:

- a missing, wrong or expired key: TorchServe 0.12's 400 InvalidKeyException becomes a 401 with
  `WWW-Authenticate: Bearer` (the same JSON type);

- a full queue: TorchServe's 503 ServiceUnavailableException, whose message ("has no worker ...
  use scale workers API") misleads, gains a plain message and a `Retry-After` of the whole
  seconds the model's requests in flight need at its recent pace (1 to 60);
- a request whose answer has not begun within --request-timeout seconds (PIXTOK_REQUEST_TIMEOUT_S,
  default none; TorchServe 0.12 ignores its own clientTimeoutInMills): the same 503 and
  Retry-After (the request may still run in TorchServe);
- a multipart form that TorchServe's frontend cannot decode (a field without a name): its 500
  ErrorDataDecoderException becomes 400 bad_request;
- a body over the server's limit (max_request_size): a JSON 413 body_too_large instead of
  TorchServe's bare 413 and reset connection;
- TorchServe not reachable (starting again, stopping, or gone): a JSON 503 with `Retry-After: 1`
  instead of a refused or reset connection.

Bodies are read whole before they are sent on (a slow client never holds a TorchServe
connection); answers are streamed. The management and metrics APIs and gRPC are not behind the
gate. The gate holds no model and no key; SIGTERM lets the requests in flight finish.

    python -m serving.gate --listen HOST:PORT --upstream http://127.0.0.1:PORT --run-dir DIR
        [--max-body BYTES] [--request-timeout SECONDS]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import re
import sys
import time
import uuid
from pathlib import Path

from aiohttp import (
    ClientConnectionError,
    ClientPayloadError,
    ClientSession,
    ClientTimeout,
    TCPConnector,
    web,
)

# headers that belong to one connection, not to the request or answer (RFC 9110 7.6.1), and
# the ones aiohttp sets itself from the body it sends
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "host", "content-length"}
MODEL_PATH = re.compile(r"^/(?:predictions|explanations)/([^/]+)|^/v[12]/models/([^/:]+)")
# the routes the gate passes on, on the raw (still percent-encoded) path: /ping and
# /predictions/MODEL[/VERSION]. TorchServe's other inference routes are closed here: its
# undocumented aliases of /predictions (/explanations, /v1/models/M:predict, /v2/models/M/infer,
# which answer our v2 bodies with 415) and /api-description (and OPTIONS), which answer
# without a key
OPEN_ROUTE = re.compile(r"^/ping$|^/predictions/([^/]+)(?:/([^/]+))?$")
# a model name or version as TorchServe accepts them at registration
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# a request's cancel token (pixtok/inference/handler_base.py): the gate sets it on every request
# it passes on (a client's own is dropped) and, when a client leaves a streamed answer, makes
# the file CANCEL_DIR/TOKEN in the run folder's tmp/, where the handler looks at each step
CANCEL_HEADER = "X-Pixtok-Cancel-Token"
CANCEL_DIR = "pixtok-cancelled"
CANCEL_KEEP_S = 3600       # markers no handler picked up (the answer was done) go after an hour
# headers of TorchServe's answers that are its own business, never the client's: its worker's
# marker of a streamed answer's next chunk
INTERNAL_ANSWER_HEADERS = {"ts_stream_next"}
PACE_WINDOW_S = 30.0       # answers of the last 30 s set a model's pace
RETRY_AFTER_MAX_S = 60
UNDECODABLE_FORM = "ErrorDataDecoderException"   # TorchServe's type for a form it cannot decode


def model_of(path: str) -> str | None:
    """The model a request path names (REST, KServe v1 and v2 routes), else None."""
    m = MODEL_PATH.match(path)
    return (m.group(1) or m.group(2)) if m else None


class Pace:
    """Per model: requests in flight through the gate, and when recent answers left. The
    Retry-After of a full queue is the seconds the requests in flight need at that pace."""

    def __init__(self, window_s: float = PACE_WINDOW_S, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self.in_flight: collections.Counter = collections.Counter()
        self.answered: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.last_took: dict[str, float] = {}

    def started(self, model: str) -> float:
        self.in_flight[model] += 1
        return self.clock()

    def finished(self, model: str, since: float, counted: bool) -> None:
        """A request of `model` started at `since` ended; `counted`: the model answered it (a
        refusal by the queue or a lost connection says nothing of the model's pace)."""
        self.in_flight[model] -= 1
        if counted:
            now = self.clock()
            self.answered[model].append(now)
            self.last_took[model] = now - since
            self.trim(model, now)

    def trim(self, model: str, now: float) -> None:
        answered = self.answered[model]
        while answered and answered[0] < now - self.window_s:
            answered.popleft()

    def retry_after(self, model: str) -> int:
        """Whole seconds, 1 to 60: the requests in flight at the answers-per-second of the last
        window; with fewer than two answers in it, the last answer's duration; else 1."""
        now = self.clock()
        self.trim(model, now)
        answered, waiting = self.answered[model], max(1, self.in_flight[model])
        if len(answered) >= 2 and answered[-1] > answered[0]:
            seconds = waiting * (answered[-1] - answered[0]) / (len(answered) - 1)
        else:
            seconds = self.last_took.get(model, 1.0)
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(seconds)))


def error(code: int, kind: str, message: str, headers: dict | None = None) -> web.Response:
    """An answer in TorchServe's error shape, {"code", "type", "message"}."""
    return web.json_response({"code": code, "type": kind, "message": message}, status=code,
                             headers=headers)


def full_queue(answer: bytes) -> bool:
    """TorchServe's full queue (or no live worker): 503 ServiceUnavailableException. A
    handler's own 503 (shutting_down) is passed on as it is."""
    try:
        return json.loads(answer).get("type") == "ServiceUnavailableException"
    except (ValueError, AttributeError):
        return False


def passed_on(headers) -> dict:
    return {k: v for k, v in headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in INTERNAL_ANSWER_HEADERS
            and k.lower() != CANCEL_HEADER.lower()}


def mark_cancelled(folder: Path | None, token: str) -> None:
    """Tell the handler that the client of request `token` has left (and drop old markers)."""
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in folder.iterdir():
            if now - old.stat().st_mtime > CANCEL_KEEP_S:
                old.unlink(missing_ok=True)
        (folder / token).touch()
    except OSError:
        pass           # no marker: the worker finishes the steps, as without the gate


def clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def closed_route(request: web.Request) -> web.Response | None:
    """None for a route the gate passes on; else the JSON answer: 404 NotFound for a closed
    route (OPTIONS anywhere), 404 ModelNotFoundException for a model name or version TorchServe
    could never have registered (a newline, or an encoded '/' that it would decode and take
    as MODEL/VERSION)."""
    from urllib.parse import unquote

    found = OPEN_ROUTE.match(request.raw_path.split("?", 1)[0])
    if request.method == "OPTIONS" or found is None:
        return error(404, "NotFound", f"{request.method} {clip(request.path)!r} is not served "
                     "here: the routes are /ping and /predictions/MODEL (docs/openapi.yaml)")
    for part in found.groups():
        if part is not None and not NAME.match(unquote(part)):
            return error(404, "ModelNotFoundException",
                         f"Model not found: {clip(unquote(part))!r} (a model name or version "
                         "is letters, digits, '_', '.' and '-')")
    return None


def unauthorized(answer: bytes) -> web.Response | None:
    """TorchServe 0.12 answers a missing, wrong or expired key with 400 InvalidKeyException;
    the gate makes it the 401 with `WWW-Authenticate: Bearer` that HTTP clients expect."""
    try:
        found = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(found, dict) or found.get("type") != "InvalidKeyException":
        return None
    return error(401, "InvalidKeyException",
                 "send the inference key as `Authorization: Bearer <key>` (key_file.json in "
                 "the run folder; it rolls over, see docs/serving.md)",
                 {"WWW-Authenticate": 'Bearer realm="pixtok"'})


def unreachable(why: str) -> web.Response:
    return error(503, "ServiceUnavailableException",
                 f"the model server is not reachable ({why}): it is starting again or "
                 "stopping; retry after 1 s", {"Retry-After": "1"})


class Gate:
    def __init__(self, upstream: str, max_body: int, log=print, request_timeout: float = 0.0,
                 cancel_dir: Path | None = None):
        self.upstream, self.max_body, self.log = upstream.rstrip("/"), max_body, log
        self.cancel_dir = cancel_dir
        self.request_timeout = request_timeout       # seconds; 0: none
        self.pace = Pace()
        self.session: ClientSession | None = None
        self.refused = collections.Counter()     # full-queue answers since the last log line
        self.said_at = 0.0

    async def open(self, _app=None) -> None:
        # no limit on connections (TorchServe's queue is the limit), a fresh one per request (a
        # kept-alive one TorchServe closed would lose a POST), and no read timeout (a generator
        # may take minutes; TorchServe's responseTimeout bounds a worker)
        self.session = ClientSession(connector=TCPConnector(limit=0, force_close=True),
                                     auto_decompress=False,
                                     timeout=ClientTimeout(total=None, sock_connect=5))

    async def close(self, _app=None) -> None:
        if self.session is not None:
            await self.session.close()

    async def read_body(self, request: web.Request) -> bytes | web.Response:
        too_large = error(413, "body_too_large",
                          f"the request body is over the server's limit of {self.max_body} "
                          "bytes (max_request_size); send a smaller image")
        if (request.content_length or 0) > self.max_body:
            return too_large
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > self.max_body:
                return too_large
        return bytes(body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        closed = closed_route(request)
        if closed is not None:
            return closed
        body = await self.read_body(request)
        if isinstance(body, web.Response):
            return body
        model = model_of(request.path) or ""
        since, counted = self.pace.started(model), False
        headers = passed_on(request.headers)
        token = uuid.uuid4().hex
        headers[CANCEL_HEADER] = token
        peer = request.remote or ""
        headers["X-Forwarded-For"] = ", ".join(
            p for p in (request.headers.get("X-Forwarded-For"), peer) if p)
        try:
            sent = self.session.request(request.method, self.upstream + request.raw_path,
                                        headers=headers, data=body or None,
                                        allow_redirects=False)
            try:
                up = await asyncio.wait_for(sent, self.request_timeout or None)
            except TimeoutError:
                return self.overloaded(model, waited=self.request_timeout)
            async with up:
                if up.status == 503:
                    answer = await up.read()
                    if full_queue(answer):
                        return self.overloaded(model)
                    return web.Response(status=503, body=answer, headers=passed_on(up.headers))
                counted = True
                if up.status == 400 and up.content_length is not None:
                    answer = await up.read()
                    return unauthorized(answer) or web.Response(
                        status=400, body=answer, headers=passed_on(up.headers))
                if up.status == 500 and request.content_type.startswith("multipart/"):
                    answer = await up.read()
                    if UNDECODABLE_FORM.encode() in answer:
                        return error(400, "bad_request", "the multipart form cannot be decoded: "
                                     "every field needs a name (Content-Disposition: form-data; "
                                     'name="data")')
                    return web.Response(status=500, body=answer, headers=passed_on(up.headers))
                return await self.relay(request, up, token)
        except (ClientConnectionError, ClientPayloadError) as e:
            if request.get("gate_started"):
                raise      # the answer had begun: end the connection, the client sees it cut
            return unreachable(type(e).__name__)
        finally:
            self.pace.finished(model, since, counted)

    def overloaded(self, model: str, waited: float | None = None) -> web.Response:
        """503 with Retry-After: a full queue, or (waited) no answer begun within the
        request timeout."""
        seconds = self.pace.retry_after(model)
        self.refused[model] += 1
        now = time.monotonic()
        if now - self.said_at >= 10:       # a line at most every 10 s, not one per request
            counts = ", ".join(f"{m or '-'} {n}" for m, n in sorted(self.refused.items()))
            self.log(f"gate: overload answered 503 with Retry-After (a full queue or the "
                     f"request timeout; the last {seconds} s), since the last such line: {counts}")
            self.refused.clear()
            self.said_at = now
        why = (f"it did not begin to answer within {waited:g} s (PIXTOK_REQUEST_TIMEOUT_S; the "
               "request may still run)" if waited else
               "its request queue is full (PIXTOK_QUEUE_SIZE) or it has no live worker")
        return error(503, "ServiceUnavailableException",
                     f"model {model!r} is overloaded: {why}; retry after {seconds} s",
                     {"Retry-After": str(seconds)})

    async def relay(self, request: web.Request, up, token: str) -> web.StreamResponse:
        """TorchServe's answer, passed on: whole when its length is known, else streamed. A
        client that leaves a stream is told to the handler (mark_cancelled)."""
        headers = passed_on(up.headers)
        if up.content_length is not None:
            return web.Response(status=up.status, body=await up.read(), headers=headers)
        answer = web.StreamResponse(status=up.status, headers=headers)
        await answer.prepare(request)
        request["gate_started"] = True
        try:
            async for chunk in up.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
        except (ConnectionError, asyncio.CancelledError):     # the client has gone
            mark_cancelled(self.cancel_dir, token)
            raise
        return answer


def make_app(upstream: str, max_body: int, log=print, request_timeout: float = 0.0,
             cancel_dir: Path | None = None) -> web.Application:
    gate = Gate(upstream, max_body, log, request_timeout, cancel_dir)
    app = web.Application(client_max_size=max_body + 1)
    app.on_startup.append(gate.open)
    app.on_cleanup.append(gate.close)
    app.router.add_route("*", r"/{tail:[\s\S]*}", gate.handle)    # newlines too (%0A)
    app["gate"] = gate
    return app


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.gate", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to answer on")
    parser.add_argument("--upstream", required=True, help="TorchServe's inference URL")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--max-body", type=int, default=2**25,
                        help="largest request body in bytes (TorchServe's max_request_size)")
    parser.add_argument("--request-timeout", type=float, default=0.0,
                        help="seconds a request may wait for its answer to begin; then 503 "
                        "with Retry-After (0: no limit)")
    args = parser.parse_args(argv)
    host, port = split_listen(args.listen)

    def log(message: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}", flush=True)

    app = make_app(args.upstream, args.max_body, log, args.request_timeout,
                   args.run_dir / "tmp" / CANCEL_DIR)
    log(f"gate: {args.listen} -> {args.upstream} (run folder {args.run_dir})")
    # SIGTERM: stop taking connections, let the requests in flight finish (up to 8 s)
    web.run_app(app, host=host, port=port, print=None, access_log=None, shutdown_timeout=8,
                handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
