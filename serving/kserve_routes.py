"""The KServe server's routes (serving/kserve_server.py): Open Inference Protocol v2 routes ahead
of KServe's own, our REST routes as TorchServe answers them, and the error handlers that keep
every refusal a short 4xx in the route's own protocol.

The v2 /infer decodes its body with serving/kserve_v2.py (raw image bytes in BYTES, JSON
whatever the Content-Type); /v2 lists only the extensions served; /v2/models/NAME/config is
Triton's model configuration. POST /predictions/NAME takes a raw body or a one-field multipart
form, as TorchServe does; a generator request with "stream": true is answered as JSON lines, one
per sampler step and the answer last, and a client that leaves stops its generation at the next
step. GET /ping is Healthy when every model is ready.
"""
from __future__ import annotations

import json
import logging

from fastapi import Request, Response  # at module level: route annotations resolve here

from pixtok.inference.handler_base import STREAM_CONTENT_TYPE
from pixtok.inference.validate import RequestError
from serving.kserve_guard import is_v2, json_bytes, rest_error
from serving.kserve_v2 import HEADER_LENGTH, IMAGE_CONTENT, V2Error, clip, decode_v2, triton_config

log = logging.getLogger("pixtok.kserve")


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
