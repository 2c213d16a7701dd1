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
connection); answers are streamed. The same process fronts the management API where asked
(serving/gate_management.py: /api-description and OPTIONS closed, the 401) and the two gRPC
APIs (serving/gate_grpc.py: UNAUTHENTICATED for a refused key); the metrics API is not behind
it. The gate holds no model and no key; SIGTERM lets the requests in flight finish (8 s).

    python -m serving.gate --listen HOST:PORT --upstream http://127.0.0.1:PORT --run-dir DIR
        [--max-body BYTES] [--request-timeout SECONDS]
        [--management HOST:PORT=http://127.0.0.1:PORT]
        [--grpc-inference HOST:PORT=127.0.0.1:PORT] [--grpc-management HOST:PORT=127.0.0.1:PORT]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import re
import signal
import sys
import time
import uuid
from pathlib import Path

from aiohttp import (
    ClientConnectionError,
    ClientPayloadError,
    web,
)

from serving.gate_answers import (
    CANCEL_HEADER,
    HttpFront,
    clip,
    error,
    not_served,
    passed_on,
    unauthorized,
    unreachable,
)

MODEL_PATH = re.compile(r"^/(?:predictions|explanations)/([^/]+)|^/v[12]/models/([^/:]+)")
# the routes the gate passes on, on the raw (still percent-encoded) path: /ping and
# /predictions/MODEL[/VERSION]. TorchServe's other inference routes are closed here: its
# undocumented aliases of /predictions (/explanations, /v1/models/M:predict, /v2/models/M/infer,
# which answer our v2 bodies with 415) and /api-description (and OPTIONS), which answer
# without a key
OPEN_ROUTE = re.compile(r"^/ping$|^/predictions/([^/]+)(?:/([^/]+))?$")
# a model name or version as TorchServe accepts them at registration
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
CANCEL_DIR = "pixtok-cancelled"
CANCEL_KEEP_S = 3600       # markers no handler picked up (the answer was done) go after an hour
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


def full_queue(answer: bytes) -> bool:
    """TorchServe's full queue (or no live worker): 503 ServiceUnavailableException. A
    handler's own 503 (shutting_down) is passed on as it is."""
    try:
        return json.loads(answer).get("type") == "ServiceUnavailableException"
    except (ValueError, AttributeError):
        return False


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


def closed_route(request: web.Request) -> web.Response | None:
    """None for a route the gate passes on; else the JSON answer: 404 NotFound for a closed
    route (OPTIONS anywhere), 404 ModelNotFoundException for a model name or version TorchServe
    could never have registered (a newline, or an encoded '/' that it would decode and take
    as MODEL/VERSION)."""
    from urllib.parse import unquote

    found = OPEN_ROUTE.match(request.raw_path.split("?", 1)[0])
    if request.method == "OPTIONS" or found is None:
        return not_served(request, "the routes are /ping and /predictions/MODEL")
    for part in found.groups():
        if part is not None and not NAME.match(unquote(part)):
            return error(404, "ModelNotFoundException",
                         f"Model not found: {clip(unquote(part))!r} (a model name or version "
                         "is letters, digits, '_', '.' and '-')")
    return None


class Gate(HttpFront):
    """The front of TorchServe's inference API."""

    def __init__(self, upstream: str, max_body: int, log=print, request_timeout: float = 0.0,
                 cancel_dir: Path | None = None):
        super().__init__(upstream)
        self.max_body, self.log = max_body, log
        self.cancel_dir = cancel_dir
        self.request_timeout = request_timeout       # seconds; 0: none
        self.pace = Pace()
        self.refused = collections.Counter()     # full-queue answers since the last log line
        self.said_at = 0.0

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
    app = gate.app(max_body + 1)
    app["gate"] = gate
    return app


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def front(value: str) -> tuple[str, str]:
    """LISTEN=UPSTREAM of --management and --grpc-*."""
    listen, sep, upstream = value.partition("=")
    if not sep or not upstream:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT=UPSTREAM")
    return listen, upstream


SHUTDOWN_S = 8     # SIGTERM: requests in flight get this long to finish


async def run(sites: list[tuple[web.Application, str]], grpc_fronts: list[tuple], log) -> None:
    """Serve each (app, HOST:PORT) and each (api, LISTEN, UPSTREAM) gRPC front until SIGTERM or
    SIGINT; then stop taking connections and let the requests in flight finish."""
    runners, servers, fronts = [], [], []
    for app, listen in sites:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, *split_listen(listen)).start()
    if grpc_fronts:
        from serving.gate_grpc import make_grpc_server

        for api, listen, upstream in grpc_fronts:
            server, made = make_grpc_server(api, listen, upstream, sites[0][0]["gate"].max_body)
            made.open()
            await server.start()
            servers.append(server)
            fronts.append(made)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log("gate: stopping; the requests in flight may finish")
    await asyncio.gather(*(s.stop(SHUTDOWN_S) for s in servers),
                         *(r.cleanup() for r in runners))
    await asyncio.gather(*(f.close() for f in fronts))


def parse_args(argv):
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
    parser.add_argument("--management", type=front, metavar="HOST:PORT=URL",
                        help="front TorchServe's management API (at URL) on HOST:PORT too")
    for api in ("inference", "management"):
        parser.add_argument(f"--grpc-{api}", type=front, metavar="HOST:PORT=HOST:PORT",
                            help=f"front TorchServe's gRPC {api} API on the first HOST:PORT")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}", flush=True)

    sites = [(make_app(args.upstream, args.max_body, log, args.request_timeout,
                       args.run_dir / "tmp" / CANCEL_DIR), args.listen)]
    fronts = [f"{args.listen} -> {args.upstream}"]
    if args.management:
        from serving.gate_management import make_management_app

        sites.append((make_management_app(args.management[1]), args.management[0]))
        fronts.append(" -> ".join(args.management))
    grpc_fronts = [(api, *given) for api, given in (("inference", args.grpc_inference),
                                                    ("management", args.grpc_management))
                   if given]
    fronts += [f"gRPC {api} {listen} -> {upstream}" for api, listen, upstream in grpc_fronts]
    log(f"gate: {'; '.join(fronts)} (run folder {args.run_dir})")
    asyncio.run(run(sites, grpc_fronts, log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
