"""schemathesis against the real TorchServe (issue 22) and the KServe server (issue 31): requests
generated from docs/openapi.yaml,
valid and invalid ones (its positive and negative modes, and its spec examples), sent to the
session's server; no answer may be a 5xx, and every answer must be documented for its route and
match its schema, headers and content type; an invalid request must be refused with a 4xx.

Each route runs on its own port (the spec names them per path); the keys are the run folder's
(renewed when refused: the session's keys expire every 6 s), and the generated requests take the
served models in turn (or keep a generated name: a 404). Left out, each for its reason below:
POST /token (it renews the shared server's keys; the client tests cover it), methods other than
GET on the management API (PUT would scale the shared server's workers). A multipart form
with an unnamed field, which TorchServe 0.12's frontend answers 500, is sent like any other: the
gate in front of TorchServe (serving/gate.py) answers it 400. The KServe server has no
management API: its run takes /predictions/{model}, /ping and /metrics (on its inference port,
behind the inference key).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, reject, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_kserve_server import ks  # noqa: F401  (the KServe server fixture, one per module)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.yaml").exclude(path="/token")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]
# the session server's models by the bodies they take; None keeps the generated name (a 404)
MODELS = {"application/json": ["tiny-gen", None],
          "image": ["tiny-cls", "tiny-cls-torch", "tiny-depth", None]}
TURN = itertools.count()      # the generated requests take the models in turn
EXAMPLES = 60      # per route and phase: about half a minute on 2 busy cores, beside the server


def base_url(server, path: str) -> tuple[str, str | None]:
    """(the URL of the port that serves `path`, the kind of key it takes)."""
    if server.kind == "kserve":       # one port; /ping is open
        return server.inference_url, (None if path == "/ping" else "inference")
    if path == "/models/{model}":
        return server.management_url, "management"
    if path == "/metrics":
        return server.metrics_url.removesuffix("/metrics"), None
    return server.inference_url, "inference"


def kind_of(case) -> str | None:
    return "management" if case.operation.path == "/models/{model}" else None


def pick_model(case, choice: int) -> None:
    """Aim a generated request at a served model that takes its kind of body (or not)."""
    if "model" not in (case.path_parameters or {}):
        return
    kind = "application/json" if case.media_type == "application/json" else "image"
    names = MODELS[kind] if case.operation.path.startswith("/predictions") else \
        ["tiny-cls", "tiny-gen", None]
    name = names[choice % len(names)]
    if name is not None:
        case.path_parameters["model"] = name


def call(server, case):
    """Send the case with the right key; once more with a renewed key if it was refused."""
    url, kind = base_url(server, case.operation.path)
    client = server.client()
    for _ in range(3):
        key = client.key(kind) if kind else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        case.headers = {**(case.headers or {}), **headers}
        response = case.call(base_url=url, timeout=120)
        refused = response.status_code in (400, 401) and "InvalidKeyException" in response.text
        if not (kind and refused):
            return response, headers
        client.refresh_key(kind, key)
    return response, headers


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented_and_never_a_server_error(case, server):
    if kind_of(case) == "management" and case.method.upper() != "GET":
        # schemathesis also tries other methods; PUT /models/NAME would scale the shared
        # server's workers (DELETE and POST are refused: the model API is off)
        reject()
    check_case(server, case)


@SCHEMA.exclude(path="/models/{model}").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_kserve_server_answers_are_documented_and_never_a_server_error(case, ks):  # noqa: F811
    check_case(ks, case)


def check_case(server, case) -> None:
    pick_model(case, next(TURN))
    response, headers = call(server, case)
    try:
        body = json.loads(response.text) if response.text else None
    except ValueError:
        body = None
    if response.status_code >= 500:     # say which request failed, beside the check's words
        pytest.fail(f"{case.operation.label} -> {response.status_code} "
                    f"{body or response.text[:300]}")
    case.validate_response(response, checks=CHECKS, headers=headers)
