"""`pixtok serve --server kserve`: the real KServe ModelServer (serving/kserve_server.py) as a
subprocess, started once for this module by the launcher on tiny models, checked with plain HTTP,
with serving/client.py (as the page uses it) and with KServe's own InferenceRESTClient: typed v2
answers equal to the inference core's in process, the REST contract, bad and odd images, limits,
decompression bombs, same seed -> same bytes, the Hugging Face names, auth, batching, --stop."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import make_classifier, make_depth, make_generator
from PIL import Image
from test_serving import BAD_INPUTS, assert_same_answer, encode, noise, odd_images, png_claiming

from pixtok.inference.classifier import load_classifier
from pixtok.inference.depth_estimator import load_depth_estimator
from pixtok.inference.validate import MAX_BODY_BYTES
from serving import launcher
from serving.client import Client, ServerError

ROOT = Path(__file__).resolve().parents[1]
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
RNG = np.random.default_rng(21)


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    """The KServe server over tiny-cls, tiny-depth and tiny-gen (checkpoint folders the launcher
    builds into archives, as `pixtok serve` does). A 300 ms batch window, so requests sent
    together are batched together even on a busy machine."""
    from export.archive import build_missing_archives

    store = tmp_path_factory.mktemp("ks_store")
    cls, depth = make_classifier(store / "tiny-cls"), make_depth(store / "tiny-depth")
    make_generator(store / "tiny-gen")
    run_dir = tmp_path_factory.mktemp("ks_run")
    srv = launcher.start_kserve(store, run_dir=run_dir, timeout=180, log=lambda *_: None,
                                ports={"inference": launcher.free_ports()["inference"]},
                                build=build_missing_archives, max_batch_delay=300)
    srv.checkpoint, srv.depth_checkpoint = cls, depth
    srv.url = launcher.local_url(srv.inference_url)
    srv.key = json.loads((run_dir / "key_file.json").read_text())["inference"]["key"]
    yield srv
    launcher.stop(run_dir, log=lambda *_: None)


def call(srv, method: str, path: str, body=None, key: str | None = "default",
         content_type: str | None = "application/json"):
    """One plain HTTP call -> (status, headers, parsed JSON or raw bytes)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type and body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {srv.key if key == 'default' else key}"
    req = urllib.request.Request(srv.url + path, data=body, method=method, headers=headers)
    try:
        with OPENER.open(req, timeout=300) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    try:
        return status, hdrs, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, hdrs, raw


def infer(srv, model: str, inputs: list[dict], key="default"):
    return call(srv, "POST", f"/v2/models/{model}/infer", {"inputs": inputs}, key)


def b64_images(*files: bytes) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [len(files)],
            "data": [base64.b64encode(f).decode() for f in files]}


def scalar(name: str, datatype: str, value) -> dict:
    return {"name": name, "datatype": datatype, "shape": [1], "data": [value]}


def output(answer: dict, name: str) -> dict:
    [found] = [o for o in answer["outputs"] if o["name"] == name]
    return found


def local_classifier(srv):
    return load_classifier(srv.checkpoint)


def server_pid(srv) -> int:
    return launcher.running_kserve_pid(srv.run_dir)


# --- protocol routes ---------------------------------------------------------------------------
def test_health_metadata_and_ready_routes(ks):
    assert call(ks, "GET", "/v2/health/live", key=None)[::2] == (200, {"live": True})
    assert call(ks, "GET", "/v2/health/ready", key=None)[::2] == (200, {"ready": True})
    for name in ("tiny-cls", "tiny-depth", "tiny-gen"):
        status, _, ready = call(ks, "GET", f"/v2/models/{name}/ready")
        assert status == 200 and ready["ready"] is True and ready["name"] == name
    status, _, meta = call(ks, "GET", "/v2/models/tiny-cls")
    assert status == 200 and meta["name"] == "tiny-cls"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, -1, -1, -1])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]), "label": ("BYTES", [-1])}
    meta = call(ks, "GET", "/v2/models/tiny-depth")[2]
    assert meta["outputs"] == [{"name": "depth", "datatype": "FP32", "shape": [-1, -1, -1]}]
    meta = call(ks, "GET", "/v2/models/tiny-gen")[2]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        "label": "BYTES", "seed": "INT64", "steps": "INT64", "num_images": "INT64",
        "sampler": "BYTES", "guidance": "FP32"}
    assert meta["outputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    status, _, err = call(ks, "GET", "/v2/models/nope")
    assert status == 404 and "nope" in err["error"]


# --- typed answers -----------------------------------------------------------------------------
def test_classifier_v2_answers_are_typed_and_match_the_core(ks):
    local = local_classifier(ks)
    files = [encode(noise(8, 8, 1)), encode(noise(20, 13, 3)), encode(noise(8, 8, 1), "JPEG")]
    status, _, answer = infer(ks, "tiny-cls", [b64_images(*files)])
    assert status == 200, answer
    probs = output(answer, "probabilities")
    assert probs["datatype"] == "FP32" and probs["shape"] == [3, 10]
    got = np.array(probs["data"], dtype=np.float64).reshape(3, 10)
    want = local.probabilities([local.preprocess(f, "image/png") for f in files])
    np.testing.assert_allclose(got, want, atol=1e-5)
    labels = output(answer, "label")
    assert labels["datatype"] == "BYTES" and labels["shape"] == [3]
    assert labels["data"] == [local.labels[i] for i in want.argmax(axis=1)]


def test_pixels_input_is_the_same_as_the_image_file(ks):
    pixels = RNG.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [2, 8, 8, 1],
              "data": pixels.ravel().tolist()}
    status, _, answer = infer(ks, "tiny-cls", [tensor])
    assert status == 200, answer
    as_files = infer(ks, "tiny-cls", [b64_images(*(encode(Image.fromarray(p[..., 0]))
                                                  for p in pixels))])[2]
    np.testing.assert_allclose(output(answer, "probabilities")["data"],
                               output(as_files, "probabilities")["data"], atol=1e-6)


def test_depth_v2_answers_metres_at_the_image_size(ks):
    local = load_depth_estimator(ks.depth_checkpoint)
    files = [encode(noise(30, 40)), encode(noise(30, 40))]
    status, _, answer = infer(ks, "tiny-depth", [b64_images(*files)])
    assert status == 200, answer
    depth = output(answer, "depth")
    assert depth["datatype"] == "FP32" and depth["shape"] == [2, 30, 40]
    want = local.depth_maps([local.preprocess(f, "image/png") for f in files])
    np.testing.assert_allclose(np.array(depth["data"]).reshape(2, 30, 40), np.stack(want),
                               rtol=1e-4, atol=1e-4)
    assert answer["parameters"]["unit"] == "m"
    status, _, err = infer(ks, "tiny-depth", [b64_images(encode(noise(30, 40)),
                                                         encode(noise(31, 40)))])
    assert status == 400 and "one size" in err["error"]


def test_rest_routes_answer_as_torchserve_does_for_the_unchanged_client(ks):
    client = Client(run_dir=ks.run_dir)          # finds the server and key in the run folder
    assert client.base_url == ks.url
    body = encode(noise(8, 8, 1))
    local = local_classifier(ks)
    assert_same_answer(client.classify(body, model="tiny-cls"),
                       local.predict([local.preprocess(body, "image/png")])[0])
    scene = encode(noise(24, 32))
    answer = client.depth(scene, model="tiny-depth")
    assert (answer["width"], answer["height"], answer["unit"]) == (32, 24, "m")
    depth_png = Image.open(io.BytesIO(base64.b64decode(answer["depth_png"])))
    assert depth_png.size == (32, 24) and depth_png.mode.startswith("I")
    gen = client.generate("dress", model="tiny-gen", steps=2, num_images=2, seed=3)
    assert len(gen["images"]) == 2 and gen["label"] == "dress" and gen["steps"] == 2
    with pytest.raises(ServerError) as err:
        client.classify(b"not an image", model="tiny-cls")
    assert err.value.status == 400 and err.value.payload["type"] == "bad_image"
    status, _, missing = call(ks, "POST", "/predictions/nope", body, content_type="image/png")
    assert status == 404 and missing["code"] == 404


def backend_of(headers: dict) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get("x-pixtok-backend")


def test_image_models_run_their_onnx_file_on_onnxruntime(ks):
    """The launcher built tiny-cls and tiny-depth with their ONNX files; the KServe server's
    model folders carry them, ONNX Runtime runs them (the header and the ready line say so),
    and the answers are PyTorch's (in process, from the checkpoint folder)."""
    folders = ks.run_dir / "tmp" / "kserve-models"
    for name in ("tiny-cls", "tiny-depth"):
        assert (folders / name / "model.onnx").is_file(), name
    assert not (folders / "tiny-gen" / "model.onnx").exists()
    body = encode(noise(8, 8, 1))
    status, headers, answer = call(ks, "POST", "/predictions/tiny-cls", body,
                                   content_type="image/png")
    assert status == 200 and backend_of(headers) == "onnxruntime"
    local = local_classifier(ks)
    assert local.backend.name == "torch"
    assert_same_answer(answer, local.predict([local.preprocess(body, "image/png")])[0])
    status, headers, _ = call(ks, "POST", "/predictions/tiny-depth", encode(noise(12, 16)),
                              content_type="image/png")
    assert status == 200 and backend_of(headers) == "onnxruntime"
    log = (ks.run_dir / "logs" / "kserve.out").read_text()
    for name, task in (("tiny-cls", "classify"), ("tiny-depth", "depth")):
        assert f"pixtok: {name} ({task}) ready on cpu (onnxruntime, " in log, log[-2000:]
    assert "pixtok: tiny-gen (generate) ready on cpu (torch, " in log


def test_a_multipart_upload_is_read_like_a_raw_body(ks):
    image = encode(noise(8, 8, 1))
    form = (b'--XyZ\r\nContent-Disposition: form-data; name="data"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--XyZ--\r\n")
    status, _, got = call(ks, "POST", "/predictions/tiny-cls", form,
                          content_type="multipart/form-data; boundary=XyZ")
    assert status == 200, got
    assert_same_answer(got, Client(run_dir=ks.run_dir).classify(image, model="tiny-cls"),
                       atol=1e-7)


# --- generator ---------------------------------------------------------------------------------
def generate_v2(ks, **fields):
    types = {"label": "BYTES", "sampler": "BYTES", "guidance": "FP32", "guidance_scale": "FP32"}
    inputs = [scalar(k, types.get(k, "INT64"), v) for k, v in fields.items()]
    return infer(ks, "tiny-gen", inputs)


def test_same_seed_gives_the_same_bytes_over_v2_and_rest(ks):
    fields = {"label": "dress", "seed": 7, "steps": 3, "num_images": 2, "sampler": "ddim"}
    first, second = generate_v2(ks, **fields), generate_v2(ks, **fields)
    assert first[0] == second[0] == 200, first[2]
    images = output(first[2], "images")
    assert images["datatype"] == "BYTES" and images["shape"] == [2]
    assert images["data"] == output(second[2], "images")["data"]
    for png in images["data"]:
        assert Image.open(io.BytesIO(base64.b64decode(png))).size == (16, 16)
    rest = Client(run_dir=ks.run_dir).generate("dress", model="tiny-gen", seed=7, steps=3,
                                               num_images=2, sampler="ddim")
    assert rest["images"] == images["data"]
    other = generate_v2(ks, **{**fields, "seed": 8})[2]
    assert output(other, "images")["data"] != images["data"]


def test_a_streamed_generation_sends_every_step_then_the_usual_answer(ks):
    client = Client(run_dir=ks.run_dir)
    fields = {"seed": 4, "steps": 5, "sampler": "dpm", "num_images": 2}
    req = urllib.request.Request(
        ks.url + "/predictions/tiny-gen", method="POST",
        data=json.dumps({"label": "bag", **fields, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {ks.key}"})
    with OPENER.open(req, timeout=300) as r:
        assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        assert r.headers["X-Pixtok-Batch-Size"] == "1"
        *steps, last = [json.loads(line) for line in r if line.strip()]
    assert steps == [{"step": i, "total": 5} for i in range(1, 6)]
    assert last == client.generate("bag", model="tiny-gen", **fields)
    assert list(client.generate_stream("bag", model="tiny-gen", **fields)) == [*steps, last]
    status, _, payload = call(ks, "POST", "/predictions/tiny-gen", {"label": 1, "stream": "on"})
    assert status == 400 and payload["type"] == "bad_field" and "stream" in payload["message"]


def test_a_client_that_leaves_a_stream_stops_its_generation(ks):
    """The page's Stop closes the connection: the server stops sampling at the next step."""
    client = Client(run_dir=ks.run_dir)
    log = ks.run_dir / "logs" / "kserve.out"
    before = log.read_text().count("the client cancelled the request")
    stream = client.generate_stream("bag", model="tiny-gen", seed=1, steps=1000, sampler="ddpm")
    assert [next(stream), next(stream)] == [{"step": 1, "total": 1000},
                                            {"step": 2, "total": 1000}]
    stream.close()                     # closes the connection
    cut = None
    for _ in range(600):               # bounded: the server notices at its next step
        found = re.findall(r"cancelled the request after (\d+) of 1000 steps", log.read_text())
        if len(found) > before:
            cut = int(found[-1])
            break
        time.sleep(0.5)
    assert cut is not None and 2 <= cut < 1000, "the generation ran on after its client left"
    # and the model serves the next request at once
    assert client.generate("bag", model="tiny-gen", seed=1, steps=2)["steps"] == 2


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "euler"])
def test_v2_takes_every_sampler_of_the_cli(ks, sampler):
    from pixtok.sampling import SAMPLERS

    assert sampler in SAMPLERS
    status, _, answer = generate_v2(ks, label=1, steps=2, sampler=sampler)
    assert status == 200 and answer["parameters"]["sampler"] == sampler, answer


def test_hugging_face_names_map_onto_ours(ks):
    ours = {"label": "dress", "seed": 2, "steps": 3, "num_images": 2, "guidance": 2.5}
    theirs = {"label": "dress", "seed": 2, "num_inference_steps": 3, "num_images_per_prompt": 2,
              "guidance_scale": 2.5}
    want = output(generate_v2(ks, **ours)[2], "images")["data"]
    assert output(generate_v2(ks, **theirs)[2], "images")["data"] == want
    client = Client(run_dir=ks.run_dir)
    assert client.generate(model="tiny-gen", **theirs)["images"] == want
    both = client.generate(model="tiny-gen", **theirs, steps=3)     # agreeing: fine
    assert both["images"] == want
    with pytest.raises(ServerError) as err:
        client.generate(model="tiny-gen", **theirs, steps=4)
    assert err.value.status == 400 and err.value.payload["type"] == "conflicting_fields"
    status, _, e = generate_v2(ks, label=1, steps=4, num_inference_steps=3)
    assert status == 400 and "num_inference_steps" in e["error"]


@pytest.mark.parametrize("inputs, words", [
    ([scalar("label", "BYTES", "cat")], "cat"),
    ([scalar("label", "BYTES", "dress"), scalar("steps", "INT64", 0)], "steps"),
    ([scalar("label", "BYTES", "dress"), scalar("num_images", "INT64", 17)], "num_images"),
    ([scalar("label", "BYTES", "dress"), scalar("sampler", "BYTES", "heun")], "sampler"),
    ([scalar("label", "BYTES", "dress"), scalar("steps", "FP32", 2.5)], "steps"),
    ([scalar("label", "BYTES", "dress"), scalar("colour", "BYTES", "red")], "colour"),
    ([scalar("seed", "INT64", 1)], "label"),
    ([{"name": "label", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}], "one value"),
])
def test_generator_bad_inputs_are_400(ks, inputs, words):
    status, _, err = infer(ks, "tiny-gen", inputs)
    assert status == 400 and words in err["error"], err


# --- bad input, limits, no dead worker ---------------------------------------------------------
def v2_bad_inputs() -> dict:
    """name: (inputs, HTTP code, words in the error)"""
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 1], "data": [0, 1, 2, 3]}
    return {
        "not_base64": ([{**b64_images(b""), "data": ["!!!"]}], 400, "base64"),
        "not_an_image": ([b64_images(b"hello, world")], 400, "not a PNG"),
        "truncated": ([b64_images(encode(noise(64, 64))[:300])], 400, "truncated"),
        "empty_image": ([b64_images(b"")], 400, "empty"),
        "bomb": ([b64_images(png_claiming(20000, 20000))], 413, "limit"),
        "over_limit": ([b64_images(png_claiming(5000, 4000))], 413, "5000x4000"),
        "pixels_over_255": ([{**pixels, "data": [0, 1, 2, 300]}], 400, "pixels"),
        "pixels_negative": ([{**pixels, "data": [0, 1, 2, -1]}], 400, "pixels"),
        "pixels_float": ([{**pixels, "data": [0.5, 1, 2, 3]}], 400, "pixels"),
        "pixels_bad_shape": ([{**pixels, "shape": [2, 2, 1]}], 400, "[N, H, W, C]"),
        "pixels_4_channels": ([{**pixels, "shape": [1, 1, 1, 4]}], 400, "C 1 or 3"),
        "pixels_empty": ([{**pixels, "shape": [1, 0, 2, 1], "data": []}], 400, "pixels"),
        "shape_vs_data": ([{**pixels, "shape": [1, 3, 3, 1]}], 400, "shape"),
        "wrong_datatype": ([{**b64_images(b"x"), "datatype": "FP32", "data": [1.0]}], 400,
                           "BYTES"),
        "unknown_input": ([{**b64_images(b"x"), "name": "img"}], 400, "'image' or 'pixels'"),
        "two_inputs": ([b64_images(b"x"), b64_images(b"y")], 400, "exactly one"),
        "no_inputs": ([], 400, "exactly one"),
    }


def test_bad_v2_inputs_get_a_4xx_error_and_the_server_stays_up(ks):
    pid = server_pid(ks)
    good = [b64_images(encode(noise(8, 8, 1)))]
    for name, (inputs, code, words) in v2_bad_inputs().items():
        status, _, err = infer(ks, "tiny-cls", inputs)
        assert status == code, (name, status, err)
        assert set(err) == {"error"} and words in err["error"], (name, err)
        assert infer(ks, "tiny-cls", good)[0] == 200, f"good request after {name}"
    for body in (b"{not json", b"[1, 2]", b'{"inputs": "x"}', b'{"inputs": [{"name": "image"}]}'):
        status, _, err = call(ks, "POST", "/v2/models/tiny-cls/infer", body)
        assert status == 400 and set(err) == {"error"}, (body, status, err)
    status, _, err = infer(ks, "nope", good)
    assert status == 404 and set(err) == {"error"}
    assert server_pid(ks) == pid and psutil.pid_exists(pid)


def test_bad_rest_inputs_get_torchserves_4xx_json(ks):
    pid = server_pid(ks)
    client = Client(run_dir=ks.run_dir)
    for name, (body, ctype, code, kind, words) in BAD_INPUTS.items():
        r = client.request("POST", f"{client.base_url}/predictions/tiny-cls", body,
                           {"Content-Type": ctype})
        assert r.status == code, (name, r.status, r.body[:200])
        payload = r.json()
        assert payload == {"code": code, "type": kind, "message": payload["message"]}, name
        assert words in payload["message"], (name, payload)
    assert server_pid(ks) == pid


def test_bodies_over_the_request_limit_are_a_clear_413(ks):
    big = b"\0" * (2 * MAX_BODY_BYTES + 1)
    with pytest.raises(ServerError) as err:
        Client(run_dir=ks.run_dir).classify(big, model="tiny-cls")
    assert err.value.status == 413 and "limit" in str(err.value)
    status, _, e = call(ks, "POST", "/v2/models/tiny-cls/infer", big)
    assert status == 413 and "limit" in e["error"]


def test_odd_valid_images_are_accepted_over_both_protocols(ks):
    client = Client(run_dir=ks.run_dir)
    for name, body in odd_images().items():
        rest = client.classify(body, model="tiny-cls")
        status, _, answer = infer(ks, "tiny-cls", [b64_images(body)])
        assert status == 200, (name, answer)
        assert output(answer, "label")["data"] == [rest["label"]], name


# --- auth and lock-down ------------------------------------------------------------------------
def test_requests_without_the_key_are_refused(ks):
    image = encode(noise(8, 8, 1))
    for key in (None, "wrong-key-" + "x" * 20):
        status, hdrs, err = infer(ks, "tiny-cls", [b64_images(image)], key=key)
        assert status == 401 and set(err) == {"error"}
        assert status == 401 and call(ks, "GET", "/v2/models/tiny-cls", key=key)[0] == 401
        status, _, err = call(ks, "POST", "/predictions/tiny-cls", image, key=key,
                              content_type="image/png")
        assert status == 401 and err["code"] == 401
        assert call(ks, "GET", "/metrics", key=key)[0] == 401
    assert call(ks, "GET", "/metrics")[0] == 200
    for path in ("/v2/repository/models/tiny-cls/unload", "/v2/repository/models/x/load"):
        status, _, err = call(ks, "POST", path, b"{}")
        assert status == 403 and "off" in err["error"]
    assert call(ks, "GET", "/v2/models/tiny-cls/ready")[0] == 200      # still loaded
    key_file = ks.run_dir / "key_file.json"
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_it_listens_on_loopback_only(ks):
    proc = psutil.Process(server_pid(ks))
    listing = getattr(proc, "net_connections", None) or proc.connections    # psutil < 6
    conns = [c for c in listing(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns), conns
    assert {c.laddr.port for c in conns} == {ks.ports["inference"]}     # no gRPC port


# --- KServe's own client -----------------------------------------------------------------------
def test_kserves_own_rest_client_gets_typed_answers(ks):
    import httpx
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    files = [encode(noise(8, 8, 1)), encode(noise(8, 8, 1))]
    local = local_classifier(ks)

    async def run():
        config = RESTConfig(protocol="v2", transport=httpx.AsyncHTTPTransport(), timeout=120)
        client = InferenceRESTClient(config)
        try:
            image = InferInput("image", [2], "BYTES",
                               [base64.b64encode(f).decode() for f in files])
            answer = await client.infer(ks.url, InferRequest("tiny-cls", [image]),
                                        model_name="tiny-cls",
                                        headers={"Authorization": f"Bearer {ks.key}"})
            pixels = np.stack([np.asarray(Image.open(io.BytesIO(f)))[..., None] for f in files])
            typed = InferInput("pixels", list(pixels.shape), "UINT8")
            typed.set_data_from_numpy(pixels, binary_data=False)
            by_pixels = await client.infer(ks.url, InferRequest("tiny-cls", [typed]),
                                           model_name="tiny-cls",
                                           headers={"Authorization": f"Bearer {ks.key}"})
            with pytest.raises(Exception) as refused:
                await client.infer(ks.url, InferRequest("tiny-cls", [image]),
                                   model_name="tiny-cls")
            return answer, by_pixels, refused.value
        finally:
            await client.close()

    answer, by_pixels, refused = asyncio.run(run())
    probs = answer.get_output_by_name("probabilities").as_numpy()
    assert probs.dtype == np.float32 and probs.shape == (2, 10)
    want = local.probabilities([local.preprocess(f, "image/png") for f in files])
    np.testing.assert_allclose(probs, want, atol=1e-5)
    labels = answer.get_output_by_name("label").as_numpy()
    assert [str(x) for x in labels.ravel()] == [local.labels[i] for i in want.argmax(axis=1)]
    np.testing.assert_allclose(by_pixels.get_output_by_name("probabilities").as_numpy(), probs,
                               atol=1e-6)
    assert "401" in str(refused)


# --- stock clients: tritonclient (HTTP, binary and JSON modes), curl-style forms ---------------
def triton(ks):
    import tritonclient.http as triton_http

    return triton_http, triton_http.InferenceServerClient(ks.url.split("://", 1)[1])


def key_header(ks) -> dict:
    return {"Authorization": f"Bearer {ks.key}"}   # fresh: tritonclient adds to the dict it gets


def test_tritonclient_sends_raw_image_bytes_or_base64_in_either_mode(ks):
    th, client = triton(ks)
    files = [encode(noise(8, 8, 1)), encode(noise(11, 9, 3), "JPEG")]
    local = local_classifier(ks)
    want = local.probabilities([local.preprocess(f, "image/png") for f in files])
    sent = {"binary, raw files": (np.array(files, dtype=object), True),
            "JSON, base64 text": (np.array([base64.b64encode(f) for f in files],
                                           dtype=object), False),
            "binary, base64 text": (np.array([base64.b64encode(f) for f in files],
                                             dtype=object), True)}
    for mode, (array, binary) in sent.items():
        image = th.InferInput("image", [2], "BYTES")
        image.set_data_from_numpy(array, binary_data=binary)
        outputs = [th.InferRequestedOutput("probabilities", binary_data=binary),
                   th.InferRequestedOutput("label", binary_data=binary)]
        answer = client.infer("tiny-cls", [image], outputs=outputs, headers=key_header(ks))
        np.testing.assert_allclose(answer.as_numpy("probabilities"), want, atol=1e-5,
                                   err_msg=mode)
        labels = [x.decode() if isinstance(x, bytes) else x for x in answer.as_numpy("label")]
        assert labels == [
            local.labels[i] for i in want.argmax(axis=1)], mode


def test_a_1mb_non_utf8_bytes_element_is_a_short_4xx_and_no_long_log_line(ks):
    th, client = triton(ks)
    blob = b"\xff\xfe" + RNG.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    image = th.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([blob], dtype=object), binary_data=True)
    body, json_size = th.InferenceServerClient.generate_request_body([image])
    headers = {**key_header(ks), "Inference-Header-Content-Length": str(json_size),
               "Content-Type": "application/octet-stream"}
    req = urllib.request.Request(ks.url + "/v2/models/tiny-cls/infer", data=body,
                                 method="POST", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        OPENER.open(req, timeout=120)
    answer = refused.value.read()
    assert 400 <= refused.value.code < 500 and len(answer) < 4096, (refused.value.code,
                                                                     len(answer))
    assert "image" in json.loads(answer)["error"]
    with pytest.raises(th.InferenceServerException) as stock:    # and as the client reports it
        client.infer("tiny-cls", [image], headers=key_header(ks))
    assert stock.value.status() == "400" and len(str(stock.value)) < 4096
    with pytest.raises(th.InferenceServerException) as versioned:   # the versioned route too
        client.infer("tiny-cls", [image], model_version="1", headers=key_header(ks))
    assert versioned.value.status() == "404" and len(str(versioned.value)) < 4096
    log = (ks.run_dir / "logs" / "kserve.out").read_bytes()
    assert max(len(line) for line in log.splitlines()) < 4096
    assert server_pid(ks)


def test_tritonclient_json_mode_without_a_content_type_is_json(ks):
    """tritonclient's JSON mode sends no Content-Type and no Inference-Header-Content-Length."""
    th, client = triton(ks)
    image = th.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(encode(noise(8, 8, 1)))],
                                       dtype=object), binary_data=False)
    answer = client.infer("tiny-cls", [image], headers=key_header(ks),
                          outputs=[th.InferRequestedOutput("label", binary_data=False)])
    assert answer.as_numpy("label").shape == (1,)
    body = json.dumps({"inputs": [b64_images(encode(noise(8, 8, 1)))]}).encode()
    for content_type in (None, "text/plain", "application/octet-stream"):
        status, _, got = call(ks, "POST", "/v2/models/tiny-cls/infer", body,
                              content_type=content_type)
        assert status == 200 and output(got, "label")["shape"] == [1], (content_type, got)


def test_model_config_is_a_triton_configuration_perf_analyzer_reads(ks):
    """perf_analyzer (its wheel needs glibc 2.38; see docs/serving.md) asks for the config
    first; this is what it reads: max_batch_size, inputs and outputs with Triton's types and
    dims (without the batch dimension where the model batches)."""
    _, client = triton(ks)
    config = client.get_model_config("tiny-cls", headers=key_header(ks))
    assert config["name"] == "tiny-cls" and config["max_batch_size"] == 16
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["image"]["data_type"] == "TYPE_STRING" and inputs["image"]["dims"] == [1]
    assert inputs["image"]["reshape"] == {"shape": []} and not inputs["image"]["optional"]
    assert inputs["pixels"] == {"name": "pixels", "data_type": "TYPE_UINT8",
                                "dims": [-1, -1, -1], "optional": True}
    assert {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]} == {
        "probabilities": ("TYPE_FP32", [10]), "label": ("TYPE_STRING", [1])}
    gen = client.get_model_config("tiny-gen", headers=key_header(ks))
    assert gen["max_batch_size"] == 0 and {i["name"] for i in gen["input"]} == {
        "label", "seed", "steps", "num_images", "sampler", "guidance"}
    # a request shaped as the config says ([batch] + dims: image [2, 1]) is answered
    th, _ = triton(ks)
    image = th.InferInput("image", [2, 1], "BYTES")
    image.set_data_from_numpy(np.array([[encode(noise(8, 8, 1))], [encode(noise(8, 8, 1))]],
                                       dtype=object))
    answer = client.infer("tiny-cls", [image], headers=key_header(ks))
    assert answer.as_numpy("probabilities").shape == (2, 10)
    with pytest.raises(th.InferenceServerException) as missing:
        client.get_model_config("nope", headers=key_header(ks))
    assert missing.value.status() == "404"


def test_server_metadata_advertises_only_extensions_it_serves(ks):
    _, client = triton(ks)
    meta = client.get_server_metadata(headers=key_header(ks))
    assert meta["extensions"] == ["binary_tensor_data", "model_configuration"]
    image = client.get_model_metadata("tiny-cls", headers=key_header(ks))["inputs"][0]
    assert image["name"] == "image" and "raw bytes" in image["parameters"]["content"]
    assert "base64" in image["parameters"]["content"]
    assert call(ks, "POST", "/v2/repository/models/tiny-cls/load", {})[0] == 403


def test_unimplemented_routes_answer_the_documented_error_shape(ks):
    for method, path in (("GET", "/nope"), ("GET", "/predictions"), ("PUT", "/ping"),
                         ("DELETE", "/predictions/tiny-cls")):
        status, _, got = call(ks, method, path)
        assert status in (404, 405) and set(got) == {"code", "type", "message"}, (path, got)
        assert got["code"] == status
    status, _, got = call(ks, "GET", "/v2/nope")
    assert status == 404 and set(got) == {"error"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_a_multipart_field_without_a_filename_is_read_as_bytes(ks, tmp_path):
    """curl -F "data=<shoe.png" sends the file as a plain field (no filename); TorchServe
    takes its bytes, and so does the KServe server (it re-encoded them as text)."""
    image = encode(noise(8, 8, 1))
    (tmp_path / "shoe.png").write_bytes(image)
    want = Client(run_dir=ks.run_dir).classify(image, model="tiny-cls")
    for field in ("data=<shoe.png", "data=@shoe.png"):
        done = subprocess.run(["curl", "-s", "--noproxy", "*", "-w", "\n%{http_code}",
                               "-H", f"Authorization: Bearer {ks.key}", "-F", field,
                               f"{ks.url}/predictions/tiny-cls"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        body, _, status = done.stdout.rpartition("\n")
        assert status == "200", (field, done.stdout[:300])
        assert_same_answer(json.loads(body), want, atol=1e-7)


def test_pixels_or_images_with_n_zero_are_a_clear_400(ks):
    th, client = triton(ks)
    for name, shape, dtype in (("pixels", [0, 8, 8, 1], "UINT8"), ("image", [0], "BYTES")):
        tensor_ = th.InferInput(name, shape, dtype)
        tensor_.set_data_from_numpy(np.zeros(shape, np.uint8 if dtype == "UINT8" else object))
        with pytest.raises(th.InferenceServerException) as refused:
            client.infer("tiny-cls", [tensor_], headers=key_header(ks))
        assert refused.value.status() == "400" and "N is 0" in str(refused.value), name


# --- batching ----------------------------------------------------------------------------------
def test_requests_sent_together_are_batched_and_a_bad_one_fails_alone(ks):
    client = Client(run_dir=ks.run_dir)
    bodies = [encode(noise(8, 8, 1)) for _ in range(6)]
    bodies[2] = b"this is not an image"
    barrier, responses = threading.Barrier(len(bodies)), [None] * len(bodies)

    def send(i):
        barrier.wait()
        responses[i] = client.request("POST", f"{client.base_url}/predictions/tiny-cls",
                                      bodies[i], {"Content-Type": "image/png"})

    local = local_classifier(ks)
    for _ in range(5):     # the window is 300 ms: a round may still miss it on a busy machine
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert responses[2].status == 400 and responses[2].json()["type"] == "bad_image"
        sizes = []
        for i, r in enumerate(responses):
            if i != 2:
                assert r.status == 200, r.json()
                assert_same_answer(r.json(),
                                   local.predict([local.preprocess(bodies[i], None)])[0])
                sizes.append(int(r.header("X-Pixtok-Batch-Size")))
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, f"no batching seen: batch sizes {sizes}"


# --- the command line -------------------------------------------------------------------------
def test_pixtok_serve_server_kserve_no_auth_from_the_command_line(ks, tmp_path):
    """The CLI as a user runs it, on a run folder and port of its own: --no-auth serves without
    a key (for a gateway that authenticates), then --stop stops it; --no-auth is refused for
    TorchServe, which always asks for its key."""
    port = launcher.free_ports()["inference"]
    env = {"PIXTOK_RUN_DIR": str(tmp_path / "run"), "PIXTOK_INFERENCE_PORT": str(port),
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    store = ks.checkpoint.parent
    cmd = [sys.executable, "-m", "pixtok", "serve"]
    refused = subprocess.run(cmd + ["--no-auth", "--no-ui", "--model-store", str(store)],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--no-auth" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    done = subprocess.run(cmd + ["--server", "kserve", "--no-auth", "--no-ui", "--model-store",
                                 str(store)], env=env, capture_output=True, text=True,
                          timeout=300)
    try:
        assert done.returncode == 0, done.stderr
        assert "KServe ModelServer up" in done.stdout and "auth        off" in done.stdout
        assert not (tmp_path / "run" / "key_file.json").exists()
        url = f"http://127.0.0.1:{port}/v2/models/tiny-cls/infer"
        req = urllib.request.Request(url, json.dumps({"inputs": [b64_images(
            encode(noise(8, 8, 1)))]}).encode(), headers={"Content-Type": "application/json"})
        with OPENER.open(req, timeout=120) as r:
            assert r.status == 200
            assert output(json.loads(r.read()), "label")["shape"] == [1]
    finally:
        stopped = subprocess.run(cmd + ["--stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0 and "stopped KServe" in stopped.stdout
    assert launcher.running_kserve_pid(tmp_path / "run") is None


def test_foreground_as_in_the_manifests_stops_the_server_on_sigterm(ks, tmp_path):
    """`pixtok serve --server kserve --foreground` (the custom predictor's command) stays until
    SIGTERM, then stops the server and exits 0; if the server dies it exits 1."""
    import signal

    port = launcher.free_ports()["inference"]
    run_dir = tmp_path / "run"
    env = {"PIXTOK_RUN_DIR": str(run_dir), "PIXTOK_INFERENCE_PORT": str(port),
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pixtok", "serve", "--server", "kserve", "--foreground",
           "--no-ui", "--model-store", str(ks.checkpoint.parent)]
    for ending, code in (("sigterm", 0), ("server dies", 1)):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "in the foreground" in line:
                    break
            assert any("inference key" in line for line in lines), lines   # printed once
            pid = launcher.running_kserve_pid(run_dir)
            assert pid is not None
            if ending == "sigterm":
                proc.send_signal(signal.SIGTERM)
            else:
                psutil.Process(pid).kill()
            assert proc.wait(timeout=120) == code
            assert launcher.running_kserve_pid(run_dir) is None
            # a killed process with a large heap can still be tearing down on a loaded machine
            # after its parent saw it go: wait (bounded) until it is gone or a zombie
            deadline = time.monotonic() + 30
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                        break
                time.sleep(0.1)
            assert not psutil.pid_exists(pid) or \
                psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()


# --- the page and --stop (last: it stops the server) -------------------------------------------
def test_the_gradio_page_works_against_it_unchanged(ks, tmp_path):
    import gradio_client

    from serving.page_settings import served_models
    from training.data.examples import write_examples

    models = {task: names[0] for task, names in served_models(ks.run_dir).items()}
    assert models == {"classify": "tiny-cls", "depth": "tiny-depth", "generate": "tiny-gen"}
    ui = launcher.start_ui(ks.run_dir, port=launcher.free_ports()["inference"], models=models,
                           env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")}, timeout=120,
                           log=lambda *_: None, examples=write_examples)
    try:
        app = gradio_client.Client(ui.url, verbose=False)
        shoe = tmp_path / "shoe.png"
        shoe.write_bytes(encode(noise(8, 8, 1)))
        scores = app.predict(gradio_client.handle_file(str(shoe)), api_name="/classify")
        want = Client(run_dir=ks.run_dir).classify(shoe.read_bytes(), model="tiny-cls")
        assert scores["label"] == want["label"]
    finally:
        launcher.stop_ui(ks.run_dir, log=lambda *_: None)


def test_a_second_serve_is_refused_and_pixtok_serve_stop_stops_it(ks):
    with pytest.raises(launcher.ServeError, match="already running"):
        launcher.start(ks.run_dir.parent, run_dir=ks.run_dir, log=lambda *_: None)
    pid = server_pid(ks)
    env = {"PIXTOK_RUN_DIR": str(ks.run_dir), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "pixtok", "serve", "--stop"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "stopped KServe" in done.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert launcher.running_kserve_pid(ks.run_dir) is None
    assert not (ks.run_dir / "key_file.json").exists()


# --- the manifests (no server needed) ----------------------------------------------------------
DEPLOY = ROOT / "serving" / "deploy" / "kserve"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_custom_predictor_manifests_run_our_image_without_the_torchserve_runtime(variant):
    import yaml

    from pixtok.cli import build_parser

    (isvc,) = yaml.safe_load_all((DEPLOY / f"inferenceservice-pixtok-{variant}.yaml").read_text())
    assert isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    assert "model" not in predictor and "runtime" not in str(predictor)
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    args = build_parser().parse_args(container["args"])       # the CLI takes them as they are
    assert (args.command, args.server, args.host, args.no_ui, args.foreground) == (
        "serve", "kserve", "0.0.0.0", True, True)
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["PIXTOK_INFERENCE_PORT"])
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    from serving.kserve_guard import OPEN_PATHS

    assert {"/v2/health/ready", "/v2/health/live"} <= set(OPEN_PATHS)    # probes need no key
    for kind in ("requests", "limits"):
        gpus = int(container["resources"][kind].get("nvidia.com/gpu", 0))
        assert gpus == (1 if variant == "gpu" else 0), kind
    old = (DEPLOY / f"inferenceservice-{variant}.yaml").read_text()
    assert old.startswith("# DEPRECATED") and "kserve-torchserve" in old.splitlines()[0]

