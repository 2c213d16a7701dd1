"""Property tests (hypothesis) for what a stranger's request reaches: the request validators and
image decoding. Any input gives an answer or a documented RequestError (a 4xx with its type),
never another exception (issue 22)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixtok.inference.classifier import load_classifier
from pixtok.inference.images import decode_image
from pixtok.inference.validate import (
    MAX_IMAGES,
    MAX_STEPS,
    RequestError,
    check_image_request,
    parse_generate_request,
)
from pixtok.sampling import SAMPLERS

LABELS = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
          "boot"]
IMAGE_TYPES = {(400, "bad_image"), (413, "image_too_large"), (400, "empty_body"),
               (413, "body_too_large"), (415, "unsupported_media_type")}
GENERATE_TYPES = {(400, "bad_json"), (400, "bad_field"), (400, "unknown_label"),
                  (400, "empty_body")}
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def documented(err: RequestError, allowed: set) -> bool:
    return ((err.code, err.type) in allowed and isinstance(err.message, str) and err.message
            and json.loads(err.to_json()) == err.to_dict())


def seeds() -> dict[str, bytes]:
    """One small valid file per accepted format: mutations of these reach deep into decoders."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    out = {}
    for fmt, img, kw in [("PNG", rgb, {}), ("JPEG", rgb, {"quality": 80}), ("WEBP", rgb, {}),
                         ("BMP", rgb, {}), ("GIF", rgb.convert("P"), {}),
                         ("PNG", rgb.convert("RGBA"), {}), ("PNG", rgb.convert("P"), {}),
                         ("JPEG", rgb.convert("CMYK"), {})]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[f"{fmt}-{img.mode}"] = buf.getvalue()
    return out


SEEDS = seeds()


@st.composite
def damaged_images(draw) -> bytes:
    """A valid image with bytes flipped, cut, or spliced in."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "zero_run"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + draw(st.integers(1, 64))] = b"\0" * 8
    return bytes(data)


def check_decode(data: bytes, channels: int):
    try:
        pixels = decode_image(data, channels)
    except RequestError as e:
        assert documented(e, IMAGE_TYPES), e.to_dict()
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == channels
    assert pixels.shape[0] >= 1 and pixels.shape[1] >= 1


@SETTINGS
@given(data=st.binary(max_size=4096), channels=st.sampled_from([1, 3]))
def test_any_bytes_decode_or_are_a_documented_4xx(data, channels):
    check_decode(data, channels)


@SETTINGS
@given(data=damaged_images(), channels=st.sampled_from([1, 3]))
def test_damaged_images_decode_or_are_a_documented_4xx(data, channels):
    check_decode(data, channels)


@SETTINGS
@given(body=st.one_of(st.binary(max_size=256), st.text(max_size=64), st.none(), st.integers()),
       ctype=st.one_of(st.none(), st.text(max_size=40),
                       st.sampled_from(["image/png", "application/octet-stream", "text/plain",
                                        "multipart/form-data; boundary=x", "IMAGE/PNG ; q=1"])))
def test_image_request_check_returns_bytes_or_a_documented_4xx(body, ctype):
    try:
        got = check_image_request(body, ctype)
    except RequestError as e:
        assert documented(e, IMAGE_TYPES), e.to_dict()
        return
    assert isinstance(got, bytes) and got == bytes(body) and len(got) > 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={
    "label": st.one_of(st.integers(-3, 12), st.sampled_from(LABELS + ["cat", "3", ""]),
                       JSON_VALUES),
    "seed": st.one_of(st.integers(), JSON_VALUES),
    "steps": st.one_of(st.integers(-2, 1200), JSON_VALUES),
    "sampler": st.one_of(st.sampled_from(["ddpm", "ddim", "dpm", "euler"]), JSON_VALUES),
    "guidance": st.one_of(st.floats(allow_nan=True, allow_infinity=True), JSON_VALUES),
    "num_images": st.one_of(st.integers(-1, 20), JSON_VALUES),
    "stream": st.one_of(st.booleans(), JSON_VALUES),
    "extra": JSON_VALUES,
})


def check_generate(body):
    try:
        got = parse_generate_request(body, LABELS)
    except RequestError as e:
        assert documented(e, GENERATE_TYPES), e.to_dict()
        return
    assert got["label"] == LABELS[got["index"]]
    assert 1 <= got["steps"] <= MAX_STEPS and 1 <= got["num_images"] <= MAX_IMAGES
    assert got["sampler"] in SAMPLERS and np.isfinite(got["guidance"])
    assert isinstance(got["seed"], int) and not isinstance(got["seed"], bool)
    assert isinstance(got["stream"], bool)


@SETTINGS
@given(fields=FIELDS, as_bytes=st.booleans())
def test_generate_requests_parse_or_are_a_documented_4xx(fields, as_bytes):
    text = json.dumps(fields)        # NaN and Infinity too: Python's JSON reads them
    check_generate(text.encode() if as_bytes else text)


@SETTINGS
@given(body=st.one_of(st.binary(max_size=512), st.text(max_size=128), JSON_VALUES))
def test_any_generate_body_parses_or_is_a_documented_4xx(body):
    check_generate(body)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from conftest import make_classifier

    ckpt = make_classifier(tmp_path_factory.mktemp("ckpt") / "tiny-cls")
    return load_classifier(ckpt)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.one_of(damaged_images(), st.binary(max_size=1024)),
       ctype=st.sampled_from([None, "image/png", "application/octet-stream"]))
def test_the_classifier_core_answers_or_gives_a_documented_4xx(classifier, data, ctype):
    try:
        x = classifier.preprocess(data, ctype)
    except RequestError as e:
        assert documented(e, IMAGE_TYPES), e.to_dict()
        return
    answer = classifier.predict([x])[0]
    assert answer["label"] in LABELS and 0 <= answer["score"] <= 1
