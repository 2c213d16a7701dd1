"""docs/openapi.yaml: a valid OpenAPI 3.1 description, and real answers of both servers (the
session's TorchServe and a KServe ModelServer) validate against it, errors included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS31Validator
from test_kserve_server import ks  # noqa: F401  (the KServe server fixture, one per module)
from test_serving import encode, noise, png_claiming

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
SERVERS = ["torchserve", "kserve"]


def resolve(node: dict) -> dict:
    while "$ref" in node:
        parts = node["$ref"].lstrip("#/").split("/")
        node = SPEC
        for part in parts:
            node = node[part]
    return node


def validate(schema: dict, instance) -> None:
    """instance against a schema of the spec, its $refs resolved inside the whole document."""
    OAS31Validator({**schema, "components": SPEC["components"]}).validate(instance)


def check_answer(path: str, method: str, resp) -> None:
    """A real answer -> its status is documented for the route, and its JSON body (if the spec
    gives one for that status) validates against the documented schema."""
    responses = SPEC["paths"][path][method]["responses"]
    assert str(resp.status) in responses, (path, resp.status, resp.body[:200])
    documented = resolve(responses[str(resp.status)])
    content = documented.get("content", {})
    ctype = (resp.header("Content-Type") or "").split(";")[0].strip()
    if ctype == "application/x-ndjson":      # a stream: every line against the line's schema
        assert "application/x-ndjson" in content, (path, resp.status)
        lines = [json.loads(line) for line in resp.body.splitlines() if line.strip()]
        assert lines, (path, resp.status)
        for line in lines:
            validate(content["application/x-ndjson"]["schema"], line)
        validate({"$ref": "#/components/schemas/StreamStep"}, lines[0])
    elif "application/json" in content:
        assert ctype == "application/json", (path, resp.status, ctype)
        validate(content["application/json"]["schema"], json.loads(resp.body))
    elif "text/plain" in content:
        assert ctype == "text/plain", ctype
        validate(content["text/plain"]["schema"], resp.body.decode())


def test_the_description_is_valid_openapi_31():
    assert SPEC["openapi"].startswith("3.1")
    for schema in SPEC["components"]["schemas"].values():
        OAS31Validator.check_schema(schema)

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node)         # raises KeyError on a dangling reference
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(SPEC)
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method in ("get", "post"):
                assert op["responses"], (path, method)


def test_generate_request_schema_matches_the_core():
    """The documented request fields and limits are the core's."""
    from pixtok.inference.validate import (
        GENERATE_DEFAULTS,
        GENERATE_FLAGS,
        HF_NAMES,
        MAX_IMAGES,
        MAX_STEPS,
    )
    from pixtok.sampling import SAMPLERS

    props = SPEC["components"]["schemas"]["GenerateRequest"]["properties"]
    assert set(props) == {"label", *GENERATE_DEFAULTS, *GENERATE_FLAGS, *HF_NAMES}
    assert props["stream"]["type"] == "boolean"
    assert props["stream"]["default"] == GENERATE_FLAGS["stream"]
    assert props["sampler"]["enum"] == list(SAMPLERS)
    assert props["steps"]["maximum"] == props["num_inference_steps"]["maximum"] == MAX_STEPS
    assert props["num_images"]["maximum"] == MAX_IMAGES
    for key in ("seed", "steps", "sampler", "guidance", "num_images"):
        assert props[key]["default"] == GENERATE_DEFAULTS[key], key
    validate(SPEC["components"]["schemas"]["GenerateRequest"], {"label": 1, "guidance_scale": 2})
    with pytest.raises(ValidationError):
        validate(SPEC["components"]["schemas"]["GenerateRequest"], {"label": 1, "colour": 2})


def client_of(request, kind: str):
    srv = request.getfixturevalue("server" if kind == "torchserve" else "ks")
    return srv.client()


def post(client, model: str, body: bytes, content_type: str, key: bool = True):
    return client.request("POST", f"{client.base_url}/predictions/{model}", body,
                          {"Content-Type": content_type}, kind="inference" if key else None)


@pytest.mark.parametrize("kind", SERVERS)
def test_real_answers_validate(request, kind):
    client = client_of(request, kind)
    cases = [   # (model, body, content type, expected status)
        ("tiny-cls", encode(noise(8, 8, 1)), "image/png", 200),
        ("tiny-depth", encode(noise(12, 16)), "application/octet-stream", 200),
        ("tiny-gen", json.dumps({"label": 1, "num_inference_steps": 2, "guidance_scale": 1.5,
                                 "num_images_per_prompt": 2}).encode(), "application/json", 200),
        ("tiny-gen", b'{"label": "dress", "steps": 2, "sampler": "euler"}', "application/json",
         200),
        ("tiny-gen", b'{"label": "dress", "steps": 3, "stream": true}', "application/json", 200),
        ("tiny-gen", b'{"label": "dress", "stream": "yes"}', "application/json", 400),
        ("tiny-cls", b"not an image", "image/png", 400),
        ("tiny-cls", b"", "image/png", 400),
        ("tiny-cls", png_claiming(20000, 20000), "image/png", 413),
        ("tiny-cls", b"hello", "text/plain", 415),
        ("tiny-gen", b'{"label": 1, "colour": "red"}', "application/json", 400),
        ("tiny-gen", b'{"label": 1, "steps": 3, "num_inference_steps": 4}', "application/json",
         400),
        ("tiny-gen", b'{"label": "cat"}', "application/json", 400),
        ("tiny-gen", b'{"label": ', "application/json", 400),
        ("no-such-model", encode(noise(8, 8, 1)), "image/png", 404),
    ]
    for model, body, ctype, status in cases:
        resp = post(client, model, body, ctype)
        assert resp.status == status, (kind, model, body[:60], resp.status, resp.body[:200])
        check_answer("/predictions/{model}", "post", resp)
        if status == 200:
            answer = json.loads(resp.body.splitlines()[-1])     # a stream's answer is its last
            schema = {"ClassifyAnswer": "tiny-cls", "DepthAnswer": "tiny-depth",
                      "GenerateAnswer": "tiny-gen"}
            (name,) = [n for n, m in schema.items() if m == model]
            validate({"$ref": f"#/components/schemas/{name}"}, answer)
            assert resp.header("X-Pixtok-Backend") in ("torch", "onnxruntime", "onnxruntime-int8")
            assert int(resp.header("X-Pixtok-Batch-Size")) >= 1
    refused = post(client, "tiny-cls", encode(noise(8, 8, 1)), "image/png", key=False)
    assert refused.status == 401 and refused.header("WWW-Authenticate").startswith("Bearer")
    check_answer("/predictions/{model}", "post", refused)
    assert json.loads(refused.body)["type"] == ("InvalidKeyException" if kind == "torchserve"
                                                else "Unauthorized")
    ping = client.request("GET", f"{client.base_url}/ping")
    assert ping.status == 200
    check_answer("/ping", "get", ping)
    bare = client.request("GET", f"{client.base_url}/ping", kind=None)
    assert bare.status == (401 if kind == "torchserve" else 200)     # KServe: a probe route
    check_answer("/ping", "get", bare)
    # a route not served: the documented error shape and type, from both
    for path in ("/api-description", "/no/such/route"):
        missing = client.request("GET", f"{client.base_url}{path}")
        assert missing.status == 404, (path, missing.body[:200])
        validate({"$ref": "#/components/schemas/Error"}, json.loads(missing.body))
        assert json.loads(missing.body)["type"] == "NotFound"


def test_torchserve_management_and_metrics_answers_validate(server):
    client = server.client()
    described = client.management("GET", "models/tiny-cls")
    assert described.status == 200
    check_answer("/models/{model}", "get", described)
    missing = client.management("GET", "models/no-such-model")
    assert missing.status == 404
    check_answer("/models/{model}", "get", missing)
    metrics = client.request("GET", server.metrics_url, kind=None)
    assert metrics.status == 200
    check_answer("/metrics", "get", metrics)
