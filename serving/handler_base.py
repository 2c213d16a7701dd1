"""The TorchServe side of every pixtok handler: initialize / preprocess / inference / postprocess.

It never imports `ts` (TorchServe 0.12 gets no more security fixes, so our code leans on as little
of it as it can); TorchServe only hands it a list of requests and a context. A bad item answers
its own 4xx through context.set_response_status(code, phrase, idx) while the rest of the batch
answers 200, and nothing a client sends can take the worker down.
"""
from __future__ import annotations

import json
import logging
import sys
from http import HTTPStatus

from .inference import pick_device
from .validate import RequestError

log = logging.getLogger(__name__)
REPOSITORY_PACKAGES = {"pixtok", "training", "serving", "export"}


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


class PixtokHandler:
    """Subclasses implement load(model_dir, device) -> a core with preprocess() and predict()."""

    def __init__(self):
        self.core = None
        self.backend = "none"
        self.initialized = False

    def load(self, model_dir: str, device):
        raise NotImplementedError

    def initialize(self, context):
        props = context.system_properties
        device = pick_device(props.get("gpu_id"))
        self.core = self.load(props.get("model_dir"), device)
        self.backend = getattr(getattr(self.core, "backend", None), "name", "custom")
        self.initialized = True
        log.info("pixtok: %s ready on %s (%s)", context.model_name, device, self.backend)
        # an archive must run on a stock TorchServe: say so loudly if it leaned on an install
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in REPOSITORY_PACKAGES)
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

    def inference(self, inputs: dict) -> dict:
        """One batched run over the good inputs: {idx: result | error}."""
        good = [i for i, x in inputs.items() if not isinstance(x, RequestError)]
        results = dict(inputs)
        if not good:
            return results
        try:
            outputs = self.core.predict([inputs[i] for i in good])
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
            context.set_response_content_type(idx, "application/json")
            context.set_response_header(idx, "X-Pixtok-Batch-Size", batch)
            context.set_response_header(idx, "X-Pixtok-Backend", self.backend)
            out.append(json.dumps(result))
        return out

    def handle(self, data: list[dict], context) -> list[str]:
        inputs = self.preprocess(data, context)
        results = self.inference(inputs)
        log.info("pixtok: batch of %d, %d rejected", len(data),
                 sum(isinstance(r, RequestError) for r in results.values()))
        return self.postprocess(results, context)
