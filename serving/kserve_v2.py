"""The KServe server's Open Inference Protocol v2 (serving/kserve_server.py): request bodies
decoded as stock clients send them, a request's inputs read, answers as typed tensors, and
Triton's model configuration.

A body is JSON unless Inference-Header-Content-Length says where its JSON header ends and the
binary tensor extension's data begins, as tritonclient sends it (its JSON mode sends no
Content-Type, so none is looked at). An `image` element is an image file's raw bytes or its
base64; `pixels` are UINT8 [N, H, W, C]; the core checks each image as it checks a REST upload.
GET /v2/models/NAME/config answers Triton's model configuration, what perf_analyzer reads.
Every refusal is a short 400 ({"error": message}, V2Error); what a client sent is never echoed
whole (clip). kserve is imported inside the functions, so importing this module needs none.
"""
from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from pixtok.inference.handler_base import v2_image
from pixtok.inference.validate import RequestError


class V2Error(Exception):
    """A v2 request the model refuses: answered {"error": message} with `code` (and `headers`)."""

    def __init__(self, code: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers or {}


def clip(value, limit: int = 80) -> str:
    """A short text for a message or a log line: what a client sent is never echoed whole."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def bad(name: str, message: str) -> RequestError:
    return RequestError(400, "bad_input", f"input {name!r}: {message}")


# --- v2 requests as stock clients send them -------------------------------------------------------
HEADER_LENGTH = "inference-header-content-length"
MAX_DIMS = 8


def v2_refusal(message: str) -> V2Error:
    return V2Error(400, f"not a v2 inference request: {message}")


def v2_input(spec, raw: bytes, start: int):
    """One entry of a request's "inputs" -> (kserve InferInput, where the next binary input
    starts). Its data is JSON `data`, or `binary_data_size` bytes of the binary part, kept as
    bytes (BYTES elements are not decoded as text: image files are binary)."""
    from kserve import InferInput

    if not isinstance(spec, dict):
        raise v2_refusal("each input is an object")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise v2_refusal("each input has a `name`, a string of 1 to 64 characters")
    if not isinstance(datatype, str) or not 0 < len(datatype) <= 16:
        raise v2_refusal(f"input {name!r} needs a `datatype` such as BYTES, UINT8 or FP32")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise v2_refusal(f"input {name!r} needs a `shape`: at most {MAX_DIMS} sizes, each an "
                         "integer >= 0")
    params = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else None
    item = InferInput(name=name, shape=shape, datatype=datatype, parameters=params)
    size = (params or {}).get("binary_data_size")
    if "data" in spec:
        item.data = spec["data"]
        return item, start
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise v2_refusal(f"input {name!r} has neither `data` nor a `binary_data_size`")
    if start + size > len(raw):
        raise v2_refusal(f"input {name!r} says {size} bytes of binary data; the body holds "
                         f"{len(raw) - start} more")
    item._raw_data = raw[start:start + size]
    return item, start + size


def decode_v2(body: bytes, header_length: str | None, model_name: str):
    """A v2 request body -> kserve's InferRequest. JSON unless `Inference-Header-Content-Length`
    says where the JSON ends and the binary tensor data begins (tritonclient's JSON mode sends
    no Content-Type, so it is not looked at). Every refusal is a short 400."""
    from kserve import InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    raw = b""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise v2_refusal(f"Inference-Header-Content-Length must be the length of the JSON "
                             f"header, at most the body's {len(body)} bytes")
        body, raw = body[:int(header_length)], body[int(header_length):]
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise v2_refusal("the JSON header is not UTF-8 (binary tensor data needs "
                         "Inference-Header-Content-Length)") from None
    except json.JSONDecodeError as e:
        raise v2_refusal(f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise v2_refusal('a JSON object with a list of "inputs"')
    inputs, start = [], 0
    for spec in doc["inputs"][:16]:
        item, start = v2_input(spec, raw, start)
        inputs.append(item)
    outputs = doc.get("outputs")
    requested = [RequestedOutput(name=str(o.get("name", ""))[:64],
                                 parameters=o.get("parameters")
                                 if isinstance(o.get("parameters"), dict) else None)
                 for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else None
    request_id = doc.get("id")
    return InferRequest(model_name=model_name, infer_inputs=inputs,
                        request_id=request_id if isinstance(request_id, str) else None,
                        parameters=doc.get("parameters")
                        if isinstance(doc.get("parameters"), dict) else None,
                        request_outputs=requested or None)


# --- a request's inputs, an answer's outputs ------------------------------------------------------
def only_input(request, names: tuple[str, ...]):
    if len(request.inputs) != 1 or request.inputs[0].name not in names:
        given = [i.name for i in request.inputs]
        raise RequestError(400, "bad_input", f"send exactly one input, named "
                           f"{' or '.join(repr(n) for n in names)}; got {clip(given)}")
    return request.inputs[0]


def input_array(item, dtype) -> np.ndarray:
    """A v2 input's data as an array of its declared shape (JSON data may be flat or nested)."""
    data = item.data
    if item._raw_data is not None:       # the binary tensor extension
        try:
            return item.as_numpy()
        except Exception as e:
            raise bad(item.name, f"binary data does not fit shape {clip(item.shape)} "
                      f"({type(e).__name__})") from None
    try:
        array = np.asarray(data, dtype=object if dtype is object else None)
    except (ValueError, TypeError):
        raise bad(item.name, "the data is not a (nested) list of one type") from None
    shape = [int(s) for s in item.shape]
    if any(s < 0 for s in shape) or array.size != int(np.prod(shape)):
        raise bad(item.name, f"shape {clip(shape)} holds {int(np.prod(shape))} values, the "
                  f"data {array.size}")
    return array.reshape(shape)


def image_file(value) -> bytes:
    """One element of an `image` BYTES tensor -> an image file: base64 text (JSON, or binary
    elements that are strict base64), else the raw file bytes as the binary tensor extension
    carries them (tritonclient's binary_data=True). The core then checks the file."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        value = bytes(value)
        if not value.isascii():
            return value                         # an image file is never all ASCII
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return value                         # not base64: the core says if it is an image
    return v2_image({"name": "image", "datatype": "BYTES", "data": value})


def image_files(item) -> list[bytes]:
    """An `image` (BYTES [N] or [N, 1]: image files, raw or base64) or `pixels` (UINT8
    [N, H, W, C]) input -> N image files for the core, each checked as a REST upload is."""
    shape = [int(s) for s in item.shape]
    if item.name == "image":
        if item.datatype != "BYTES":
            raise bad("image", f"datatype {clip(item.datatype)} is not accepted: send BYTES, "
                      "each element an image file, raw or base64 (or send `pixels` as UINT8)")
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise bad("image", f"shape must be [N] (or [N, 1]), got {clip(shape)}")
        if shape[0] < 1:
            raise bad("image", "N is 0: send at least one image")
        return [image_file(f) for f in input_array(item, object).ravel()]
    if item.datatype != "UINT8":
        raise bad("pixels", f"datatype {clip(item.datatype)} is not accepted: send UINT8 "
                  "shaped [N, H, W, C] (or `image` as BYTES)")
    if len(shape) != 4:
        raise bad("pixels", f"shape must be [N, H, W, C] with C 1 or 3, got {clip(shape)}")
    if shape[0] < 1:
        raise bad("pixels", "N is 0: send at least one image")
    pixels = input_array(item, None)
    return [v2_image({"name": "pixels", "datatype": "UINT8", "data": p}) for p in pixels]


def tensor(name: str, datatype: str, array: np.ndarray):
    from kserve import InferOutput

    out = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
    out.set_data_from_numpy(array, binary_data=False)
    return out


# --- Triton's model configuration -----------------------------------------------------------------
# what an `image` BYTES element may be; the model metadata says it beside the tensor
IMAGE_CONTENT = {"content": "an image file (PNG, JPEG, WebP, BMP or GIF): its raw bytes "
                            "(binary tensor extension) or its base64 text"}
TRITON_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "INT64": "TYPE_INT64",
                "FP32": "TYPE_FP32"}


def triton_tensor(spec: dict, batched: bool, optional: bool | None = None) -> dict:
    """A v2 metadata tensor -> Triton's model configuration entry (dims without the batch
    dimension when the model batches; a [N] tensor is dims [1] reshaped to [])."""
    dims = spec["shape"][1:] if batched else spec["shape"]
    out = {"name": spec["name"], "data_type": TRITON_TYPES[spec["datatype"]],
           "dims": dims or [1]}
    if batched and not dims:
        out["reshape"] = {"shape": []}
    if optional is not None:
        out["optional"] = optional
    return out


def triton_config(model) -> dict:
    """GET /v2/models/NAME/config: Triton's model configuration (what perf_analyzer and
    tritonclient's get_model_config read): inputs, outputs, max_batch_size, batching."""
    batched = model.task != "generate"
    required = {"image"} if batched else {"label"}
    config = {
        "name": model.name, "platform": "pixtok", "backend": "pixtok",
        "max_batch_size": model.batcher.size if batched else 0,
        "input": [triton_tensor(i, batched, i["name"] not in required) for i in model.inputs],
        "output": [triton_tensor(o, batched) for o in model.outputs],
        "instance_group": [{"count": 1, "kind": "KIND_CPU" if model.device == "cpu"
                            else "KIND_GPU"}],
        "model_transaction_policy": {"decoupled": False},
        "parameters": {"pixtok_task": {"string_value": model.task}},
    }
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds":
                                      int(model.batcher.delay_s * 1e6)}
    return config
