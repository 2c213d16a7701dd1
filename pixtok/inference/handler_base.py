"""The TorchServe side of every pixtok handler: initialize / preprocess / inference / postprocess.

It never imports `ts` (TorchServe 0.12 gets no more security fixes, so our code leans on as little
of it as it can); TorchServe only hands it a list of requests and a context. A bad item answers
its own 4xx through context.set_response_status(code, phrase, idx) while the rest of the batch
answers 200, and nothing a client sends can take the worker down.

With TorchServe's kservev2 envelope on (service_envelope=kservev2, KServe's open inference
protocol), handle() gets the "inputs" of one v2 request instead of a batch of requests; they are
read here (see "KServe v2" below and serving/deploy/kserve/README.md). Plain REST is unchanged.
On a graceful stop the handler finishes or refuses what it holds (drain.py).

A generator request with "stream": true is answered in chunks: one line {"step": i, "total": n}
per sampler step, sent while the batch runs through TorchServe's intermediate responses (the
handler's send_intermediate, the one place that touches `ts`), then the usual answer as the last
line. TorchServe sends each chunk of the HTTP answer as it comes.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import sys
import tempfile
from http import HTTPStatus
from pathlib import Path

import numpy as np
from PIL import Image

from .drain import SHUTTING_DOWN, Drain
from .runtime import describe_backend, pick_device
from .validate import HF_NAMES, RequestError

log = logging.getLogger(__name__)
STREAM_CONTENT_TYPE = "application/x-ndjson"     # a streamed answer: one JSON object per line
REPOSITORY_PACKAGES = {"training", "serving", "export", "tools"}    # never shipped in an archive


# A streamed request's cancel token: pixtok's gate (serving/gate.py) gives every request one and,
# when the client leaves mid-stream, makes the file CANCEL_DIR/TOKEN in the temp folder the
# workers share with it (the run folder's tmp/); the sampler stops at its next step (TorchServe
# itself never tells a worker that its client left)
CANCEL_HEADER = "x-pixtok-cancel-token"
CANCEL_DIR = "pixtok-cancelled"
TOKEN = re.compile(r"^[0-9a-f]{32}$")


def cancel_marker(headers: dict) -> Path | None:
    """The file whose existence says that this request's client has left, or None."""
    for key, value in headers.items():
        if key.lower() == CANCEL_HEADER:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if isinstance(value, str) and TOKEN.match(value):
                return Path(tempfile.gettempdir()) / CANCEL_DIR / value
    return None


def content_type(headers: dict) -> str | None:
    for key, value in headers.items():
        if key.lower() == "content-type" and isinstance(value, str):
            return value
    return None


def request_body(item: dict):
    """The payload of one request: the raw body, or the one field of a multipart form."""
    if "body" in item:
        return item["body"]
    if "data" in item:
        return item["data"]
    values = list(item.values())
    return values[0] if len(values) == 1 else None


# --- KServe v2 ---------------------------------------------------------------------------------
# The kservev2 envelope parses ONE v2 request (it reads only the first request of a TorchServe
# batch, so KServe configs use batchSize 1) and hands handle() its "inputs": each a dict
# {"name", "shape", "datatype", "data"} where a BYTES input's data is its first element and any
# other's is a nested list shaped by "shape". Each string handle() returns becomes one "outputs"
# entry {"name": <the input's name>, "datatype": "BYTES", "shape": [1], "data": [<the string>]}.
INT_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
FLOAT_TYPES = ("FP16", "FP32", "FP64")
GENERATE_INPUTS = {   # a generator's named v2 inputs -> (datatypes accepted, the one documented)
    "label": (("BYTES", *INT_TYPES), "BYTES (a class name) or INT64 (a class index)"),
    "seed": (INT_TYPES, "INT64"), "steps": (INT_TYPES, "INT64"),
    "sampler": (("BYTES",), "BYTES"), "guidance": ((*FLOAT_TYPES, *INT_TYPES), "FP32"),
    "num_images": (INT_TYPES, "INT64"),
}
GENERATE_INPUTS.update({theirs: GENERATE_INPUTS[ours] for theirs, ours in HF_NAMES.items()})


def is_v2_inputs(data: list) -> bool:
    """True when the kservev2 envelope unpacked a v2 request: every item is a v2 input."""
    return bool(data) and all(isinstance(d, dict) and "name" in d and "datatype" in d
                              for d in data)


def bad_input(name, message: str) -> RequestError:
    return RequestError(400, "bad_input", f"input {name!r}: {message}")


def v2_image(item: dict) -> bytes:
    """A v2 image input -> image file bytes. BYTES: a base64-encoded image file; UINT8: the
    pixels, shape [H, W, C] with C 1 or 3 (or [H, W]), sent on as a PNG."""
    name, dtype, data = item["name"], item["datatype"], item.get("data")
    if dtype == "BYTES":
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).decode("ascii", "replace")
        if not isinstance(data, str):
            raise bad_input(name, "BYTES data must be a list holding one base64-encoded image")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_input(name, "BYTES data is not base64: send the image file base64-encoded "
                            "(base64 -w0 image.png)") from None
    if dtype == "UINT8":
        pixels = np.asarray(data)                                       # (H, W[, C])
        shape = list(pixels.shape)
        if (pixels.ndim not in (2, 3) or (pixels.ndim == 3 and shape[2] not in (1, 3))
                or pixels.size == 0 or pixels.dtype.kind not in "iu"):
            raise bad_input(name, f"UINT8 pixels must be integers shaped [H, W, C] with C 1 or "
                            f"3, got shape {shape}")
        if pixels.min() < 0 or pixels.max() > 255:
            raise bad_input(name, "UINT8 pixels must lie in 0..255")
        pixels = pixels.astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and shape[2] == 1 else pixels).save(
            buf, "PNG", compress_level=1)
        return buf.getvalue()
    raise bad_input(name, f"datatype {dtype!r} is not accepted: send BYTES (a base64-encoded "
                    "image file) or UINT8 (pixels shaped [H, W, C])")


def v2_generate_body(inputs: list[dict]) -> dict:
    """A generator's named v2 inputs -> the JSON body of its REST request, which the core then
    checks as it checks any body (so the same fields, defaults and 4xx answers apply)."""
    body = {}
    for item in inputs:
        name, dtype, data = item["name"], item["datatype"], item.get("data")
        if name not in GENERATE_INPUTS:
            raise RequestError(400, "bad_field", f"unknown input {name!r}; expected "
                               + ", ".join(GENERATE_INPUTS))
        if name in body:
            raise bad_input(name, "given twice")
        accepted, documented = GENERATE_INPUTS[name]
        if dtype not in accepted:
            raise bad_input(name, f"datatype {dtype!r} is not accepted; use {documented}")
        if dtype != "BYTES":
            values = np.asarray(data).ravel()
            if values.size != 1:
                raise bad_input(name, f"expected one value, got {values.size}")
            data = values[0].item()     # a Python int or float, as a JSON body would give
        body[name] = data
    return body


def foreign_modules(model_dir) -> list[str]:
    """Loaded modules of this repository that did not come from the archive in model_dir: the
    rest of the repository, or a `pixtok` core found elsewhere than the archive's own copy."""
    root = os.path.realpath(model_dir or ".") + os.sep
    found = []
    for name, module in list(sys.modules.items()):
        top = name.split(".")[0]
        origin = getattr(module, "__file__", None)
        if top in REPOSITORY_PACKAGES or (
                top == "pixtok" and origin and not os.path.realpath(origin).startswith(root)):
            found.append(name)
    return sorted(found)


class PixtokHandler:
    """Subclasses implement load(model_dir, device) -> a core with preprocess() and predict()."""

    def __init__(self):
        self.core = None
        self.backend = "none"
        self.initialized = False
        self.drain = Drain()
        self.streaming: set[int] = set()     # requests of the batch in hand that stream

    def send_intermediate(self, text: str, idx: int, context) -> None:
        """Send `text` to request idx's client now, as one chunk of its answer (TorchServe's
        intermediate response). A handler whose core can stream implements it."""
        raise NotImplementedError

    def progress_sender(self, good: list[int], batch: int, context):
        """progress(j, step, total) for the core: one {"step", "total"} line to the client of
        request good[j]; the answer's headers go with the first."""
        markers: dict[int, Path | None] = {}

        def progress(j: int, step: int, total: int) -> bool | None:
            idx = good[j]
            if idx not in self.streaming:
                self.streaming.add(idx)
                context.set_response_content_type(idx, STREAM_CONTENT_TYPE)
                context.set_response_header(idx, "X-Pixtok-Batch-Size", str(batch))
                context.set_response_header(idx, "X-Pixtok-Backend", self.backend)
                markers[idx] = cancel_marker(context.get_all_request_header(idx) or {})
            marker = markers.get(idx)
            if marker is not None and marker.exists():     # the client left: stop sampling
                marker.unlink(missing_ok=True)
                log.info("pixtok: the client cancelled the request after %d of %d steps",
                         step, total)
                return False
            self.send_intermediate(json.dumps({"step": step, "total": total}) + "\n", idx,
                                   context)
            return None
        return progress

    def load(self, model_dir: str, device):
        raise NotImplementedError

    def initialize(self, context):
        props = context.system_properties
        device = pick_device(props.get("gpu_id"))
        self.core = self.load(props.get("model_dir"), device)
        self.backend = getattr(getattr(self.core, "backend", None), "name", "custom")
        if hasattr(self.core, "should_stop"):     # a generator checks it at every sampler step
            self.core.should_stop = self.drain.overdue
        self.drain.install()
        self.initialized = True
        log.info("pixtok: %s ready on %s (%s)", context.model_name, device,
                 describe_backend(getattr(self.core, "backend", None)))
        # an archive must run on a stock TorchServe: say so loudly if it leaned on an install
        leaked = foreign_modules(props.get("model_dir"))
        if leaked:
            log.warning("pixtok: archive is not self-contained, it imported %s", leaked)

    def preprocess(self, data: list[dict], context) -> dict:
        """Each request -> model input or the RequestError that answers it: {idx: input | error}."""
        inputs = {}
        for idx, item in enumerate(data):
            try:
                ctype = content_type(context.get_all_request_header(idx) or {})
                inputs[idx] = self.core.preprocess(request_body(item), ctype)
            except RequestError as e:
                inputs[idx] = e
            except Exception as e:   # a decoder failing in a way we did not foresee: bad input
                log.exception("pixtok: could not read request %d", idx)
                inputs[idx] = RequestError(400, "bad_request", f"could not read the request ({e})")
        return inputs

    def inference(self, inputs: dict, context=None) -> dict:
        """One batched run over the good inputs: {idx: result | error}. Requests that ask for a
        stream hear of each sampler step while it runs (with a context to send through)."""
        good = [i for i, x in inputs.items() if not isinstance(x, RequestError)]
        results = dict(inputs)
        if not good:
            return results
        streams = context is not None and any(
            isinstance(inputs[i], dict) and inputs[i].get("stream") for i in good)
        kwargs = {"progress": self.progress_sender(good, len(inputs), context)} if streams else {}
        try:
            outputs = self.core.predict([inputs[i] for i in good], **kwargs)
        except RequestError as e:    # one answer for the whole batch (a stop cut it off)
            outputs = [e] * len(good)
        except Exception:
            # A batch that fails as a whole is retried item by item, so one input that trips the
            # model cannot fail the requests it happened to be batched with.
            log.exception("pixtok: batch of %d failed; retrying one by one", len(good))
            outputs = [self.predict_one(inputs[i]) for i in good]
        results.update(zip(good, outputs))
        return results

    def predict_one(self, x):
        try:
            return self.core.predict([x])[0]
        except RequestError as e:
            return e
        except Exception as e:
            log.exception("pixtok: prediction failed")
            return RequestError(500, "internal_error", f"the model failed on this input ({e})")

    def postprocess(self, results: dict, context) -> list[str]:
        """Results -> one JSON string per request, each with its own HTTP status."""
        out = []
        batch = str(len(results))
        for idx in range(len(results)):
            result = results[idx]
            if isinstance(result, RequestError):
                phrase = HTTPStatus(result.code).phrase
                context.set_response_status(result.code, phrase, idx)
                result = result.to_dict()
            if idx in self.streaming:    # the last line of a stream; its headers went out
                out.append(json.dumps(result) + "\n")
                continue
            context.set_response_content_type(idx, "application/json")
            context.set_response_header(idx, "X-Pixtok-Batch-Size", batch)
            context.set_response_header(idx, "X-Pixtok-Backend", self.backend)
            out.append(json.dumps(result))
        return out

    def v2_bodies(self, inputs: list[dict]) -> list[tuple]:
        """A v2 request's inputs -> [(body, content type)] for the core: one image per input.
        A generator overrides this: its named inputs make one request."""
        return [(v2_image(item), "application/octet-stream") for item in inputs]

    def handle_v2(self, inputs: list[dict], context) -> list[str]:
        """One v2 request: its inputs run as one batch, and one bad input fails the request
        with that input's 4xx (one output holding {"code", "type", "message"})."""
        try:
            bodies = self.v2_bodies(inputs)
            model_inputs = {i: self.core.preprocess(body, ctype)
                            for i, (body, ctype) in enumerate(bodies)}
        except RequestError as e:
            results = {0: e}
        except Exception as e:   # as in preprocess(): an input we could not read is a 400
            log.exception("pixtok: could not read a v2 request")
            results = {0: RequestError(400, "bad_request", f"could not read the request ({e})")}
        else:
            results = self.inference(model_inputs)
        context.set_response_content_type(0, "application/json")
        context.set_response_header(0, "X-Pixtok-Batch-Size", str(len(results)))
        context.set_response_header(0, "X-Pixtok-Backend", self.backend)
        error = next((r for r in results.values() if isinstance(r, RequestError)), None)
        if error is not None:
            context.set_response_status(error.code, HTTPStatus(error.code).phrase, 0)
            return [error.to_json()]
        return [json.dumps(results[i]) for i in range(len(results))]

    def handle(self, data: list[dict], context) -> list[str]:
        if self.drain.draining:    # refused, never dropped: the server is about to stop
            count = 1 if is_v2_inputs(data) else len(data)
            return self.postprocess({i: SHUTTING_DOWN for i in range(count)}, context)
        self.drain.busy = True
        self.streaming = set()
        try:
            if is_v2_inputs(data):
                return self.handle_v2(data, context)
            inputs = self.preprocess(data, context)
            results = self.inference(inputs, context)
            log.info("pixtok: batch of %d, %d rejected", len(data),
                     sum(isinstance(r, RequestError) for r in results.values()))
            return self.postprocess(results, context)
        finally:
            self.drain.busy = False
            if self.drain.draining:
                self.drain.idle()
