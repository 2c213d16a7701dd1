"""pixtok's gate (serving/gate.py) in front of TorchServe: what it changes and what it must not.

The session's server runs behind the gate, so every other REST test also goes through it; the
tests here look at the answers the gate itself gives. A full queue's Retry-After is tested in
tests/test_reliability.py, where the queue is small.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from clirun import ENV, ROOT
from test_serving import encode, noise, post

from serving import launcher
from serving.client import Client, read_properties
from serving.gate import Pace, model_of


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_model_of_names_the_model_of_each_route():
    assert model_of("/predictions/tiny-cls") == "tiny-cls"
    assert model_of("/predictions/tiny-cls/2.0") == "tiny-cls"
    assert model_of("/explanations/m") == "m"
    assert model_of("/v1/models/m:predict") == "m"
    assert model_of("/v2/models/m/versions/1/infer") == "m"
    assert model_of("/ping") is None and model_of("/") is None


def test_retry_after_is_the_work_in_flight_at_the_recent_pace():
    clock = Clock()
    pace = Pace(window_s=30, clock=clock)
    assert pace.retry_after("m") == 1                  # nothing known yet
    starts = [pace.started("m") for _ in range(10)]
    for since in starts[:4]:                           # 4 answers, 2 s apart
        clock.now += 2
        pace.finished("m", since, counted=True)
    # 6 in flight, one answer every 2 s: 12 s
    assert pace.retry_after("m") == 12
    pace.finished("m", starts[4], counted=False)       # a refusal says nothing of the pace
    assert pace.retry_after("m") == 10
    clock.now += 31                                    # the window forgets; the last answer
    assert pace.retry_after("m") == 8                  # took 8 s from its start
    for since in starts[5:]:
        pace.finished("m", since, counted=False)
    assert pace.in_flight["m"] == 0


def test_retry_after_stays_within_1_and_60_seconds():
    clock = Clock()
    pace = Pace(clock=clock)
    starts = [pace.started("slow") for _ in range(100)]
    for since in starts[:2]:
        clock.now += 10
        pace.finished("slow", since, counted=True)
    assert pace.retry_after("slow") == 60
    fast = [pace.started("fast") for _ in range(3)]
    for since in fast:
        clock.now += 0.001
        pace.finished("fast", since, counted=True)
    assert pace.retry_after("fast") == 1


def raw(url: str, body: bytes | None = None, headers: dict | None = None,
        method: str | None = None):
    """(status, headers, body) of one request, without a proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, body, headers or {}, method=method)
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_the_server_answers_through_the_gate(server):
    """The inference port is the gate's; TorchServe's own inference API is on loopback, at the
    address config.properties gives, and gate.json tells clients where the gate is."""
    run_dir = server.run_dir
    gate = json.loads(launcher.gate_file(run_dir).read_text())
    assert gate["address"] == server.inference_url
    assert gate["pid"] == launcher.running_gate_pid(run_dir)
    behind = read_properties(run_dir / "config.properties")["inference_address"]
    assert behind == gate["upstream"] == server.upstream
    assert behind.startswith("http://127.0.0.1:") and behind != server.inference_url
    assert Client(run_dir=run_dir).base_url == server.inference_url
    # TorchServe's answer and its headers pass through unchanged
    client = server.client()
    image = encode(noise(8, 8, 1))
    via_gate = post(client, "tiny-cls", image)
    direct = Client(behind, run_dir)
    assert via_gate.status == 200
    assert via_gate.header("X-Pixtok-Backend") == "onnxruntime"    # built with its ONNX file
    assert via_gate.header("X-Pixtok-Batch-Size")
    assert via_gate.json() == post(direct, "tiny-cls", image).json()
    # the key is still TorchServe's to check; the gate makes its 400 the usual 401
    refused = post(client, "tiny-cls", image, key=False)
    assert refused.status == 401 and refused.json()["type"] == "InvalidKeyException"
    assert post(direct, "tiny-cls", image, key=False).status == 400


def key_headers(server) -> dict:
    return {"Authorization": f"Bearer {server.client().key('inference')}"}


def raw_with_key(server, url: str, body: bytes, headers: dict, method: str = "POST"):
    """raw() with the inference key, renewed if refused (the session's keys last 6 s)."""
    client = server.client()
    for _ in range(3):
        key = client.key("inference")
        got = raw(url, body, {**headers, "Authorization": f"Bearer {key}"}, method)
        if got[0] not in (400, 401) or b"InvalidKeyException" not in got[2]:
            return got
        client.refresh_key("inference", key)
    return got


def test_a_missing_or_wrong_key_is_401_with_www_authenticate(server):
    """TorchServe 0.12 answers 400 InvalidKeyException; curl, requests and browsers expect a
    401 with a challenge, which the gate gives (the JSON body stays TorchServe's shape)."""
    image = encode(noise(8, 8, 1))
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic eA=="}):
        for method, path, body in (("POST", "/predictions/tiny-cls", image),
                                   ("GET", "/ping", None)):
            status, got, answer = raw(server.inference_url + path, body,
                                      {**headers, "Content-Type": "image/png"}, method)
            assert status == 401, (headers, path, status, answer[:200])
            assert got["WWW-Authenticate"].startswith("Bearer")
            assert json.loads(answer)["type"] == "InvalidKeyException"
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             server.inference_url + "/ping"], capture_output=True, text=True)
    assert result.stdout == "401"


def test_api_description_options_and_the_aliases_are_closed(server):
    """/api-description and OPTIONS answer TorchServe's whole API without a key; the aliases of
    /predictions (/explanations, /v1/models/M:predict, /v2/models/M/infer) are undocumented
    and answer our v2 bodies with 415. Through the gate all are a JSON 404, key or not."""
    direct = raw(server.upstream + "/api-description")
    assert direct[0] == 200          # what the gate keeps from clients
    v2 = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                 "data": ["eA=="]}]}).encode()
    for method, path, body in (("GET", "/api-description", None), ("OPTIONS", "/", None),
                               ("OPTIONS", "/predictions/tiny-cls", None),
                               ("POST", "/explanations/tiny-cls", encode(noise(8, 8, 1))),
                               ("POST", "/v1/models/tiny-cls:predict", v2),
                               ("POST", "/v2/models/tiny-cls/infer", v2),
                               ("GET", "/models", None)):
        for headers in ({}, key_headers(server)):
            status, got, answer = raw(server.inference_url + path, body,
                                      {**headers, "Content-Type": "application/json"}, method)
            assert status == 404, (method, path, status, answer[:200])
            assert json.loads(answer)["type"] == "NotFound"


def test_odd_model_names_get_the_json_404_and_are_not_split(server):
    """%0A in a name got TorchServe's plain-text 404; %2F was decoded and taken as
    MODEL/VERSION. Both are a JSON ModelNotFoundException from the gate."""
    image = encode(noise(8, 8, 1))
    for name in ("tiny%0Acls", "tiny-cls%2F1.0", "tiny-cls%2f..%2fx", "%00", "tiny-cls%20"):
        status, got, answer = raw(f"{server.inference_url}/predictions/{name}", image,
                                  {**key_headers(server), "Content-Type": "image/png"}, "POST")
        assert status == 404, (name, status, answer[:200])
        assert got["Content-Type"].startswith("application/json")
        assert json.loads(answer)["type"] == "ModelNotFoundException"


def test_torchserves_internal_stream_header_never_reaches_clients(server):
    body = json.dumps({"label": "coat", "steps": 2, "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    _, direct, _ = raw_with_key(server, server.upstream + "/predictions/tiny-gen", body,
                                headers)
    assert "ts_stream_next" in {k.lower() for k in direct}      # TorchServe sends it
    status, got, lines = raw_with_key(server, server.inference_url + "/predictions/tiny-gen",
                                      body, headers)
    assert status == 200 and lines.count(b"\n") == 3
    assert "ts_stream_next" not in {k.lower() for k in got}


def test_an_unnamed_multipart_field_is_a_400(server):
    """TorchServe's frontend answers a form field without a name with 500
    ErrorDataDecoderException; through the gate it is the client's mistake, a JSON 400."""
    client = server.client()
    form = (b'--XyZ\r\nContent-Disposition: form-data; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + encode(noise(8, 8, 1)) + b"\r\n--XyZ--\r\n")
    direct = post(Client(server.upstream, server.run_dir), "tiny-cls", form,
                  "multipart/form-data; boundary=XyZ")
    assert direct.status == 500 and b"ErrorDataDecoderException" in direct.body
    r = post(client, "tiny-cls", form, "multipart/form-data; boundary=XyZ")
    assert r.status == 400, r.body
    assert r.json()["type"] == "bad_request" and "needs a name" in r.json()["message"]


def test_a_body_over_the_limit_is_a_json_413(server):
    """Over max_request_size TorchServe sends a bare 413 and resets; the gate answers JSON."""
    client = server.client()
    r = post(client, "tiny-cls", b"\0" * (launcher.MAX_REQUEST_BYTES + 1))
    assert r.status == 413
    assert r.json()["type"] == "body_too_large" and str(launcher.MAX_REQUEST_BYTES) in \
        r.json()["message"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gate_process(upstream: str, run_dir, *args: str):
    """`python -m serving.gate` in front of `upstream` on a free port: (process, its URL), once
    it takes connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving.gate", "--listen",
                             f"127.0.0.1:{port}", "--upstream", upstream, "--run-dir",
                             str(run_dir), *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)


def stop_gate_process(proc) -> None:
    proc.terminate()
    assert proc.wait(timeout=15) == 0      # SIGTERM is a clean stop


@pytest.fixture
def lone_gate(tmp_path):
    """A gate whose TorchServe is not there (stopped, or starting again): its URL."""
    proc, url = gate_process(f"http://127.0.0.1:{free_port()}", tmp_path)
    yield url
    stop_gate_process(proc)


def test_a_gate_without_its_server_answers_503_json_with_retry_after(lone_gate):
    for method, body in (("GET", None), ("POST", encode(noise(8, 8, 1)))):
        status, headers, answer = raw(f"{lone_gate}/predictions/m", body, method=method)
        assert status == 503 and headers["Retry-After"] == "1"
        payload = json.loads(answer)
        assert payload["code"] == 503 and payload["type"] == "ServiceUnavailableException"
        assert "not reachable" in payload["message"]
    # the client retries it, then says how often it tried
    client = Client(lone_gate, retry_seconds=2.5)
    with pytest.raises(Exception, match=r"gave up after \d+ tries"):
        client.classify(encode(noise(8, 8, 1)), model="m")
    assert client.retries >= 1


def test_a_client_that_leaves_a_stream_stops_the_sampler_on_torchserve(server):
    """TorchServe never tells a worker that its client left; the gate does (a marker file the
    handler checks at each sampler step), so the worker is free again at once instead of
    running the generation's remaining steps."""
    import http.client
    from urllib.parse import urlsplit

    log = server.run_dir / "logs" / "model_log.log"
    before = log.read_text(errors="replace").count("the client cancelled the request")
    markers = server.run_dir / "tmp" / "pixtok-cancelled"
    # other tests' Stop clicks share this server: only this request's marker is checked
    left = set(markers.iterdir()) if markers.is_dir() else set()
    url, client = urlsplit(server.inference_url), server.client()
    body = json.dumps({"label": "coat", "steps": 1000, "sampler": "ddpm", "stream": True})
    for _ in range(3):              # the session's keys expire every 6 s: renew if refused
        key = client.key("inference")
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", "/predictions/tiny-gen", body,
                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}",
                      "X-Pixtok-Cancel-Token": "0" * 32})     # a client's own token is dropped
        answer = conn.getresponse()
        if answer.status != 401:
            break
        conn.close()
        client.refresh_key("inference", key)
    assert answer.status == 200
    assert json.loads(answer.readline()) == {"step": 1, "total": 1000}
    conn.sock.shutdown(socket.SHUT_RDWR)                   # the page's Stop: the client leaves
    conn.close()
    deadline = time.monotonic() + 60
    while True:
        text = log.read_text(errors="replace")
        found = re.findall(r"the client cancelled the request after (\d+) of 1000 steps", text)
        if len(found) > before:
            break
        assert time.monotonic() < deadline, "the worker ran on after its client left"
        time.sleep(0.2)
    assert int(found[-1]) < 1000
    # and the worker answers the next request
    assert server.client().generate("coat", model="tiny-gen", steps=2)["images"]
    assert set(markers.iterdir()) <= left                   # this request's marker: picked up


def field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): enough to write TorchServe's
    PredictionsRequest by hand, as any client without its generated stubs would."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(value)) + value


def first_field(message: bytes) -> bytes:
    """The value of a message's first length-delimited field (PredictionResponse.prediction)."""
    assert message[0] == (1 << 3 | 2)
    length, shift, at = 0, 0, 1
    while True:
        length |= (message[at] & 0x7F) << shift
        shift, at = shift + 7, at + 1
        if not message[at - 1] & 0x80:
            return message[at:at + length]


def keyed(server, kind: str, call):
    """call(metadata) with the `kind` key, renewed when refused (the session's keys last 6 s)."""
    grpc = pytest.importorskip("grpc")
    client = server.client()
    for _ in range(3):
        key = client.key(kind)
        try:
            return call((("authorization", f"Bearer {key}"),))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            client.refresh_key(kind, key)
    return call((("authorization", f"Bearer {client.key(kind)}"),))


GRPC_INFERENCE = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
GRPC_MANAGEMENT = "/org.pytorch.serve.grpc.management.ManagementAPIsService/"


def test_grpc_goes_through_the_gate_and_a_refused_key_is_unauthenticated(server):
    """TorchServe's gRPC APIs, called as grpcio calls them (generic stubs, messages written by
    hand): the gate answers on the gRPC ports, on 127.0.0.1, and passes calls on to TorchServe's
    own loopback ports; a missing or wrong key is UNAUTHENTICATED (TorchServe 0.12 itself says
    PERMISSION_DENIED); with the key, Ping, a prediction and a management call are answered."""
    grpc = pytest.importorskip("grpc")
    config = read_properties(server.run_dir / "config.properties")
    assert config["grpc_inference_address"] == config["grpc_management_address"] == "127.0.0.1"
    behind = int(config["grpc_inference_port"])
    assert behind != server.ports["grpc_inference"]
    identity = {"request_serializer": lambda m: m, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(f"127.0.0.1:{behind}") as channel:     # what the gate changes
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(GRPC_INFERENCE + "Ping", **identity)(b"", timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_inference']}") as channel:
        ping = channel.unary_unary(GRPC_INFERENCE + "Ping", **identity)
        for metadata in ((), (("authorization", "Bearer wrong-key"),)):
            with pytest.raises(grpc.RpcError) as refused:
                ping(b"", metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <key>" in refused.value.details()
        assert b"Healthy" in keyed(server, "inference",
                                   lambda md: ping(b"", metadata=md, timeout=30))
        image = encode(noise(8, 8, 1))
        request = field(1, b"tiny-cls") + field(3, field(1, b"data") + field(2, image))
        predict = channel.unary_unary(GRPC_INFERENCE + "Predictions", **identity)
        answer = keyed(server, "inference", lambda md: predict(request, metadata=md, timeout=60))
        assert json.loads(first_field(answer)) == post(server.client(), "tiny-cls", image).json()
        # a streamed generation: its steps, then the answer, each a message as it comes
        body = json.dumps({"label": "coat", "steps": 2, "stream": True}).encode()
        request = field(1, b"tiny-gen") + field(3, field(1, b"data") + field(2, body))
        stream = channel.unary_stream(GRPC_INFERENCE + "StreamPredictions", **identity)
        answers = keyed(server, "inference",
                        lambda md: list(stream(request, metadata=md, timeout=120)))
        lines = [json.loads(first_field(a)) for a in answers]
        assert lines[:2] == [{"step": 1, "total": 2}, {"step": 2, "total": 2}]
        assert len(lines) == 3 and len(lines[2]["images"]) == 1
        # a management method is not on the inference port, as on TorchServe's own
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(GRPC_MANAGEMENT + "ListModels", **identity)(b"", timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_management']}") as channel:
        listing = channel.unary_unary(GRPC_MANAGEMENT + "ListModels", **identity)
        with pytest.raises(grpc.RpcError) as refused:
            listing(b"", timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        limit = b"\x08\x0a"          # ListModelsRequest.limit = 10 (0 lists none)
        answer = keyed(server, "management", lambda md: listing(limit, metadata=md, timeout=30))
        assert "tiny-cls" in {m["modelName"] for m in
                              json.loads(first_field(answer))["models"]}


def test_the_management_port_is_the_gates_and_closes_the_api_description(server):
    """TorchServe's management API sits behind the gate too: its /api-description and OPTIONS
    (its whole API, without a key) are a JSON 404 there, key or not; a missing or wrong key is
    the 401 with its challenge; the rest passes through."""
    config = read_properties(server.run_dir / "config.properties")
    behind = config["management_address"]
    gate = json.loads(launcher.gate_file(server.run_dir).read_text())
    assert behind == gate["management_upstream"] != server.management_url
    assert gate["management"] == server.management_url
    assert Client(run_dir=server.run_dir).management_url == server.management_url
    assert raw(behind + "/api-description")[0] == 200          # what the gate keeps away
    client = server.client()
    for method, path in (("GET", "/api-description"), ("OPTIONS", "/"),
                         ("OPTIONS", "/models")):
        for headers in ({}, {"Authorization": f"Bearer {client.key('management')}"}):
            status, _, answer = raw(server.management_url + path, None, headers, method)
            assert status == 404, (method, path, status, answer[:200])
            assert json.loads(answer)["type"] == "NotFound"
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        status, got, answer = raw(server.management_url + "/models", None, headers)
        assert status == 401 and got["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(answer)["type"] == "InvalidKeyException"
        assert "management key" in json.loads(answer)["message"]
    assert client.is_ready("tiny-cls")            # through the gate, key renewal included
    assert client.management("GET", "models").json()["models"]
