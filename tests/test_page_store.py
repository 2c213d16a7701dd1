"""The page serves the store it is given: `pixtok serve` over a store that holds one classifier
of a user's own (its own class names and input size, none of the default models) shows a Classify
tab for it and nothing else, in a real browser and to gradio_client."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_classifier
from PIL import Image

from serving import launcher
from serving.client import DEFAULT_MODELS, Client

gradio_client = pytest.importorskip("gradio_client")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update",
                 "--disable-sync"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NAME = "my-digits"


@pytest.fixture(scope="module")
def store_page(tmp_path_factory):
    """`pixtok serve --server kserve` (no Java) over a store holding only NAME, a 12x12 grey
    classifier with DIGITS as its classes; the page is told nothing but the run folder."""
    tmp = tmp_path_factory.mktemp("one-classifier")
    store, run_dir = tmp / "store", tmp / "run"
    folder = make_classifier(store / NAME, image_size=(12, 12))
    config = json.loads((folder / "config.json").read_text())
    config.update(labels=DIGITS, data={"dataset": "my digit scans"})
    (folder / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIXTOK_CLASSIFIER", "PIXTOK_DEPTH_MODEL", "PIXTOK_GENERATOR")}
    env.update({"PIXTOK_RUN_DIR": str(run_dir), "PIXTOK_MODEL_STORE": str(store),
                "GRADIO_TEMP_DIR": str(tmp / "gradio"), "OMP_NUM_THREADS": "1",
                **{launcher.PORTS[api][0]: str(n) for api, n in launcher.free_ports().items()}})
    env["PIXTOK_UI_PORT"] = str(launcher.free_ports()["inference"])
    serve = [sys.executable, "-m", "pixtok", "serve"]
    try:
        done = subprocess.run([*serve, "--server", "kserve"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        yield f"http://127.0.0.1:{env['PIXTOK_UI_PORT']}/", run_dir
    finally:
        subprocess.run([*serve, "--stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def app(store_page, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        yield gradio_client.Client(store_page[0], verbose=False, analytics_enabled=False,
                                   download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture
def digit(tmp_path):
    path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 20), np.uint8)).save(path)
    return path


def test_gradio_client_sees_the_classifier_only(store_page, app, digit):
    api = app.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/classify"}                 # no /generate, no /depth
    model = {p["parameter_name"]: p for p in api["/classify"]["parameters"]}["model"]
    assert model["parameter_default"] == NAME
    got = app.predict(gradio_client.handle_file(str(digit)), api_name="/classify")
    want = Client(run_dir=store_page[1]).classify(digit.read_bytes(), model=NAME)
    assert got["label"] == want["label"] in DIGITS
    assert [c["label"] for c in got["confidences"]] == [t["label"] for t in want["top_k"]]
    with pytest.raises(gradio_client.exceptions.AppError, match="not a classify model"):
        app.predict(gradio_client.handle_file(str(digit)), DEFAULT_MODELS["classify"],
                    api_name="/classify")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_the_page_shows_only_what_the_store_serves(store_page, digit, tmp_path):
    url, run_dir = store_page
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(url, wait_until="networkidle")
            sync_api.expect(page).to_have_title("pixtok")
            tabs = page.get_by_role("tab")
            sync_api.expect(tabs).to_have_count(1)
            sync_api.expect(tabs.first).to_have_text("Classify")
            text = page.locator("body").inner_text()
            for name in DEFAULT_MODELS.values():         # no default model is named anywhere
                assert name not in page.content(), name
            assert "Generate" not in text and "Depth" not in text
            # the classifier's own classes, input size and data, from its config
            assert NAME in text and "10 classes: zero, one, two" in text
            assert "input 12×12 grey" in text and "my digit scans" in text
            assert not page.locator("#classify-model").is_visible()   # one model: no picker
            assert page.locator("button.gallery-item").count() == 0   # no Fashion-MNIST examples
            page.locator("#classify-input input[type=file]").set_input_files(str(digit))
            page.click("#classify-btn")
            want = Client(run_dir=run_dir).classify(digit.read_bytes(), model=NAME)
            output = page.locator("#classify-output")
            sync_api.expect(output.get_by_test_id("label-output-value")).to_have_text(
                want["label"])
        finally:
            context.close()
