"""The REST API of a real TorchServe, used the way a client uses it, and the generator validator."""
from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import struct
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from clirun import pixtok
from PIL import Image

from pixtok.inference.classifier import load_classifier
from pixtok.inference.validate import GENERATE_DEFAULTS, RequestError, parse_generate_request
from serving.client import ServerError

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, c: int = 3) -> Image.Image:
    arr = RNG.integers(0, 256, (h, w, c), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if c == 1 else arr)


def png_claiming(w: int, h: int) -> bytes:
    """A valid 60-byte PNG header that claims w x h pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def post(client, model: str, body: bytes, content_type: str | None = "image/png", key=True):
    headers = {"Content-Type": content_type} if content_type else {}
    return client.request("POST", f"{client.base_url}/predictions/{model}", body, headers,
                          kind="inference" if key else None)


def expected_answer(server, body: bytes) -> dict:
    """What the checkpoint answers in process, through the repository's own code."""
    local = load_classifier(server.checkpoint)
    return local.predict([local.preprocess(body, "image/png")])[0]


def assert_same_answer(got: dict, want: dict, atol: float = 1e-5):
    assert got["index"] == want["index"] and got["label"] == want["label"]
    assert [t["index"] for t in got["top_k"]] == [t["index"] for t in want["top_k"]]
    np.testing.assert_allclose([t["score"] for t in got["top_k"]],
                               [t["score"] for t in want["top_k"]], atol=atol)


def worker_pids(client, model: str) -> list[int]:
    return sorted(w["pid"] for w in client.describe(model)["workers"])


def test_classifier_answers_per_contract(server):
    client = server.client()
    body = encode(noise(20, 30))        # RGB at another size: grey conversion and resize happen
    got = client.classify(body, model="tiny-cls")
    assert set(got) == {"label", "index", "score", "top_k"}
    assert len(got["top_k"]) == 5
    assert {"label", "index", "score"} == set(got["top_k"][0])
    assert got["top_k"][0] == {k: got[k] for k in ("label", "index", "score")}
    scores = [t["score"] for t in got["top_k"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-9
    assert_same_answer(got, expected_answer(server, body))


def send_together(client, model: str, bodies: list[bytes]) -> list:
    """POST every body at once, one thread each -> the responses in order."""
    barrier, responses = threading.Barrier(len(bodies)), [None] * len(bodies)

    def send(i):
        barrier.wait()
        responses[i] = post(client, model, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses


def test_concurrent_requests_are_batched_and_a_bad_item_fails_alone(server):
    client = server.client()
    bodies = [encode(noise(8, 8, 1)) for _ in range(8)]
    bodies[3] = b"this is not an image"
    for _ in range(5):     # the batch window is 10 ms: a round may miss it on a busy machine
        responses = send_together(client, "tiny-cls", bodies)
        sizes = [int(r.header("X-Pixtok-Batch-Size")) for r in responses]
        if sizes[3] > 1:
            break
    assert sizes[3] > 1, f"no batching seen: batch sizes {sizes}"
    assert responses[3].status == 400 and responses[3].json()["type"] == "bad_image"
    for i, r in enumerate(responses):
        if i != 3:
            assert r.status == 200
            assert_same_answer(r.json(), expected_answer(server, bodies[i]))
    log = (server.run_dir / "logs" / "model_log.log").read_text()
    assert max(int(n) for n in re.findall(r"pixtok: batch of (\d+)", log)) > 1


BAD_INPUTS = {   # name: (body, content type, HTTP code, error type, words in the message)
    "not_an_image": (b"hello, world", "image/png", 400, "bad_image", "not a PNG"),
    "truncated": (encode(noise(64, 64))[:300], "image/png", 400, "bad_image", "truncated"),
    "empty": (b"", "image/png", 400, "empty_body", "empty"),
    "text": (b"hello", "text/plain", 415, "unsupported_media_type", "text/plain"),
    "json": (b'{"image": 1}', "application/json", 415, "unsupported_media_type", "json"),
    "form": (b"a=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type", "form"),
    "bomb": (png_claiming(20000, 20000), "image/png", 413, "image_too_large", "limit"),
    "over_limit": (png_claiming(5000, 4000), "image/png", 413, "image_too_large", "5000x4000"),
    "oversize_body": (b"\0" * (11 * 2**20), "image/png", 413, "body_too_large", "11534336"),
}


def test_bad_inputs_get_a_4xx_json_and_the_worker_stays_up(server):
    client = server.client()
    pids = worker_pids(client, "tiny-cls")
    good = encode(noise(8, 8, 1))
    for name, (body, ctype, code, kind, words) in BAD_INPUTS.items():
        r = post(client, "tiny-cls", body, ctype)
        assert r.status == code, (name, r.status, r.body[:200])
        payload = r.json()
        assert payload == {"code": code, "type": kind, "message": payload["message"]}, name
        assert words in payload["message"], (name, payload)
        assert post(client, "tiny-cls", good).status == 200, f"good request after {name}"
    assert worker_pids(client, "tiny-cls") == pids


def test_a_body_over_torchserves_own_limit_is_a_clear_413(server):
    with pytest.raises(ServerError) as err:
        server.client().classify(b"\0" * (21 * 2**20), model="tiny-cls")
    assert err.value.status == 413 and "limit" in str(err.value)


def odd_images() -> dict[str, bytes]:
    rgba = Image.fromarray(RNG.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    palette = noise(10, 10).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [noise(12, 12) for _ in range(3)]
    wide = np.linspace(0, 65535, 12 * 16).reshape(12, 16).astype(np.uint16)
    return {
        "1x1": encode(Image.new("RGB", (1, 1), (200, 10, 10))),
        "4000x3000_jpeg": encode(Image.linear_gradient("L").resize((4000, 3000)).convert("RGB"),
                                 "JPEG", quality=80),
        "cmyk_jpeg": encode(noise(16, 16).convert("CMYK"), "JPEG"),
        "16bit_png": encode(Image.fromarray(wide)),
        "palette_png": encode(palette, transparency=0),
        "rgba_png": encode(rgba),
        "la_png": encode(rgba.convert("LA")),
        "grey_jpeg": encode(noise(16, 16, 1), "JPEG"),
        "gif_animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": encode(noise(16, 16), "WEBP"),
        "bmp": encode(noise(16, 16), "BMP"),
    }


def test_odd_valid_images_are_accepted(server):
    client = server.client()
    for name, body in odd_images().items():
        r = post(client, "tiny-cls", body, "application/octet-stream")
        assert r.status == 200, (name, r.json())
        assert r.json()["label"] in [t["label"] for t in r.json()["top_k"]]


def test_a_multipart_upload_is_read_like_a_raw_body(server):
    client = server.client()
    image = encode(noise(8, 8, 1))
    form = (b'--XyZ\r\nContent-Disposition: form-data; name="data"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--XyZ--\r\n")
    r = post(client, "tiny-cls", form, "multipart/form-data; boundary=XyZ")
    assert r.status == 200, r.json()
    assert_same_answer(r.json(), client.classify(image, model="tiny-cls"), atol=1e-7)


def test_16bit_images_read_as_their_8bit_values(server):
    client = server.client()
    grey = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    as_16bit = encode(Image.fromarray(grey.astype(np.uint16) * 257))
    as_8bit = encode(Image.fromarray(grey))
    assert_same_answer(client.classify(as_16bit, model="tiny-cls"),
                       client.classify(as_8bit, model="tiny-cls"), atol=1e-7)


def test_onnx_and_pytorch_backends_agree(server):
    client = server.client()
    body = encode(noise(8, 8, 1))
    torch_r, onnx_r = post(client, "tiny-cls-torch", body), post(client, "tiny-cls", body)
    assert torch_r.header("X-Pixtok-Backend") == "torch"
    assert onnx_r.header("X-Pixtok-Backend") == "onnxruntime"
    assert_same_answer(onnx_r.json(), torch_r.json(), atol=1e-5)


def test_requests_without_the_key_are_refused(server):
    client = server.client()
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        r = client.request("POST", f"{client.base_url}/predictions/tiny-cls",
                           encode(noise(8, 8, 1)), {"Content-Type": "image/png", **headers},
                           kind=None)
        # TorchServe 0.12 answers a missing or wrong key with 400; the gate makes it 401
        assert r.status == 401 and r.json()["type"] == "InvalidKeyException"
        assert r.header("WWW-Authenticate").startswith("Bearer")


def test_grpc_listens_on_loopback_unless_opened(tmp_path, monkeypatch):
    """TorchServe 0.12 cannot turn gRPC off: it stays on 127.0.0.1 even when `--host` opens the
    rest, until PIXTOK_GRPC_HOST says otherwise."""
    from serving import launcher
    from serving.torchserve_config import render_config

    models = {"a": ("a.mar", "1", "classify")}
    ports = launcher.free_ports()
    monkeypatch.delenv("PIXTOK_GRPC_HOST", raising=False)
    config = render_config(tmp_path, tmp_path, "0.0.0.0", ports, models).read_text()
    assert "grpc_inference_address=127.0.0.1\n" in config
    assert "grpc_management_address=127.0.0.1\n" in config
    assert "management_address=http://0.0.0.0:" in config
    monkeypatch.setenv("PIXTOK_GRPC_HOST", "0.0.0.0")
    config = render_config(tmp_path, tmp_path, "0.0.0.0", ports, models).read_text()
    assert "grpc_inference_address=0.0.0.0\n" in config
    # behind the gate TorchServe's own listeners are on loopback; the gate's gRPC front listens
    # on PIXTOK_GRPC_HOST (tests/test_gate.py)
    config = render_config(tmp_path, tmp_path, "0.0.0.0", ports, models, gated=True).read_text()
    for api in ("grpc_inference", "grpc_management"):
        assert f"{api}_address=127.0.0.1\n" in config
    for api in ("inference", "management"):
        assert f"{api}_address=http://127.0.0.1:{ports[api]}\n" in config
    assert f"metrics_address=http://0.0.0.0:{ports['metrics']}\n" in config


def test_ports_handed_out_never_repeat_and_avoid_the_named_ones(monkeypatch):
    """The kernel may offer a port it has just offered (nothing listens on it yet): TorchServe's
    loopback inference port behind the gate once came out equal to the gRPC port, and TorchServe
    exited on the bind. Ports handed out are distinct within a process and skip `avoid`."""
    from serving import run_folder

    offers = iter([40001, 40002, 40001, 40003, 40004, 40005, 40002, 40006, 40007, 40008,
                   40009, 40010, 40011, 40012, 40013])

    class Kernel:
        """A socket whose bind to port 0 gets the next port on the list (repeats included)."""
        def bind(self, address):
            self.port = next(offers)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def close(self):
            pass

    monkeypatch.setattr(run_folder.socket, "socket", Kernel)
    monkeypatch.setattr(run_folder, "_HANDED_OUT", set())
    first = run_folder.free_ports()
    assert len(set(first.values())) == len(first) == len(run_folder.PORTS)
    second = run_folder.free_ports(avoid={40009})
    assert not set(second.values()) & (set(first.values()) | {40009})
    assert len(set(second.values())) == len(second)


def test_why_torchserve_exited_is_its_last_starts_exception(tmp_path):
    from serving.torchserve import log_tail

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "torchserve.out").write_text(
        "Torchserve version: 0.12.0\njava.lang.IllegalStateException: an earlier start\n"
        "Torchserve version: 0.12.0\n2026 [INFO ] main ModelServer - Torchserve stopped.\n"
        "java.io.IOException: Failed to bind to address /127.0.0.1:44059\n"
        "\tat io.grpc.internal.ServerImpl.start(ServerImpl.java:184)\n"
        "Caused by: io.grpc.Errors$NativeIoException: bind(..) failed: Address already in use\n")
    (tmp_path / "logs" / "model_log.log").write_text("Torch worker started.\n")
    assert log_tail(tmp_path) == ("java.io.IOException: Failed to bind to address "
                                  "/127.0.0.1:44059 | Caused by: io.grpc.Errors$NativeIoException: "
                                  "bind(..) failed: Address already in use")
    (tmp_path / "logs" / "torchserve.out").write_text("Torchserve version: 0.12.0\n")
    assert log_tail(tmp_path) == "Torch worker started."


def test_model_registration_and_deletion_are_refused(server):
    client = server.client()
    assert client.management("POST", "models?url=tiny-cls.mar&model_name=again").status == 405
    assert client.management("DELETE", "models/tiny-cls").status == 405
    assert client.describe("tiny-cls") is not None


def test_an_expired_key_is_renewed_by_the_client(server):
    client = server.client()
    client.classify(encode(noise(8, 8, 1)), model="tiny-cls")
    keys = json.loads((server.run_dir / "key_file.json").read_text())
    expires = datetime.fromisoformat(keys["inference"]["expiration time"][:19]).replace(
        tzinfo=UTC)
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.0)
    assert client.classify(encode(noise(8, 8, 1)), model="tiny-cls")["label"]
    renewed = json.loads((server.run_dir / "key_file.json").read_text())
    assert renewed["inference"]["key"] != keys["inference"]["key"]


def test_run_folder_is_private_and_config_locked_down(server):
    rd = server.run_dir
    assert stat.S_IMODE(rd.stat().st_mode) == 0o700
    assert stat.S_IMODE((rd / "key_file.json").stat().st_mode) == 0o600
    config = (rd / "config.properties").read_text()
    for line in ("disable_token_authorization=false", "enable_model_api=false",
                 "metrics_mode=prometheus", "install_py_dep_per_model=false",
                 "inference_address=http://127.0.0.1:", "grpc_inference_address=127.0.0.1"):
        assert line in config
    assert re.search(r"^allowed_urls=file://.*model_store", config, re.M)
    assert re.search(r'^models=.*"batchSize": 16, "maxBatchDelay": 10', config, re.M)
    log = (rd / "logs" / "model_log.log").read_text()
    assert "pixtok: tiny-cls ready" in log and "pixtok: tiny-cls-torch ready" in log
    assert "not self-contained" not in log
    assert not (ROOT / "key_file.json").exists() and not (ROOT / "logs").exists()


def test_worker_threads_share_the_cpus_out_unless_set(monkeypatch):
    from serving import launcher

    models = {"a": ("a.mar", "1", "classify"), "b": ("b.mar", "1", "depth"),
              "c": ("c.mar", "1", "generate")}
    for name in ("PIXTOK_WORKER_THREADS", "OMP_NUM_THREADS", "PIXTOK_GENERATE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert launcher.worker_threads(models) == 5            # 16 CPUs, 3 workers
    monkeypatch.setenv("PIXTOK_GENERATE_WORKERS", "5")
    assert launcher.worker_threads(models) == 2            # 16 CPUs, 7 workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert launcher.worker_threads(models) == 1            # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")             # the user's choice is kept ...
    assert launcher.worker_threads(models) == 3
    monkeypatch.setenv("PIXTOK_WORKER_THREADS", "2")       # ... unless pixtok's own is given
    assert launcher.worker_threads(models) == 2
    assert launcher.torchserve_env(Path("/tmp/run"), 2)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("PIXTOK_WORKER_THREADS", "all")
    with pytest.raises(launcher.ServeError, match="PIXTOK_WORKER_THREADS='all'"):
        launcher.worker_threads(models)


def test_each_worker_runs_on_its_share_of_the_cpus(server):
    """Four one-worker models: each worker's torch uses the CPUs divided by four (at least one
    thread), or what the environment asks for; its ready line says how many."""
    log = (server.run_dir / "logs" / "model_log.log").read_text()
    found = dict(re.findall(r"pixtok: (\S+) ready on cpu \([\w-]+, (\d+) torch threads", log))
    assert set(found) == {"tiny-cls", "tiny-cls-torch", "tiny-depth", "tiny-gen"}, log[-2000:]
    # the archives the launcher built carry their ONNX files, and ONNX Runtime runs them on
    # the same share: their intra-op threads are torch's count
    ort = re.findall(r"pixtok: (\S+) ready on cpu \(onnxruntime, (\d+) torch threads, (\d+) "
                     r"onnxruntime threads, CPUExecutionProvider\)", log)
    assert sorted(name for name, _, _ in ort) == ["tiny-cls", "tiny-depth"]
    assert all(torch_threads == ort_threads for _, torch_threads, ort_threads in ort)
    asked = os.environ.get("PIXTOK_WORKER_THREADS") or os.environ.get("OMP_NUM_THREADS")
    want = int(asked) if asked else max(1, len(os.sched_getaffinity(0)) // 4)
    assert set(found.values()) == {str(want)}


def test_each_archive_carries_its_checkpoints_version(server, tmp_path):
    from export.archive import checkpoint_version

    assert server.client().describe("tiny-cls")["modelVersion"] == checkpoint_version(
        server.checkpoint)
    # what `pixtok train` writes: when, and from which commit (a dirty tree says so)
    (tmp_path / "config.json").write_text(json.dumps(
        {"created": "2026-01-02T03:04:05+01:00", "git_commit": "0123456789abcdef-dirty"}))
    assert checkpoint_version(tmp_path) == "2026-01-02T020405Z.0123456-dirty"
    (tmp_path / "config.json").write_text(json.dumps({"git_commit": None}))
    stamp = datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC).timestamp()
    os.utime(tmp_path / "config.json", (stamp, stamp))
    assert checkpoint_version(tmp_path) == "2025-05-06T070809Z"     # its newest file's time


def test_prometheus_metrics_are_served(server):
    r = server.client().request("GET", server.metrics_url, kind=None)
    assert r.status == 200 and b"ts_inference_requests_total" in r.body


def test_a_second_serve_says_it_is_already_running(server):
    env = {"PIXTOK_RUN_DIR": str(server.run_dir), "PATH": "/usr/bin:/bin"}
    done = pixtok("serve", "--no-ui", env=env, timeout=60, check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert "already running" in lines[-1] and str(server.pid) in lines[-1]


# --- the generator's request validation (a pure function; the generator handler uses it) ------
LABELS10 = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
            "boot"]


def test_generate_request_defaults_and_names():
    got = parse_generate_request(b'{"label": "coat"}', LABELS10)
    assert got == {**GENERATE_DEFAULTS, "label": "coat", "index": 4, "stream": False}
    got = parse_generate_request({"label": 9, "seed": 7, "steps": 1000, "sampler": "dpm",
                                  "guidance": 0, "num_images": 16}, LABELS10)
    assert got == {"label": "boot", "index": 9, "seed": 7, "steps": 1000, "sampler": "dpm",
                   "guidance": 0.0, "num_images": 16, "stream": False}
    assert parse_generate_request('{"label": "3"}', LABELS10)["label"] == "dress"


@pytest.mark.parametrize("body, code, kind, words", [
    (b'{"label": 10}', 400, "unknown_label", "out of range 0..9"),
    (b'{"label": -1}', 400, "unknown_label", "out of range"),
    (b'{"label": "cat"}', 400, "unknown_label", "'cat'"),
    (b'{"label": 1, "steps": 0}', 400, "bad_field", "steps"),
    (b'{"label": 1, "steps": 1001}', 400, "bad_field", "1..1000"),
    (b'{"label": 1, "steps": 2.5}', 400, "bad_field", "steps must be an integer"),
    (b'{"label": 1, "steps": "50"}', 400, "bad_field", "steps"),
    (b'{"label": 1, "seed": true}', 400, "bad_field", "seed"),
    (b'{"label": 1, "guidance": NaN}', 400, "bad_field", "guidance"),
    (b'{"label": 1, "guidance": Infinity}', 400, "bad_field", "guidance"),
    (b'{"label": 1, "guidance": "high"}', 400, "bad_field", "guidance"),
    (b'{"label": 1, "num_images": 17}', 400, "bad_field", "num_images"),
    (b'{"label": 1, "num_images": 0}', 400, "bad_field", "num_images"),
    (b'{"label": 1, "sampler": "heun"}', 400, "bad_field", "sampler"),
    (b'{"label": 1, "colour": "red"}', 400, "bad_field", "'colour'"),
    (b'{"label": [1]}', 400, "bad_field", "label"),
    (b'{"seed": 1}', 400, "bad_field", "label is required"),
    (b'{"label": ', 400, "bad_json", "not valid JSON"),
    (b'\xff\xfe', 400, "bad_json", "JSON"),
    (b'[1, 2]', 400, "bad_json", "JSON object"),
    (b'', 400, "empty_body", "empty"),
])
def test_generate_request_errors_name_the_problem(body, code, kind, words):
    with pytest.raises(RequestError) as err:
        parse_generate_request(body, LABELS10)
    e = err.value
    assert (e.code, e.type) == (code, kind) and words in e.message, e.message
    assert json.loads(e.to_json()) == {"code": code, "type": kind, "message": e.message}
    assert math.isfinite(parse_generate_request(b'{"label": 1}', LABELS10)["guidance"])
