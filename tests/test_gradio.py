"""The Gradio front end over the real stack: gradio_client calls /generate, /classify and /depth
of the app `pixtok serve` starts, against the session's TorchServe (keys expire every 6 s)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime

import numpy as np
import psutil
import pytest
from conftest import LABELS, make_classifier
from PIL import Image

from pixtok.inference.validate import GENERATE_DEFAULTS, SAMPLERS
from serving import launcher
from serving.client import DEFAULT_MODELS
from serving.page_actions import RANDOM_SEEDS, colour_table, colourise, decode_depth, legend_html
from serving.page_models import generate_examples, page_models
from serving.page_settings import archive_labels, model_names, served_archives
from training.data.examples import FASHION_DIR, SCENE_SEED, SCENE_SIZE, write_examples

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app(ui, tmp_path_factory):
    """A gradio_client.Client of the front end; its downloads go to a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        # gradio_client sends usage statistics unless this says otherwise
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        yield gradio_client.Client(ui.url, verbose=False, analytics_enabled=False,
                                   download_files=str(tmp_path_factory.mktemp("downloads")))


def needs(ui, task: str) -> str:
    if task not in ui.models:
        pytest.skip(f"the session server has no {task} model yet (tests/conftest.py `server`)")
    return ui.models[task]


def example(ui, prefix: str):
    paths = sorted((ui.run_dir / "ui" / "examples").glob(f"{prefix}*.png"))
    assert paths, f"no {prefix}* example was written into the run folder"
    return paths[0]


def test_page_and_api_names(ui, app):
    names = set(app.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/classify", "/depth"} <= names
    assert launcher.running_ui_pid(ui.run_dir) == ui.pid
    assert (ui.run_dir / "logs" / "gradio.out").is_file()
    # the front end holds no model: it has not even loaded torch
    libraries = {m.path for m in psutil.Process(ui.pid).memory_maps()}
    assert not any("libtorch" in path for path in libraries)


def test_classify_shows_the_servers_top_k(server, ui, app):
    path = example(ui, "scene-")     # RGB; the grey classifier converts it, as the server does
    got = app.predict(gradio_client.handle_file(str(path)), api_name="/classify")
    want = server.client().classify(path.read_bytes(), model=ui.models["classify"])
    assert got["label"] == want["label"] in LABELS
    confidences = {c["label"]: c["confidence"] for c in got["confidences"]}
    assert list(confidences) == [t["label"] for t in want["top_k"]]
    np.testing.assert_allclose(list(confidences.values()), [t["score"] for t in want["top_k"]],
                               atol=1e-6)


def test_a_file_that_is_not_an_image_gets_the_servers_message(ui, app, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are notes, not pixels\n" * 4)
    with pytest.raises(gradio_client.exceptions.AppError) as caught:
        app.predict(gradio_client.handle_file(str(bad)), api_name="/classify")
    message = str(caught.value)
    assert "not a PNG, JPEG, WebP, BMP or GIF image" in message
    assert "Traceback" not in message
    # the page and the server keep working
    good = app.predict(gradio_client.handle_file(str(example(ui, "scene-"))), api_name="/classify")
    assert good["label"] in LABELS


def test_the_front_end_survives_key_rollover(server, ui, app):
    key_file = server.run_dir / "key_file.json"
    path = gradio_client.handle_file(str(example(ui, "scene-")))
    assert app.predict(path, api_name="/classify")["label"] in LABELS
    keys = json.loads(key_file.read_text())
    expires = datetime.fromisoformat(keys["inference"]["expiration time"][:19]).replace(tzinfo=UTC)
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.0)
    assert app.predict(path, api_name="/classify")["label"] in LABELS
    assert json.loads(key_file.read_text())["inference"]["key"] != keys["inference"]["key"]


def test_depth_is_coloured_with_its_range_in_metres(server, ui, app):
    model = needs(ui, "depth")
    path = example(ui, "scene-")
    got_image, legend = app.predict(gradio_client.handle_file(str(path)), api_name="/depth")
    want = server.client().depth(path.read_bytes(), model=model)
    shown = np.asarray(Image.open(got_image).convert("RGB"))
    expected = colourise(decode_depth(want), want["min"], want["max"], colour_table())
    assert shown.shape == (want["height"], want["width"], 3)
    np.testing.assert_array_equal(shown, expected)
    lo, hi = (float(v) for v in re.findall(r"data-(?:min|max)-m=\"([0-9.]+)\"", legend))
    assert lo == pytest.approx(want["min"], abs=1e-3) and hi == pytest.approx(want["max"],
                                                                             abs=1e-3)
    assert f"{want['min']:.2f} m" in legend and f"{want['max']:.2f} m" in legend


def test_generate_matches_the_rest_api_byte_for_byte(server, ui, app):
    model = needs(ui, "generate")
    labels = archive_labels(served_archives(server.run_dir)[model])
    request = {"seed": 3, "sampler": "ddim", "steps": 2, "guidance": 2.0, "num_images": 2}
    got, seed = app.predict(labels[-1], request["seed"], request["sampler"], request["steps"],
                            request["guidance"], request["num_images"], api_name="/generate")
    want = server.client().generate(labels[-1], model=model, **request)
    assert seed == 3 and len(got) == 2
    for item, b64 in zip(got, want["images"]):
        shown = np.asarray(Image.open(item["image"]))
        sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
        np.testing.assert_array_equal(shown, sent)
        assert shown.std() > 0     # not a blank image
        assert labels[-1] in item["caption"] and "seed 3" in item["caption"]


def test_a_random_seed_is_drawn_shown_and_reproduces_over_rest(server, ui, app):
    model = needs(ui, "generate")
    labels = archive_labels(served_archives(server.run_dir)[model])
    request = {"sampler": "ddim", "steps": 2, "guidance": 2.0, "num_images": 1}
    got, seed = app.predict(labels[0], 5, request["sampler"], request["steps"],
                            request["guidance"], request["num_images"], True,
                            api_name="/generate")
    assert isinstance(seed, int) and 0 <= seed < RANDOM_SEEDS
    assert f"seed {seed}" in got[0]["caption"]
    want = server.client().generate(labels[0], model=model, seed=seed, **request)
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(want["images"][0]))))
    np.testing.assert_array_equal(np.asarray(Image.open(got[0]["image"])), sent)
    # unticked, the seed field is the seed
    _, kept = app.predict(labels[0], 5, request["sampler"], request["steps"],
                          request["guidance"], request["num_images"], False,
                          api_name="/generate")
    assert kept == 5


def test_the_generate_examples_are_valid_requests(server, ui):
    from pixtok.inference.validate import parse_generate_request

    model = needs(ui, "generate")
    labels = archive_labels(served_archives(server.run_dir)[model])
    rows = generate_examples(labels)
    assert {row[2] for row in rows} == set(SAMPLERS)     # one per sampler
    for label, seed, sampler, steps, guidance, count in rows:
        parse_generate_request({"label": label, "seed": seed, "sampler": sampler,
                                "steps": steps, "guidance": guidance, "num_images": count},
                               labels)


def test_generate_defaults_are_the_rest_defaults(app):
    params = {p["parameter_name"]: p for p in
              app.view_api(print_info=False, return_format="dict")["named_endpoints"]
              ["/generate"]["parameters"]}
    assert params["seed"]["parameter_default"] == GENERATE_DEFAULTS["seed"]
    assert params["sampler"]["parameter_default"] == GENERATE_DEFAULTS["sampler"]
    assert params["steps"]["parameter_default"] == GENERATE_DEFAULTS["steps"]
    assert params["guidance"]["parameter_default"] == GENERATE_DEFAULTS["guidance"]
    assert params["count"]["parameter_default"] == GENERATE_DEFAULTS["num_images"]
    assert params["random_seed"]["parameter_default"] is False


def test_labels_and_tasks_come_from_the_served_archives(server):
    archives = served_archives(server.run_dir)
    assert set(archives) >= {"tiny-cls", "tiny-cls-torch"}
    assert archive_labels(archives["tiny-cls"]) == LABELS


def test_the_page_knows_every_served_model_and_puts_the_preferred_first(server, monkeypatch):
    monkeypatch.delenv("PIXTOK_CLASSIFIER", raising=False)
    found = page_models(server.run_dir)
    classifiers = [m.name for m in found["classify"]]
    assert classifiers == sorted(classifiers) and {"tiny-cls", "tiny-cls-torch"} <= set(classifiers)
    tiny = next(m for m in found["classify"] if m.name == "tiny-cls")
    assert tiny.labels == LABELS and tiny.image_size == [8, 8] and tiny.channels == 1
    assert [m.name for m in page_models(server.run_dir, {"classify": "tiny-cls-torch"})
            ["classify"]][0] == "tiny-cls-torch"
    monkeypatch.setenv("PIXTOK_CLASSIFIER", "tiny-cls-torch")
    assert page_models(server.run_dir)["classify"][0].name == "tiny-cls-torch"
    assert list(found) == [t for t in ("generate", "classify", "depth") if t in found]


def test_classify_takes_the_model_to_ask(server, ui, app):
    """The session serves two classifiers: the page's model picker is /classify's last input."""
    api = app.view_api(print_info=False, return_format="dict")["named_endpoints"]
    model = {p["parameter_name"]: p for p in api["/classify"]["parameters"]}["model"]
    assert model["parameter_default"] == ui.models["classify"]
    path = example(ui, "scene-")
    for name in ("tiny-cls", "tiny-cls-torch"):
        got = app.predict(gradio_client.handle_file(str(path)), name, api_name="/classify")
        want = server.client().classify(path.read_bytes(), model=name)
        assert got["label"] == want["label"]
        np.testing.assert_allclose([c["confidence"] for c in got["confidences"]],
                                   [t["score"] for t in want["top_k"]], atol=1e-5)
    with pytest.raises(gradio_client.exceptions.AppError, match="not a classify model"):
        app.predict(gradio_client.handle_file(str(path)), "nope", api_name="/classify")


def test_model_names_flag_then_environment_then_default(monkeypatch):
    monkeypatch.setenv("PIXTOK_DEPTH_MODEL", "env-depth")
    monkeypatch.delenv("PIXTOK_CLASSIFIER", raising=False)
    monkeypatch.delenv("PIXTOK_GENERATOR", raising=False)
    names = model_names({"generate": "flag-gen", "classify": None})
    assert names == {"classify": DEFAULT_MODELS["classify"], "depth": "env-depth",
                     "generate": "flag-gen"}
    assert DEFAULT_MODELS == {"classify": "fashion-vit1", "depth": "scenes-vit1-depth",
                              "generate": "fashion-dit1"}


def test_examples_are_real_test_images_and_rendered_scenes(tmp_path):
    from training.data.fashion_mnist import find_idx, read_idx
    from training.data.scenes import render_scene

    examples = write_examples(tmp_path)
    for i, path in enumerate(examples["depth"]):
        want, _ = render_scene((SCENE_SEED, i), SCENE_SIZE)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), want)
    if not FASHION_DIR.is_dir():
        assert examples["classify"] == []
        return
    images = read_idx(find_idx(FASHION_DIR, "t10k-images-idx3-ubyte"), 3)
    labels = read_idx(find_idx(FASHION_DIR, "t10k-labels-idx1-ubyte"), 1)
    assert len(examples["classify"]) == 6
    for k, path in enumerate(examples["classify"]):
        klass, index = (int(v) for v in path.stem.split("-")[2:])
        assert klass == k == labels[index]
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[index])


def test_colour_map_spreads_the_range_and_greys_missing_depth():
    table = colour_table()
    depth = np.array([[0.5, 1.0, 1.5, 0.0]], np.float32)        # (1, 4) metres, 0 = none
    rgb = colourise(depth, 0.5, 1.5, table)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], table[0])          # near
    np.testing.assert_array_equal(rgb[0, 2], table[255])        # far
    np.testing.assert_array_equal(rgb[0, 1], table[128])        # halfway
    np.testing.assert_array_equal(rgb[0, 3], [128, 128, 128])   # no depth
    assert table[0].sum() > table[255].sum()                    # near is the brighter end
    assert "0.50 m (near)" in legend_html(0.5, 1.5, table)


def test_a_second_front_end_or_a_taken_port_is_refused(ui):
    with pytest.raises(launcher.ServeError, match="already running"):
        launcher.start_ui(ui.run_dir, port=ui.port)
    with pytest.raises(launcher.ServeError, match="PIXTOK_UI_PORT"):
        launcher.check_ui_port_free("127.0.0.1", ui.port)


def test_pixtok_serve_starts_both_and_stop_stops_both(tmp_path):
    store, run_dir = tmp_path / "store", tmp_path / "run"
    make_classifier(store / "tiny-cls")
    ports = launcher.free_ports()
    env = {**os.environ, "PIXTOK_RUN_DIR": str(run_dir), "PIXTOK_MODEL_STORE": str(store),
           "PIXTOK_CLASSIFIER": "tiny-cls", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           **{launcher.PORTS[api][0]: str(number) for api, number in ports.items()}}
    env["PIXTOK_UI_PORT"] = str(launcher.free_ports()["inference"])
    pixtok = [sys.executable, "-m", "pixtok", "serve"]
    try:
        done = subprocess.run(pixtok, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        # start-up progress on stderr: the archive it builds, then the wait for READY workers
        assert "building archives: tiny-cls.mar" in done.stderr
        assert "pixtok serve: waiting for READY: tiny-cls" in done.stderr
        assert "pixtok serve: every model READY: 100%" in done.stderr
        assert "READY" not in done.stdout
        ui_url = f"http://127.0.0.1:{env['PIXTOK_UI_PORT']}/"
        assert ui_url in done.stdout and f"127.0.0.1:{ports['inference']}" in done.stdout
        assert (f"gRPC        127.0.0.1:{ports['grpc_inference']} (inference), "
                f"127.0.0.1:{ports['grpc_management']} (management" in done.stdout)
        ts_pid, ui_pid = launcher.running_pid(run_dir), launcher.running_ui_pid(run_dir)
        assert ts_pid and ui_pid
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(ui_url, timeout=10) as page:
            assert page.status == 200 and b"pixtok" in page.read()
    finally:
        stopped = subprocess.run([*pixtok, "--stop"], env=env, capture_output=True, text=True,
                                 timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "Gradio front end stopped" in stopped.stdout and "stopped (pid" in stopped.stdout
    assert launcher.running_pid(run_dir) is None and launcher.running_ui_pid(run_dir) is None
    assert not (run_dir / "gradio.pid").exists()
