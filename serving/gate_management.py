"""The gate's front of TorchServe's management API (serving/gate.py runs it beside the inference
front, on the management port, PIXTOK_MANAGEMENT_PORT; TorchServe's own management API listens on
a loopback port behind it).

It passes every request on as it came (method, raw path, query, headers, body; the management
key too: TorchServe still checks it) and every answer back, except:

- `/api-description` and OPTIONS, which describe TorchServe's whole API without a key: a JSON
  404 NotFound, key or not;
- a missing, wrong or expired key: TorchServe 0.12's 400 InvalidKeyException becomes a 401 with
  `WWW-Authenticate: Bearer`;
- TorchServe not reachable: a JSON 503 with `Retry-After: 1`.

Management answers are small (model descriptions, a key), so they are read whole.
"""
from __future__ import annotations

from aiohttp import ClientConnectionError, ClientPayloadError, web

from serving.gate_answers import HttpFront, not_served, passed_on, unauthorized, unreachable

MAX_BODY = 2**20       # management requests carry no model: a query string, at most a small body
CLOSED_PATHS = {"/api-description", "/api-description/"}


class ManagementFront(HttpFront):
    """The front of TorchServe's management API."""

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "OPTIONS" or request.raw_path.split("?", 1)[0] in CLOSED_PATHS:
            return not_served(request, "TorchServe's management routes without "
                              "/api-description and OPTIONS")
        body = await request.read()
        try:
            async with self.session.request(
                    request.method, self.upstream + request.raw_path,
                    headers=passed_on(request.headers), data=body or None,
                    allow_redirects=False) as up:
                answer = await up.read()
                refused = unauthorized(answer, "management") if up.status == 400 else None
                return refused or web.Response(status=up.status, body=answer,
                                               headers=passed_on(up.headers))
        except (ClientConnectionError, ClientPayloadError) as e:
            return unreachable(type(e).__name__)


def make_management_app(upstream: str) -> web.Application:
    return ManagementFront(upstream).app(MAX_BODY)
