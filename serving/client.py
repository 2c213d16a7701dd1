"""A small REST client for `pixtok serve`: finds the server and its key through the run folder.

TorchServe's keys expire (token_expiration_min), and a refused key comes back as HTTP 401
InvalidKeyException through pixtok's gate (TorchServe 0.12 itself answers 400). On either, the
client re-reads key_file.json (another client may already have rolled the key) and, if the key
there is the one just refused, asks the management API for a fresh one with the never-expiring
API key. A long-running server therefore never strands a client, the Gradio front end included.

Idempotent calls (classify, depth, and generate with a seed: same request, same bytes) are retried
when the server is overloaded or lost a worker (HTTP 503, 429, 507, 502, 504, and TorchServe's
500 "Worker died."), the connection failed or an answer was cut short, with exponential backoff
and full jitter (honouring a Retry-After), for at most `retry_seconds` (PIXTOK_CLIENT_RETRY_S,
default 30; 0 turns retries off); then a ServerError or ServerUnreachable says how many tries
were made. A socket timeout is a ServerTimeout, never retried. See docs/reliability.md.

generate_stream() asks for a streamed generation ("stream": true) and yields each sampler step
({"step": i, "total": n}) as the server sends it, then the answer; closing it (or breaking out of
the loop) closes the connection.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from pixtok.errors import UserError
from pixtok.inference.validate import MAX_BODY_BYTES
from pixtok.tasks import served_tasks

DEFAULT_MODELS = {name: t.serving.default_model for name, t in served_tasks().items()}
STATUS_CODES = {int(s) for s in HTTPStatus}
PORTS = {   # api -> (environment variable, default port); `pixtok serve` listens on these
    "inference": ("PIXTOK_INFERENCE_PORT", 8080),
    "management": ("PIXTOK_MANAGEMENT_PORT", 8081),
    "metrics": ("PIXTOK_METRICS_PORT", 8082),
    "grpc_inference": ("PIXTOK_GRPC_INFERENCE_PORT", 7070),
    "grpc_management": ("PIXTOK_GRPC_MANAGEMENT_PORT", 7071),
}


RETRY_STATUSES = {429, 502, 503, 504, 507}   # overload, a dying worker, a restarting frontend
TORCHSERVE_FULL_QUEUE = "use scale workers API"   # in TorchServe's 503 for a full queue
WORKER_DIED = "Worker died."   # TorchServe's message for a request whose worker process ended
RETRY_ENV = "PIXTOK_CLIENT_RETRY_S"
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.25, 5.0


class ServerError(UserError):
    """The server refused a request; .status and .payload ({"code", "type", "message"}) say why."""

    def __init__(self, status: int, payload: dict, note: str = ""):
        self.status, self.payload = status, payload
        super().__init__(f"HTTP {status} {payload.get('type', '')}: "
                         f"{payload.get('message', payload)}{note}")


class ServerUnreachable(UserError):
    """Nothing answers at the server's address, or an answer was cut short."""


class ServerTimeout(UserError):
    """No answer within the client's timeout; never retried (the request may still be running)."""


def explain(resp: Response, model: str) -> dict:
    """The answer's JSON; a server's overload (503 ServiceUnavailableException) is type
    server_busy, and TorchServe's own misleading words for a full queue (when no gate is in
    front) are made plain."""
    payload = resp.json()
    if resp.status == 503 and payload.get("type") == "ServiceUnavailableException":
        payload = {**payload, "type": "server_busy"}
        if TORCHSERVE_FULL_QUEUE in str(payload.get("message")):
            payload["message"] = (f"model {model!r} is overloaded: its request queue is full "
                                  "(PIXTOK_QUEUE_SIZE) or it has no live worker; retry later")
    return payload


def worth_retrying(resp: Response) -> bool:
    """An answer that a later try of the same request may not get: overload, a restarting
    frontend, or a worker that died under the request. TorchServe answers the last with 507 when
    it has already seen the worker's exit status (137) and with 500 when it has not yet; the
    message is the same, so a 500 is retried only with exactly that message."""
    return resp.status in RETRY_STATUSES or (resp.status == 500
                                             and resp.json().get("message") == WORKER_DIED)


def backoff_delay(attempt: int, retry_after: str | None = None, rng=random) -> float:
    """Seconds to wait before try attempt+1: Retry-After when the server gave one, else
    exponential backoff with full jitter (uniform in 0..min(max, first * 2^attempt))."""
    if retry_after:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            pass
    return rng.uniform(0, min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** attempt))


def retry_budget() -> float:
    value = os.environ.get(RETRY_ENV, "30")
    try:
        return max(0.0, float(value))
    except ValueError:
        raise UserError(f"{RETRY_ENV}={value!r}: expected seconds (0 turns retries off)") from None


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        try:
            return json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            # TorchServe's own 413 (body over max_request_size) has no body at all
            phrase = HTTPStatus(self.status).phrase if self.status in STATUS_CODES else ""
            return {"code": self.status, "type": phrase,
                    "message": self.body[:200].decode("utf-8", "replace") or phrase}

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


def default_run_dir() -> Path:
    return Path(os.environ.get("PIXTOK_RUN_DIR") or Path.home() / ".cache" / "pixtok" / "run")


def gate_address(run_dir: Path, api: str = "inference") -> str | None:
    """Where the run folder's gate answers for `api` (inference or management; gate.json), if
    there is one: config.properties' addresses are then TorchServe's own, behind it."""
    try:
        found = json.loads((Path(run_dir) / "gate.json").read_text())
        return found["address" if api == "inference" else api]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def port(api: str) -> int:
    env, default = PORTS[api]
    return int(os.environ.get(env, default))


def read_properties(path: Path) -> dict:
    """key=value lines of a Java .properties file (enough for the addresses we write)."""
    props = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "!")):
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def local_url(address: str) -> str:
    """A bind address as a URL to call: a server listening on every interface is reached locally."""
    return address.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]").rstrip("/")


def too_large(body: bytes) -> Response:
    """TorchServe's own 413 for a body over max_request_size comes without JSON: say it in ours."""
    message = f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}"
    payload = {"code": 413, "type": "body_too_large", "message": message}
    return Response(413, {}, json.dumps(payload).encode())


def is_key_refused(resp: Response) -> bool:
    return resp.status == 401 or (resp.status == 400 and
                                  resp.json().get("type") == "InvalidKeyException")


def read_stream(answer, model: str):
    """The lines of a streamed answer: yields each {"step", "total"} and then the answer; an
    error on the last line is a ServerError, a stream that ends without an answer is cut short."""
    try:
        for raw in answer:
            line = raw.strip()
            if not line:
                continue
            item = json.loads(line)
            if isinstance(item, dict) and set(item) == {"step", "total"}:
                yield item
                continue
            if isinstance(item, dict) and {"code", "type", "message"} <= set(item):
                raise ServerError(int(item["code"]), item, " (the stream's last line)")
            yield item
            return
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ServerUnreachable(f"the streamed answer of {model!r} was cut short ({e})") from None
    raise ServerUnreachable(f"the streamed answer of {model!r} ended before its result")


class Client:
    """Client(base_url=None, run_dir=None): classify / depth / generate over the REST API."""

    def __init__(self, base_url: str | None = None, run_dir=None,
                 management_url: str | None = None, timeout: float = 120.0,
                 retry_seconds: float | None = None):
        self.run_dir = Path(run_dir) if run_dir else default_run_dir()
        config = self.run_dir / "config.properties"
        props = read_properties(config) if config.is_file() else {}
        self.base_url = local_url(base_url or gate_address(self.run_dir)
                                  or props.get("inference_address")
                                  or f"http://127.0.0.1:{port('inference')}")
        self.management_url = local_url(management_url
                                        or gate_address(self.run_dir, "management")
                                        or props.get("management_address")
                                        or f"http://127.0.0.1:{port('management')}")
        self.key_file = self.run_dir / "key_file.json"
        self.timeout = timeout
        self.retry_seconds = retry_budget() if retry_seconds is None else retry_seconds
        self.retries = 0      # retried tries so far (the load bench reports them)
        self._keys: dict | None = None
        self._lock = threading.Lock()
        # never send a local request (and its key) through an http_proxy from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- keys -------------------------------------------------------------------------------
    def _read_keys(self) -> dict:
        try:
            return json.loads(self.key_file.read_text())
        except FileNotFoundError:
            return {}     # token authorisation off: send no key
        except json.JSONDecodeError:
            return {}     # caught mid-write by TorchServe; the retry reads it again

    def key(self, kind: str) -> str | None:
        with self._lock:
            if self._keys is None:
                self._keys = self._read_keys()
            return self._keys.get(kind, {}).get("key")

    def refresh_key(self, kind: str, refused: str | None) -> None:
        """After `refused` was turned down: take a newer key from the file, or have one made."""
        with self._lock:
            self._keys = self._read_keys()
            if self._keys.get(kind, {}).get("key") not in (refused, None):
                return
            api_key = self._keys.get("API", {}).get("key")
            if api_key:
                self._send("POST", f"{self.management_url}/token?type={kind}", None,
                           {"Authorization": f"Bearer {api_key}"})
                self._keys = self._read_keys()

    # --- HTTP -------------------------------------------------------------------------------
    def _send(self, method: str, url: str, body: bytes | None, headers: dict) -> Response:
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            try:
                with self._opener.open(req, timeout=self.timeout) as r:
                    return Response(r.status, dict(r.headers), r.read())
            except urllib.error.HTTPError as e:
                answer = Response(e.code, dict(e.headers), e.read())
                return too_large(body) if e.code == 413 and not answer.body else answer
        # a connection refused, reset or timed out, or an answer cut short while it was read
        # (http.client.IncompleteRead, RemoteDisconnected): nothing usable came back
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise ServerTimeout(f"{url} sent no answer within {self.timeout:g} s") from None
            if body and len(body) > MAX_BODY_BYTES and isinstance(reason, ConnectionError):
                return too_large(body)   # TorchServe's 413 came while the body was still sent
            raise ServerUnreachable(f"cannot reach {url} ({reason}); is `pixtok serve` "
                                    "running?") from None

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict | None = None, kind: str | None = "inference") -> Response:
        """One call with the key of `kind` (inference, management or None), re-keyed if refused."""
        for attempt in range(3):
            key = self.key(kind) if kind else None
            sent = dict(headers or {})
            if key:
                sent["Authorization"] = f"Bearer {key}"
            resp = self._send(method, url, body, sent)
            if not (kind and is_key_refused(resp)) or attempt == 2:
                return resp
            self.refresh_key(kind, key)
        return resp

    def predict(self, model: str, body: bytes, content_type: str,
                idempotent: bool = True) -> dict:
        """POST /predictions/<model> -> the answer's JSON; ServerError on any non-200.

        An idempotent call is retried (see the module's docstring) for up to retry_seconds."""
        url = f"{self.base_url}/predictions/{model}"
        budget = self.retry_seconds if idempotent else 0.0
        start, attempt = time.monotonic(), 0
        while True:
            try:
                resp = self.request("POST", url, body, {"Content-Type": content_type})
                failure = resp if worth_retrying(resp) else None
            except ServerUnreachable as e:
                resp, failure = None, e
            if failure is None:
                break
            delay = backoff_delay(attempt, resp.header("Retry-After") if resp else None)
            if time.monotonic() - start + delay > budget:
                note = (f" (gave up after {attempt + 1} tries in "
                        f"{time.monotonic() - start:.1f} s)" if attempt else "")
                if resp is None:
                    raise ServerUnreachable(f"{failure}{note}") from None
                break
            time.sleep(delay)
            attempt += 1
            self.retries += 1
        if resp.status != 200:
            note = (f" (gave up after {attempt + 1} tries in {time.monotonic() - start:.1f} s)"
                    if attempt else "")
            raise ServerError(resp.status, explain(resp, model), note)
        return resp.json()

    # --- the three tasks --------------------------------------------------------------------
    def classify(self, image_bytes: bytes, model: str = DEFAULT_MODELS["classify"],
                 content_type: str = "application/octet-stream") -> dict:
        """-> {"label", "index", "score", "top_k": [{"label", "index", "score"}, ...]}"""
        return self.predict(model, image_bytes, content_type)

    def depth(self, image_bytes: bytes, model: str = DEFAULT_MODELS["depth"],
              content_type: str = "application/octet-stream") -> dict:
        """-> {"width", "height", "unit", "min", "max", "depth_png"}"""
        return self.predict(model, image_bytes, content_type)

    def generate(self, label, model: str = DEFAULT_MODELS["generate"], **opts) -> dict:
        """label (name or index), seed, steps, sampler, guidance, num_images -> {"images", ...}

        An option left at None is left out, so the server's default applies. Retried on
        overload only with a seed (then a retry gives the same bytes)."""
        opts = {k: v for k, v in opts.items() if v is not None}
        body = json.dumps({"label": label, **opts}).encode()
        return self.predict(model, body, "application/json", idempotent="seed" in opts)

    def generate_stream(self, label, model: str = DEFAULT_MODELS["generate"], **opts):
        """Like generate(), with the answer streamed: yields {"step": i, "total": n} after each
        sampler step, then the answer ({"images", ...}) last. A refusal before the first step
        (a bad field, an unknown model) raises ServerError as generate() does, and so does an
        error sent as the stream's last line (the server stopping mid-way). Overload is retried
        as in generate() (only with a seed); a stream that has begun never is."""
        opts = {k: v for k, v in opts.items() if v is not None}
        body = json.dumps({"label": label, **opts, "stream": True}).encode()
        answer = self._open_stream(model, body, idempotent="seed" in opts)
        with answer:
            yield from read_stream(answer, model)

    def _open_stream(self, model: str, body: bytes, idempotent: bool):
        """POST a streamed request -> the open HTTP answer (status 200), re-keyed and retried
        as predict() does."""
        url = f"{self.base_url}/predictions/{model}"
        budget = self.retry_seconds if idempotent else 0.0
        start, attempt, refused = time.monotonic(), 0, 0
        while True:
            key = self.key("inference")
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            req = urllib.request.Request(url, data=body, method="POST", headers=headers)
            try:
                return self._opener.open(req, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                resp = Response(e.code, dict(e.headers), e.read())
            except (OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise ServerTimeout(f"{url} sent no answer within {self.timeout:g} s") from None
                raise ServerUnreachable(f"cannot reach {url} ({reason}); is `pixtok serve` "
                                        "running?") from None
            if is_key_refused(resp) and refused < 2:
                refused += 1
                self.refresh_key("inference", key)
                continue
            delay = backoff_delay(attempt, resp.header("Retry-After"))
            if not worth_retrying(resp) or time.monotonic() - start + delay > budget:
                raise ServerError(resp.status, explain(resp, model))
            time.sleep(delay)
            attempt += 1
            self.retries += 1

    # --- management -------------------------------------------------------------------------
    def management(self, method: str, path: str) -> Response:
        return self.request(method, f"{self.management_url}/{path.lstrip('/')}",
                            kind="management")

    def describe(self, model: str) -> dict | None:
        """The management API's description of a model (workers and their status), or None."""
        resp = self.management("GET", f"models/{model}")
        if resp.status != 200:
            return None
        found = resp.json()
        return found[0] if isinstance(found, list) and found else None

    def is_ready(self, model: str) -> bool:
        """True once a worker of the model is READY (/ping says Healthy even while they crash)."""
        info = self.describe(model)
        return bool(info) and any(w.get("status") == "READY" for w in info.get("workers", []))
