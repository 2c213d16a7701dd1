"""The depth model over the REST API of the session's TorchServe, its archive and its ONNX file."""
from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export.archive import ExportError, export_archive
from pixtok.checkpoint import load_model
from pixtok.inference.depth_estimator import load_depth_estimator

RNG = np.random.default_rng(1)
QUIET = {"log": lambda *_: None}


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise(h: int, w: int, c: int = 3) -> Image.Image:
    arr = RNG.integers(0, 256, (h, w, c), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if c == 1 else arr)


def millimetres(answer: dict) -> np.ndarray:
    """The answer's depth_png decoded: (height, width) uint16, after checking it is 16-bit."""
    img = Image.open(io.BytesIO(base64.b64decode(answer["depth_png"])))
    assert img.format == "PNG" and img.mode.startswith("I;16"), img.mode
    assert img.size == (answer["width"], answer["height"])
    mm = np.asarray(img)
    assert mm.dtype == np.uint16
    return mm


def assert_per_contract(answer: dict, width: int, height: int) -> np.ndarray:
    assert set(answer) == {"width", "height", "unit", "min", "max", "depth_png"}
    assert (answer["width"], answer["height"], answer["unit"]) == (width, height, "m")
    mm = millimetres(answer)
    assert 0 < answer["min"] < answer["max"] < 65.535      # a random head: depth varies
    # every value is the depth in mm, rounded: the extremes are the reported min and max
    assert mm.min() == round(answer["min"] * 1000) and mm.max() == round(answer["max"] * 1000)
    return mm


def test_depth_answers_per_contract_at_the_uploads_size(server):
    client = server.client()
    local = load_depth_estimator(server.depth_checkpoint)
    for img in (noise(20, 30), noise(7, 5, 1), noise(96, 128)):   # smaller, grey, larger
        body = encode(img)
        got = client.depth(body, model="tiny-depth")
        mm = assert_per_contract(got, *img.size)
        want = local.predict([local.preprocess(body, "image/png")])[0]
        np.testing.assert_allclose(mm, millimetres(want), atol=1)
        np.testing.assert_allclose([got["min"], got["max"]], [want["min"], want["max"]],
                                   rtol=1e-5)
    log = (server.run_dir / "logs" / "model_log.log").read_text()
    assert "pixtok: tiny-depth ready" in log and "not self-contained" not in log


def post(client, body: bytes, content_type: str):
    return client.request("POST", f"{client.base_url}/predictions/tiny-depth", body,
                          {"Content-Type": content_type})


@pytest.mark.parametrize("body, ctype, code, kind", [
    (b"hello, world", "image/png", 400, "bad_image"),
    (b"", "application/octet-stream", 400, "empty_body"),
    (b'{"label": 1}', "application/json", 415, "unsupported_media_type"),
    (b"a photo", "text/plain", 415, "unsupported_media_type"),
])
def test_depth_rejects_non_images_and_keeps_serving(server, body, ctype, code, kind):
    client = server.client()
    r = post(client, body, ctype)
    assert r.status == code, r.body[:200]
    payload = r.json()
    assert payload == {"code": code, "type": kind, "message": payload["message"]}
    assert post(client, encode(noise(12, 16)), "image/png").status == 200


def test_depth_archive_and_onnx_agree_with_pytorch(tiny_depth, tmp_path):
    mar = export_archive(tiny_depth, tmp_path / "store", onnx=True, **QUIET)
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(mar).extractall(unpacked)
    code = {str(p.relative_to(unpacked)) for p in (unpacked / "pixtok").rglob("*.py")}
    assert {"pixtok/models/vit.py", "pixtok/models/depth.py", "pixtok/resize.py",
            "pixtok/inference/depth_estimator.py"} <= code
    assert json.loads((unpacked / "config.json").read_text())["task"] == "depth"
    # the ONNX graph: a dynamic batch axis, depth (N, 1, H, W) as PyTorch computes it
    model, _ = load_model(tiny_depth)
    session = ort.InferenceSession(str(unpacked / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["depth"]
    x = torch.rand(3, 3, 12, 16)
    with torch.inference_mode():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], expected, rtol=1e-4)
    # and the served answers of both backends, from the unpacked archive
    onnx = load_depth_estimator(unpacked, prefer_onnx=True)
    torch_ = load_depth_estimator(unpacked, prefer_onnx=False)
    assert (onnx.backend.name, torch_.backend.name) == ("onnxruntime", "torch")
    bodies = [encode(noise(24, 32)), encode(noise(30, 20))]
    for a, b in zip(onnx.predict([onnx.preprocess(x, "image/png") for x in bodies]),
                    torch_.predict([torch_.preprocess(x, "image/png") for x in bodies])):
        np.testing.assert_allclose(millimetres(a), millimetres(b), atol=1)
        np.testing.assert_allclose([a["min"], a["max"]], [b["min"], b["max"]], rtol=1e-4)


def test_a_depth_config_that_contradicts_its_model_is_refused(tiny_depth, tmp_path):
    ckpt = tmp_path / "bad-depth"
    ckpt.mkdir()
    config = json.loads((tiny_depth / "config.json").read_text())
    config["input"]["image_size"] = [48, 64]          # the model was built for 12 x 16
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes((tiny_depth / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match=r"input is \[48, 64\] but the model's image_size"):
        export_archive(ckpt, tmp_path / "store", **QUIET)
