"""What pixtok's gate (serving/gate.py) says itself, in TorchServe's error shape {"code", "type",
"message"}, which headers it passes on, and the part every HTTP front has (its session to
TorchServe): shared by its front of TorchServe's inference API (serving/gate.py) and of its
management API (serving/gate_management.py)."""
from __future__ import annotations

import json

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

# headers that belong to one connection, not to the request or answer (RFC 9110 7.6.1), and
# the ones aiohttp sets itself from the body it sends
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "host", "content-length"}
# a request's cancel token (pixtok/inference/handler_base.py): the gate sets it on every request
# it passes on (a client's own is dropped) and, when a client leaves a streamed answer, makes
# the file CANCEL_DIR/TOKEN in the run folder's tmp/, where the handler looks at each step
CANCEL_HEADER = "X-Pixtok-Cancel-Token"
# headers of TorchServe's answers that are its own business, never the client's: its worker's
# marker of a streamed answer's next chunk
INTERNAL_ANSWER_HEADERS = {"ts_stream_next"}


def error(code: int, kind: str, message: str, headers: dict | None = None) -> web.Response:
    """An answer in TorchServe's error shape, {"code", "type", "message"}."""
    return web.json_response({"code": code, "type": kind, "message": message}, status=code,
                             headers=headers)


def passed_on(headers) -> dict:
    return {k: v for k, v in headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in INTERNAL_ANSWER_HEADERS
            and k.lower() != CANCEL_HEADER.lower()}


def clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def unauthorized(answer: bytes, key: str = "inference") -> web.Response | None:
    """TorchServe 0.12 answers a missing, wrong or expired key with 400 InvalidKeyException;
    the gate makes it the 401 with `WWW-Authenticate: Bearer` that HTTP clients expect. `key`:
    which of the run folder's keys the API wants (inference or management)."""
    try:
        found = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(found, dict) or found.get("type") != "InvalidKeyException":
        return None
    return error(401, "InvalidKeyException",
                 f"send the {key} key as `Authorization: Bearer <key>` (key_file.json in the "
                 "run folder; it rolls over, see docs/serving.md)",
                 {"WWW-Authenticate": 'Bearer realm="pixtok"'})


def unreachable(why: str) -> web.Response:
    return error(503, "ServiceUnavailableException",
                 f"the model server is not reachable ({why}): it is starting again or "
                 "stopping; retry after 1 s", {"Retry-After": "1"})


def not_served(request: web.Request, routes: str) -> web.Response:
    """404 NotFound for a route the gate closes; `routes` says which are open."""
    return error(404, "NotFound", f"{request.method} {clip(request.path)!r} is not served "
                 f"here: {routes} (docs/openapi.yaml)")


class HttpFront:
    """One HTTP front of the gate: its session to TorchServe's API at `upstream`, opened and
    closed with its app, and every route (newlines too, %0A) to its handle()."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.session: ClientSession | None = None

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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def app(self, max_body: int) -> web.Application:
        app = web.Application(client_max_size=max_body)
        app.on_startup.append(self.open)
        app.on_cleanup.append(self.close)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle)
        return app
