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
import asyncio
import hmac
import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import Request, Response  # at module level: route annotations resolve here

from pixtok.archive import read_archive_json
from pixtok.inference.handler_base import STREAM_CONTENT_TYPE, v2_generate_body
from pixtok.inference.validate import MAX_BODY_BYTES, RequestError
from pixtok.tasks import served_tasks
from serving.kserve_v2 import (
    HEADER_LENGTH,
    IMAGE_CONTENT,
    V2Error,
    bad,
    clip,
    decode_v2,
    image_files,
    input_array,
    only_input,
    tensor,
    triton_config,
)

log = logging.getLogger("pixtok.kserve")

# task -> (batch size, max batch delay in ms): TorchServe's, from the task registry
BATCHING = {name: (t.serving.batching["batchSize"], t.serving.batching["maxBatchDelay"])
            for name, t in served_tasks().items()}
MAX_REQUEST_BYTES = 2 * MAX_BODY_BYTES      # as TorchServe's max_request_size in `pixtok serve`
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/ping")    # probes: no key needed
CLOSED_PREFIXES = ("/v2/repository", "/v1/", "/docs", "/openapi.json", "/redoc")
# a body over the limit but under DRAIN_FACTOR times it is read and dropped before the 413, so
# the client reads a JSON answer instead of a reset connection; a larger one is cut off
DRAIN_FACTOR = 4
PID_FILE = "kserve.pid"          # in the run folder's tmp/, beside TorchServe's pid file


class Overloaded(RequestError):
    """A model's queue is full: 503 at once, with Retry-After (whole seconds) as a hint of when
    the requests waiting now will have run."""

    def __init__(self, model: str, waiting: int, retry_after: int):
        super().__init__(503, "ServiceUnavailableException",
                         f"model {model!r} is overloaded: {waiting} requests are waiting, "
                         f"the most it queues (PIXTOK_QUEUE_SIZE); retry after {retry_after} s")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)}


# --- batching ----------------------------------------------------------------------------------
class Batcher:
    """Requests of one model -> batches: a request is a list of items; a batch takes whole
    requests up to `size` items, waiting at most `delay_s` after the first (a request larger than
    `size` runs alone). run(items) -> one result or exception per item, on one thread."""

    def __init__(self, run, size: int, delay_s: float, name: str = "",
                 max_waiting: int | None = None):
        self.run, self.size, self.delay_s = run, max(1, size), max(0.0, delay_s)
        self.name, self.max_waiting = name, max_waiting
        self.queue: asyncio.Queue | None = None
        self.carry = None
        self.running = 0          # the size of the batch on the model thread now
        self.batch_s = 0.0        # how long the last batch ran
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pixtok-model")

    def retry_after(self, waiting: int) -> int:
        """Whole seconds until the requests waiting now have run, at the last batch's pace."""
        batches = -(-waiting // self.size) + 1
        return max(1, min(60, math.ceil(batches * self.batch_s)))

    async def submit(self, items: list) -> tuple[list, int]:
        """-> (one result or exception per item, the size of the batch they ran in); Overloaded
        at once when max_waiting requests are waiting already."""
        loop = asyncio.get_running_loop()
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self.loop())
        waiting = self.queue.qsize() + (self.carry is not None)
        if self.max_waiting is not None and waiting >= self.max_waiting:
            raise Overloaded(self.name, waiting, self.retry_after(waiting))
        future = loop.create_future()
        await self.queue.put((items, future))
        return await future

    async def next_request(self, timeout: float | None):
        if self.carry is not None:
            found, self.carry = self.carry, None
            return found
        if timeout is None:
            return await self.queue.get()
        if timeout <= 0:
            return self.queue.get_nowait()       # QueueEmpty when none is waiting
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def loop(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.next_request(None)]
            count, deadline = len(batch[0][0]), loop.time() + self.delay_s
            while count < self.size:
                try:
                    found = await self.next_request(deadline - loop.time())
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if count + len(found[0]) > self.size:
                    self.carry = found           # first in the next batch
                    break
                batch.append(found)
                count += len(found[0])
            items = [item for request, _ in batch for item in request]
            self.running, began = len(items), loop.time()
            try:
                results = await loop.run_in_executor(self.executor, self.run_all, items)
            except Exception as e:               # never leave a client waiting
                results = [e] * len(items)
            self.batch_s = loop.time() - began
            start = 0
            for request, future in batch:
                if not future.done():
                    future.set_result((results[start:start + len(request)], len(items)))
                start += len(request)

    def run_all(self, items: list) -> list:
        """One run over the batch; if it fails as a whole, item by item, so one input that trips
        the model cannot fail the requests it was batched with."""
        try:
            return list(self.run(items))
        except Exception:
            log.exception("pixtok: batch of %d failed; retrying one by one", len(items))
        out = []
        for item in items:
            try:
                out.append(self.run([item])[0])
            except Exception as e:
                log.exception("pixtok: prediction failed")
                out.append(e if isinstance(e, RequestError) else
                           RequestError(500, "internal_error",
                                        f"the model failed on this input ({e})"))
        return out


def first_error(results: list):
    for r in results:
        if isinstance(r, RequestError):
            return r
        if isinstance(r, Exception):
            return RequestError(500, "internal_error", f"the model failed ({r})")
    return None


# --- the models --------------------------------------------------------------------------------
def kserve_model_base():
    from kserve import Model

    return Model


class PixtokModel:
    """What the three task models share: REST answers, v2 parsing, batching, metadata."""

    task = ""
    device = "cpu"
    inputs: list[dict] = []
    outputs: list[dict] = []

    def setup(self, core, batch_size: int, delay_ms: float):
        self.core = core
        self.backend = getattr(getattr(core, "backend", None), "name", "torch")
        self.batcher = Batcher(self.run, batch_size, delay_ms / 1000, self.name)
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return self.inputs

    def get_output_types(self) -> list[dict]:
        return self.outputs

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # REST: one request, one item; the answer as TorchServe's handler gives it
    async def rest(self, body: bytes, content_type: str | None) -> tuple[dict, int]:
        item = await self.in_thread(self.core.preprocess, body, content_type)
        return await self.answer(item)

    async def answer(self, item) -> tuple[dict, int]:
        [result], batch_size = await self.batcher.submit([item])
        error = first_error([result])
        if error:
            raise error
        return self.rest_answer(result), batch_size

    async def stream(self, item: dict, request: Request):
        """A request that asked for a stream -> its events as they come: ("step", {"step",
        "total"}, batch size) per sampler step, then ("done", answer or RequestError, batch
        size). When the client has gone the generation stops at its next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def on_step(step: int, total: int):          # on the model's thread
            if gone.is_set():
                return False
            loop.call_soon_threadsafe(events.put_nowait, (
                "step", {"step": step, "total": total}, self.batcher.running))
            return None

        async def run():
            try:
                answer, size = await self.answer({**item, "on_step": on_step})
                events.put_nowait(("done", answer, size))
            except RequestError as e:
                if e.type == "cancelled":
                    log.info("pixtok: %s: %s", self.name, e.message)
                events.put_nowait(("done", e, self.batcher.running))

        task = loop.create_task(run())
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), 1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield event
                if event[0] == "done":
                    return
        finally:
            gone.set()       # the client left, or the answer is out: no more steps to anyone
            if not task.done():
                task.add_done_callback(lambda t: t.exception())    # never "never retrieved"

    # v2: one request, its inputs one batch; any bad input fails the request with its 4xx
    async def predict(self, payload, headers=None, response_headers=None):
        from kserve import InferRequest, InferResponse

        if not isinstance(payload, InferRequest):
            raise V2Error(400, f"model {self.name!r} speaks the v2 protocol: POST "
                          f"/v2/models/{self.name}/infer")
        try:
            items = await self.in_thread(self.v2_items, payload)
            results, _ = await self.batcher.submit(items)
            error = first_error(results)
            if error:
                raise error
            outputs, parameters = self.v2_outputs(items, results)
        except RequestError as e:
            raise V2Error(e.code, e.message, getattr(e, "headers", None)) from None
        except V2Error:
            raise
        except FloatingPointError as e:     # the model's fault, not the client's
            raise V2Error(500, str(e)) from None
        except Exception as e:       # a decoder failing in a way we did not foresee
            log.error("pixtok: could not answer a v2 request: %s", clip(str(e), 300))
            raise V2Error(400, f"could not read the request ({type(e).__name__})") from None
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=outputs, parameters=parameters,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


# noqa: C901 below, and the length: this factory is the bodies of the three Model classes (kept
# inside so that importing this module needs no kserve); mccabe counts their methods as one
# function's branches, and each method is short
def make_model_classes():  # noqa: C901
    """The kserve.Model subclasses (built here, so importing this module needs no kserve)."""
    Model = kserve_model_base()

    class ClassifierModel(PixtokModel, Model):
        """`image` BYTES [N] or `pixels` UINT8 [N, H, W, C] -> `probabilities` FP32 [N, K] and
        `label` BYTES [N]; REST: an image -> {"label", "index", "score", "top_k"}."""

        task = "classify"

        def __init__(self, name: str, core, batch_size: int, delay_ms: float):
            Model.__init__(self, name)
            self.setup(core, batch_size, delay_ms)
            k = len(core.labels)
            self.inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                           {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}]
            self.outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}]

        def run(self, items):
            return list(self.core.probabilities(items))

        def rest_answer(self, probs):
            return self.core.postprocess(probs)

        def v2_items(self, request):
            files = image_files(only_input(request, ("image", "pixels")))
            return [self.core.preprocess(f, "application/octet-stream") for f in files]

        def v2_outputs(self, items, results):
            probs = np.stack(results).astype(np.float32)
            if not np.isfinite(probs).all():
                raise FloatingPointError("the model produced non-finite scores")
            labels = np.array([self.core.labels[i] for i in probs.argmax(axis=1)],
                              dtype=object)
            return [tensor("probabilities", "FP32", probs), tensor("label", "BYTES", labels)], None

    class DepthModel(PixtokModel, Model):
        """`image` or `pixels` as a classifier's -> `depth` FP32 [N, H, W] in metres at the
        images' size (one size per request); REST: an image -> {"width", ..., "depth_png"}."""

        task = "depth"

        def __init__(self, name: str, core, batch_size: int, delay_ms: float):
            Model.__init__(self, name)
            self.setup(core, batch_size, delay_ms)
            self.inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                           {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}]
            self.outputs = [{"name": "depth", "datatype": "FP32", "shape": [-1, -1, -1]}]

        def run(self, items):
            return self.core.depth_maps(items)

        def rest_answer(self, depth_m):
            return self.core.postprocess(depth_m)

        def v2_items(self, request):
            files = image_files(only_input(request, ("image", "pixels")))
            items = [self.core.preprocess(f, "application/octet-stream") for f in files]
            sizes = sorted({size for _, size in items})
            if len(sizes) > 1:
                raise RequestError(400, "bad_input", "the images of one request must have one "
                                   f"size (depth is [N, H, W]); got {sizes}")
            return items

        def v2_outputs(self, items, results):
            depth = np.stack(results).astype(np.float32)
            if not np.isfinite(depth).all():
                raise FloatingPointError("the model produced non-finite depths")
            return [tensor("depth", "FP32", depth)], {"unit": "m"}

    class GeneratorModel(PixtokModel, Model):
        """`label` BYTES/INT64, `seed`, `steps`, `num_images` INT64, `sampler` BYTES, `guidance`
        FP32 (or the Hugging Face names) -> `images` BYTES [num_images], base64 PNGs; REST: the
        JSON body of docs/architecture.md -> {"images", "label", "seed", ...}."""

        task = "generate"

        def __init__(self, name: str, core, batch_size: int, delay_ms: float):
            Model.__init__(self, name)
            self.setup(core, batch_size, delay_ms)
            one = [1]
            self.inputs = [{"name": "label", "datatype": "BYTES", "shape": one},
                           {"name": "seed", "datatype": "INT64", "shape": one},
                           {"name": "steps", "datatype": "INT64", "shape": one},
                           {"name": "num_images", "datatype": "INT64", "shape": one},
                           {"name": "sampler", "datatype": "BYTES", "shape": one},
                           {"name": "guidance", "datatype": "FP32", "shape": one}]
            self.outputs = [{"name": "images", "datatype": "BYTES", "shape": [-1]}]

        def run(self, items):
            # a streamed REST request carries its step callback (PixtokModel.stream)
            return self.core.predict(items, progress=lambda j, step, total:
                                     items[j]["on_step"](step, total))

        def rest_answer(self, answer):
            return answer

        def v2_items(self, request):
            inputs = []
            for item in request.inputs:
                data = input_array(item, object if item.datatype == "BYTES" else None).ravel()
                if data.size != 1:
                    raise bad(item.name, f"expected one value, got {data.size}")
                value = data[0]
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                inputs.append({"name": item.name, "datatype": item.datatype,
                               "data": value if item.datatype == "BYTES" else [value]})
            return [self.core.preprocess(v2_generate_body(inputs), "application/json")]

        def v2_outputs(self, items, results):
            answer = results[0]
            images = np.array(answer["images"], dtype=object)
            params = {k: answer[k] for k in ("label", "seed", "steps", "sampler", "guidance")}
            return [tensor("images", "BYTES", images)], params

    return {"classify": ClassifierModel, "depth": DepthModel, "generate": GeneratorModel}


# --- loading the model store -------------------------------------------------------------------
def archives(store: Path) -> dict[str, tuple[Path, str]]:
    """{model name: (archive, task)} for the .mar archives in the store (named by manifest)."""
    found = {}
    for mar in sorted(Path(store).glob("*.mar")):
        manifest = read_archive_json(mar, "MAR-INF/MANIFEST.json") or {}
        name = manifest.get("model", {}).get("modelName", mar.stem)
        task = (read_archive_json(mar, "config.json") or {}).get("task", "classify")
        found[name] = (mar, task)
    return found


def unpack(mar: Path, into: Path) -> Path:
    """An archive's files (config.json, weights) unpacked into a fresh folder."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with zipfile.ZipFile(mar) as z:
        for member in z.namelist():
            if member.startswith(("config.json", "index_to_name.json")) or \
                    member.endswith((".safetensors", ".onnx")):
                z.extract(member, into)     # zipfile drops absolute paths and ".." parts
    return into


def load_models(store: Path, run_dir: Path, only: list[str] | None, batch_size: int | None,
                delay_ms: float | None, queue_size: int | None = None) -> list:
    from pixtok.inference.backend import describe_backend, pick_device
    from pixtok.inference.core import load_core

    classes = make_model_classes()
    device = pick_device(0)
    models = []
    for name, (mar, task) in archives(store).items():
        if only and name not in only:
            continue
        folder = unpack(mar, run_dir / "tmp" / "kserve-models" / name)
        size, delay = BATCHING.get(task, BATCHING["classify"])
        core = load_core(task, folder, device)
        models.append(classes[task](name, core, batch_size or size,
                                    delay if delay_ms is None else delay_ms))
        models[-1].batcher.max_waiting = queue_size
        models[-1].device = device.type
        log.info("pixtok: %s (%s) ready on %s (%s)", name, task, device,
                 describe_backend(getattr(core, "backend", None)))
    return models


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
