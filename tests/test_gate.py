"""pixtok's gate (serving/gate.py) in front of TorchServe: what it changes and what it must not.

The session's server runs behind the gate, so every other REST test also goes through it; the
tests here look at the answers the gate itself gives. A full queue's Retry-After is tested in
tests/test_reliability.py, where the queue is small.
"""
from __future__ import annotations

import json
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
    # the key is still TorchServe's to check
    refused = post(client, "tiny-cls", image, key=False)
    assert refused.status == 400 and refused.json()["type"] == "InvalidKeyException"


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
