"""Request errors and request validation shared by every pixtok handler (no TorchServe imports).

A RequestError is a client's mistake: the handler answers it with its own HTTP code and the JSON
{"code", "type", "message"}, the shape TorchServe uses for its own errors, so every 4xx from the
server reads the same. The message names the field or value that was wrong.
"""
from __future__ import annotations

import json
import math
import os

from pixtok.sampling import SAMPLERS, SAMPLING_DEFAULTS, default_steps

MAX_BODY_BYTES = int(os.environ.get("PIXTOK_MAX_BODY_BYTES", 10 * 2**20))    # 10 MB
MAX_STEPS = 1000
MAX_IMAGES = 16
# what an omitted generator field means: the sampler, steps and guidance of `pixtok sample` and
# the Gradio page (one constant, pixtok/sampling.py), seed 0 and one image
GENERATE_DEFAULTS = {"seed": 0, **SAMPLING_DEFAULTS, "num_images": 1}
# how the answer comes, not what is generated: "stream": true answers one JSON line per sampler
# step, {"step": i, "total": n}, then the usual answer as the last line (docs/serving.md)
GENERATE_FLAGS = {"stream": False}
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream", "multipart/form-data")
# the diffusers / Hugging Face names of three fields -> ours; a request may use either name, and
# both only when they agree (docs/serving.md has the two side by side)
HF_NAMES = {"guidance_scale": "guidance", "num_inference_steps": "steps",
            "num_images_per_prompt": "num_images"}


class RequestError(Exception):
    """A bad request: HTTP code, a short machine-readable type, and a message for people."""

    def __init__(self, code: int, type: str, message: str):
        super().__init__(message)
        self.code, self.type, self.message = code, type, message

    def to_dict(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def check_image_request(body, content_type: str | None) -> bytes:
    """The raw image bytes of a request, or a RequestError for a wrong content type or body."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith(IMAGE_CONTENT_TYPES):
        raise RequestError(415, "unsupported_media_type",
                           f"Content-Type {ctype!r} is not accepted: send the image bytes as "
                           "image/* or application/octet-stream")
    if not isinstance(body, (bytes, bytearray)):
        # TorchServe decodes JSON and text bodies itself; an image never arrives that way
        raise RequestError(415, "unsupported_media_type",
                           "the body is not binary image data: send it as image/* or "
                           "application/octet-stream")
    if not body:
        raise RequestError(400, "empty_body", "the request body is empty: send the image bytes")
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, "body_too_large",
                           f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    return bytes(body)


def _integer(body: dict, key: str, lo: int, hi: int) -> int:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, "bad_field", f"{key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise RequestError(400, "bad_field", f"{key} must be in {lo}..{hi}, got {value}")
    return value


def _label_index(label, labels: list[str]) -> int:
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RequestError(400, "bad_field",
                           f"label must be a class name or index, got {label!r}")
    if isinstance(label, str):
        if label in labels:
            return labels.index(label)
        if not label.strip().isdigit():
            shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise RequestError(400, "unknown_label",
                               f"label {label!r} is not one of the classes ({shown})")
        label = int(label)
    if not 0 <= label < len(labels):
        raise RequestError(400, "unknown_label",
                           f"label index {label} is out of range 0..{len(labels) - 1}")
    return label


def with_our_names(body: dict) -> dict:
    """A request that may use the Hugging Face names -> the same request in ours. Both names of
    one field are a 400 unless they hold the same value."""
    body = dict(body)
    for theirs, ours in HF_NAMES.items():
        if theirs not in body:
            continue
        value = body.pop(theirs)
        if ours in body and body[ours] != value:
            raise RequestError(400, "conflicting_fields",
                               f"{theirs}={value!r} and {ours}={body[ours]!r} disagree; "
                               f"{theirs} is the Hugging Face name of {ours}: send one of them")
        body[ours] = value
    return body


def parse_generate_request(body, labels: list[str], max_steps: int = MAX_STEPS,
                           max_images: int = MAX_IMAGES) -> dict:
    """A generator request (JSON bytes/str or an already decoded dict) -> a complete dict.

    Returns {"label": name, "index": int, "seed", "steps", "sampler", "guidance", "num_images",
    "stream"} with omitted fields taken from GENERATE_DEFAULTS (and GENERATE_FLAGS), except
    that a sampler other than the default, given without steps, takes its own step count (as
    `pixtok sample` does: pixtok/sampling.py's default_steps), at most max_steps.
    """
    if isinstance(body, (bytes, bytearray, str)):
        if len(body) == 0:
            raise RequestError(400, "empty_body", "the request body is empty: send a JSON object "
                               "such as {\"label\": 0}")
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, "bad_json", f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "bad_json",
                           f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"label", *GENERATE_DEFAULTS, *GENERATE_FLAGS, *HF_NAMES})
    if unknown:
        raise RequestError(400, "bad_field", f"unknown field {unknown[0]!r}; expected label, "
                           + ", ".join([*GENERATE_DEFAULTS, *GENERATE_FLAGS])
                           + " (or " + ", ".join(HF_NAMES) + ")")
    stream = body.get("stream", GENERATE_FLAGS["stream"])
    if not isinstance(stream, bool):
        raise RequestError(400, "bad_field", f"stream must be true or false, got {stream!r}")
    body = with_our_names(body)
    if "label" not in body:
        raise RequestError(400, "bad_field", "label is required (a class name or index)")
    request = {**GENERATE_DEFAULTS, **body}
    index = _label_index(request["label"], labels)
    sampler = request["sampler"]
    if sampler not in SAMPLERS:
        raise RequestError(400, "bad_field",
                           f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if "steps" not in body and sampler != GENERATE_DEFAULTS["sampler"]:
        request["steps"] = min(default_steps(sampler), max_steps)
    guidance = request["guidance"]
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise RequestError(400, "bad_field", f"guidance must be a number, got {guidance!r}")
    if not math.isfinite(guidance) or guidance < 0:
        raise RequestError(400, "bad_field",
                           f"guidance must be a finite number >= 0, got {guidance}")
    return {"label": labels[index], "index": index,
            "seed": _integer(request, "seed", 0, 2**63 - 1),
            "steps": _integer(request, "steps", 1, max_steps),
            "sampler": sampler, "guidance": float(guidance),
            "num_images": _integer(request, "num_images", 1, max_images), "stream": stream}
