"""KServe: the shipped serving/deploy/kserve/ config run by a real TorchServe (only its addresses
and paths changed) with the kservev2 envelope, answering v2 requests on tiny models saved under
the default names; the manifests; `pixtok serve --foreground`; the page's login."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import yaml
from conftest import make_classifier, make_depth, make_generator, tiny_pipeline
from PIL import Image
from test_serving_generator import pipeline_pixels, pixels

from export.archive import check_name, checkpoint_version, export_archive
from pixtok.errors import UserError
from pixtok.inference.classifier import load_classifier
from pixtok.inference.depth_estimator import load_depth_estimator
from serving import launcher
from serving.client import DEFAULT_MODELS, Client, ServerError, read_properties
from serving.page_settings import UI_PASSWORD_FILE, needs_login, new_ui_password, ui_login

ROOT = Path(__file__).resolve().parents[1]
KSERVE = ROOT / "serving" / "deploy" / "kserve"
CONFIG = KSERVE / "config" / "config.properties"
TASKS = {name: task for task, name in DEFAULT_MODELS.items()}     # model name -> task
RNG = np.random.default_rng(5)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def image_input(name: str, data: bytes) -> dict:
    return {"name": name, "shape": [1], "datatype": "BYTES",
            "data": [base64.b64encode(data).decode()]}


def field(name: str, datatype: str, value) -> dict:
    return {"name": name, "shape": [1], "datatype": datatype, "data": [value]}


def adapted_config(ports: dict, store: Path) -> str:
    """The shipped config with this test's free ports and model store; nothing else changes."""
    local = {"inference_address": f"http://127.0.0.1:{ports['inference']}",
             "management_address": f"http://127.0.0.1:{ports['management']}",
             "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
             "grpc_inference_port": ports["grpc_inference"],
             "grpc_management_port": ports["grpc_management"],
             "model_store": store, "allowed_urls": f"file://{store}/.*"}
    lines = CONFIG.read_text().splitlines()
    keys = [line.split("=", 1)[0] for line in lines]
    assert set(local) <= set(keys)
    return "\n".join(f"{k}={local[k]}" if k in local else line
                     for k, line in zip(keys, lines)) + "\n"


def snapshot_version(name: str) -> str:
    """The one version the shipped config's model_snapshot names for a model."""
    (version,) = json.loads(read_properties(CONFIG)["model_snapshot"])["models"][name]
    return version


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """.path: a model-store/ of the tiny models' archives under the default models' names, as
    `pixtok export model_store` names them (after their checkpoint folders); .checkpoints."""
    ckpts, store = tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("model-store")
    made = {"classify": make_classifier, "depth": make_depth, "generate": make_generator}
    for task, name in DEFAULT_MODELS.items():   # the versions the config names (the shipped ones)
        export_archive(made[task](ckpts / name), store, log=lambda *_: None,
                       version=snapshot_version(name))
    return SimpleNamespace(path=store, checkpoints={task: ckpts / name
                                                    for task, name in DEFAULT_MODELS.items()})


@pytest.fixture(scope="module")
def kserve(store, tmp_path_factory):
    """A Server: TorchServe running the shipped KServe config on the tiny models."""
    ports, run_dir = launcher.free_ports(), tmp_path_factory.mktemp("run")
    config = run_dir.parent / "kserve-config.properties"
    config.write_text(adapted_config(ports, store.path))
    srv = launcher.start(store.path, run_dir=run_dir, timeout=120, log=lambda *_: None, ports=ports,
                         config=config)
    yield srv
    launcher.stop(run_dir, log=lambda *_: None)


def infer(srv, model: str, body: dict) -> tuple[int, dict, dict]:
    """POST /v2/models/<model>/infer -> (status, headers, JSON); no key (KServe's config)."""
    req = urllib.request.Request(f"{srv.inference_url}/v2/models/{model}/infer",
                                 json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with OPENER.open(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def answers(reply: dict) -> list[dict]:
    """The v2 reply's outputs: BYTES, shape [1], each holding one pixtok JSON answer."""
    assert all(o["datatype"] == "BYTES" and o["shape"] == [1] and len(o["data"]) == 1
               for o in reply["outputs"])
    return [json.loads(o["data"][0]) for o in reply["outputs"]]


def test_classifier_answers_v2_as_it_answers_rest(kserve, store):
    local = load_classifier(store.checkpoints["classify"])
    photo = RNG.integers(0, 256, (20, 30, 3), np.uint8)
    grey = RNG.integers(0, 256, (9, 7), np.uint8)
    wants = [local.predict([local.preprocess(png(a), "image/png")])[0] for a in (photo, grey)]
    status, headers, reply = infer(kserve, "fashion-vit1", {
        "id": "req-1", "inputs": [image_input("photo", png(photo)),
                                  {"name": "pixels", "shape": [9, 7, 1], "datatype": "UINT8",
                                   "data": grey.ravel().tolist()}]})
    assert status == 200, reply
    assert {k: reply[k] for k in ("id", "model_name", "model_version")} == {
        "id": "req-1", "model_name": "fashion-vit1",
        "model_version": snapshot_version("fashion-vit1")}
    assert [o["name"] for o in reply["outputs"]] == ["photo", "pixels"]
    assert headers["X-Pixtok-Batch-Size"] == "2"        # the request's inputs ran as one batch
    assert not (kserve.run_dir / "key_file.json").exists()     # no key: KServe fronts it
    for got, want in zip(answers(reply), wants):
        assert (got["label"], got["index"]) == (want["label"], want["index"])
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        np.testing.assert_allclose([t["score"] for t in got["top_k"]],
                                   [t["score"] for t in want["top_k"]], atol=1e-5)


def test_depth_answers_v2_at_the_uploads_size(kserve, store):
    local = load_depth_estimator(store.checkpoints["depth"])
    body = png(RNG.integers(0, 256, (24, 40, 3), np.uint8))
    want = local.predict([local.preprocess(body, "image/png")])[0]
    status, _, reply = infer(kserve, "scenes-vit1-depth", {"inputs": [image_input("image", body)]})
    assert status == 200, reply
    (got,) = answers(reply)
    assert (got["width"], got["height"], got["unit"]) == (40, 24, "m")
    np.testing.assert_allclose([got["min"], got["max"]], [want["min"], want["max"]], rtol=1e-5)
    mm = [np.asarray(Image.open(io.BytesIO(base64.b64decode(a["depth_png"])))).astype(int)
          for a in (got, want)]
    assert np.abs(mm[0] - mm[1]).max() <= 1


def test_generator_answers_named_v2_inputs_deterministically(kserve, store):
    request = [field("label", "BYTES", "coat"), field("seed", "INT64", 3),
               field("steps", "INT64", 4), field("sampler", "BYTES", "ddpm"),
               field("guidance", "FP32", 2.5), field("num_images", "INT64", 2)]
    status, _, reply = infer(kserve, "fashion-dit1", {"inputs": request})
    assert status == 200, reply
    (got,) = answers(reply)
    assert reply["outputs"][0]["name"] == "label"       # the envelope names it after input 0
    assert {k: v for k, v in got.items() if k != "images"} == {
        "label": "coat", "seed": 3, "steps": 4, "sampler": "ddpm", "guidance": 2.5}
    images = pixels(got)
    want = pipeline_pixels(store.checkpoints["generate"], 4, 2, 3, 4, "ddpm", 2.5)
    assert len(images) == 2 and all(np.abs(a.astype(int) - b).max() <= 1
                                    for a, b in zip(images, want))
    by_index = [field("label", "INT64", 4), *request[1:]]       # class 4 is "coat"
    assert answers(infer(kserve, "fashion-dit1", {"inputs": by_index})[2]) == [got]
    reseeded = [*request[:1], field("seed", "INT64", 4), *request[2:]]
    assert answers(infer(kserve, "fashion-dit1", {"inputs": reseeded})[2])[0]["images"] != \
        got["images"]


@pytest.mark.parametrize("model, inputs, code, kind", [
    ("fashion-vit1", [field("image", "BYTES", "not base64!")], 400, "bad_input"),
    ("fashion-vit1", [image_input("image", b"hello, world")], 400, "bad_image"),
    ("fashion-vit1", [field("image", "FP32", 0.5)], 400, "bad_input"),
    ("fashion-vit1", [{"name": "image", "shape": [2, 2], "datatype": "UINT8",
                       "data": [0, 1, 2, 300]}], 400, "bad_input"),
    ("scenes-vit1-depth", [image_input("a", png(np.zeros((4, 4), np.uint8))),
                           image_input("b", b"")], 400, "empty_body"),
    ("fashion-dit1", [field("label", "BYTES", "cape")], 400, "unknown_label"),
    ("fashion-dit1", [field("label", "INT64", 1), field("seed", "FP32", 1.5)], 400, "bad_input"),
    ("fashion-dit1", [field("label", "INT64", 1), field("steps", "INT64", 5000)], 400,
     "bad_field"),
    ("fashion-dit1", [field("colour", "BYTES", "red")], 400, "bad_field"),
    ("fashion-dit1", [field("seed", "INT64", 1)], 400, "bad_field"),    # no label
])
def test_a_bad_v2_request_gets_a_4xx_and_the_model_keeps_serving(kserve, model, inputs, code,
                                                                  kind):
    status, _, reply = infer(kserve, model, {"inputs": inputs})
    assert status == code, reply
    (error,) = answers(reply)
    assert error == {"code": code, "type": kind, "message": error["message"]}
    good = ([field("label", "INT64", 0), field("steps", "INT64", 1)] if model == "fashion-dit1"
            else [image_input("image", png(np.zeros((8, 8), np.uint8)))])
    assert infer(kserve, model, {"inputs": good})[0] == 200


def test_manifests_config_and_runtime_image_fit_together():
    props = read_properties(CONFIG)
    snapshot = json.loads(props["model_snapshot"])
    assert sorted(snapshot["models"]) == sorted(DEFAULT_MODELS.values())
    assert snapshot["modelCount"] == len(snapshot["models"])
    for name, versions in snapshot["models"].items():
        # the version `pixtok export model_store` gives the shipped checkpoint's archive
        entry = versions[checkpoint_version(ROOT / "model_store" / name)]
        assert entry["marName"] == f"{check_name(name)}.mar" and entry["defaultVersion"]
        batching = launcher.BATCHING[TASKS[name]]
        # the kservev2 envelope answers only the first request of a batch: batches of 1
        assert entry["batchSize"] == 1 and entry["maxBatchDelay"] == batching["maxBatchDelay"]
        assert entry["responseTimeout"] == batching.get("responseTimeout", 120)
    assert props["service_envelope"] == "kservev2"
    assert props["inference_address"] == "http://127.0.0.1:8085"     # the kserve wrapper's
    assert props["management_address"] == "http://127.0.0.1:8086"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["allowed_urls"] == "file:///mnt/models/model-store/.*"
    assert (props["disable_token_authorization"], props["enable_model_api"],
            props["install_py_dep_per_model"], props["enable_envvars_config"],
            props["enable_metrics_api"], props["metrics_mode"]) == (
        "true", "false", "false", "false", "true", "prometheus")
    assert int(props["max_request_size"]) == launcher.MAX_REQUEST_BYTES
    assert int(props["max_response_size"]) == launcher.MAX_RESPONSE_BYTES
    longest = max(e["responseTimeout"] for v in snapshot["models"].values() for e in v.values())
    for variant, gpus in (("gpu", 1), ("cpu", 0)):
        (isvc,) = yaml.safe_load_all((KSERVE / f"inferenceservice-{variant}.yaml").read_text())
        assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1",
                                                      "InferenceService")
        assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == "8082"
        predictor = isvc["spec"]["predictor"]
        assert predictor["timeout"] >= longest
        model = predictor["model"]
        assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
        assert model["runtime"] == "kserve-torchserve"
        assert model["storageUri"].startswith(("gs://", "s3://", "pvc://"))
        assert model["image"].endswith(f"-{variant}")
        for kind in ("requests", "limits"):
            assert int(model["resources"][kind].get("nvidia.com/gpu", 0)) == gpus
    readme = (KSERVE / "README.md").read_text()
    assert "pixtok export model_store" in readme and "/v2/models/fashion-vit1/infer" in readme
    assert "model-store/" in readme and "config/config.properties" in readme
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run([str(hadolint), str(KSERVE / "Dockerfile")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- `pixtok serve --foreground` and the page's login --------------------------------------------
def start_foreground(store, folder: Path, models=("fashion-vit1",),
                     env: dict | None = None) -> subprocess.Popen:
    """`pixtok serve --foreground --no-ui` in a subprocess on tiny models (the classifier by
    default), returned once its URLs are printed: .run_dir, .ports, .log (its stdout and
    stderr). env: settings for it."""
    one = folder / "store"
    one.mkdir()
    for name in models:
        shutil.copy(store.path / f"{name}.mar", one)
    run_dir, ports, log = folder / "run", launcher.free_ports(), folder / "stdout.txt"
    env = {**os.environ, "PIXTOK_RUN_DIR": str(run_dir), "PIXTOK_MODEL_STORE": str(one),
           **{launcher.PORTS[api][0]: str(number) for api, number in ports.items()},
           **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pixtok", "serve", "--foreground",
                                 "--no-ui"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "in the foreground" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    proc.run_dir, proc.ports, proc.log = run_dir, ports, log
    return proc


def processes(run_dir: Path) -> list[psutil.Process]:
    """The run folder's TorchServe and its workers."""
    pid = launcher.running_pid(run_dir)
    assert pid is not None, f"no TorchServe runs for {run_dir}"
    server = psutil.Process(pid)
    return [server, *server.children(recursive=True)]


# an operator's settings: batching and workers per task, and a short drain
OPERATOR_ENV = {"PIXTOK_CLASSIFY_BATCH_SIZE": "3", "PIXTOK_CLASSIFY_MAX_BATCH_DELAY_MS": "25",
                "PIXTOK_CLASSIFY_WORKERS": "2", "PIXTOK_DRAIN_SECONDS": "1"}


@pytest.fixture(scope="module")
def foreground(store, tmp_path_factory):
    """The tiny classifier and a slower generator (12x12 latents: a 1,000-step generation runs
    several times longer than the drain, on any machine), with OPERATOR_ENV."""
    folder = tmp_path_factory.mktemp("foreground")
    models = folder / "models"
    models.mkdir()
    shutil.copy(store.path / "fashion-vit1.mar", models)
    tiny_pipeline(latent_size=12).save_pretrained(folder / "fashion-dit1")
    export_archive(folder / "fashion-dit1", models, log=lambda *_: None,
                   version=snapshot_version("fashion-dit1"))
    proc = start_foreground(SimpleNamespace(path=models), folder,
                            ("fashion-vit1", "fashion-dit1"), OPERATOR_ENV)
    yield proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


def test_the_page_asks_for_a_login_beyond_loopback(foreground, tmp_path, monkeypatch):
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert not needs_login(host) and needs_login(host, forced=True)
    for host in ("0.0.0.0", "::", "10.1.2.3", "pixtok.example.org"):
        assert needs_login(host)
    monkeypatch.delenv("PIXTOK_UI_PASSWORD", raising=False)
    with pytest.raises(UserError, match="PIXTOK_UI_PASSWORD"):
        ui_login(tmp_path)
    assert new_ui_password(tmp_path, "given") == ("given", False)
    assert not (tmp_path / UI_PASSWORD_FILE).exists()
    # the real page, its login forced on (binding 0.0.0.0 here would open it to the network)
    port = launcher.free_ports()["inference"]
    ui = launcher.start_ui(foreground.run_dir, port=port, models={"classify": "fashion-vit1"},
                           env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")}, timeout=120,
                           log=lambda *_: None, login=True)
    try:
        user, password = ui.login
        saved = foreground.run_dir / UI_PASSWORD_FILE
        assert ui.password_generated and user == "pixtok" and len(password) >= 20
        assert saved.read_text().strip() == password
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        for path, body in (("config", None), ("gradio_api/call/classify", b'{"data": [null]}')):
            req = urllib.request.Request(f"{ui.url}{path}", body,
                                         {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                OPENER.open(req, timeout=10)
            assert refused.value.code == 401
        gradio_client = pytest.importorskip("gradio_client")
        for wrong in (None, (user, "guess")):
            with pytest.raises(ValueError):
                gradio_client.Client(ui.url, auth=wrong, verbose=False, analytics_enabled=False)
        app = gradio_client.Client(ui.url, auth=ui.login, verbose=False,
                                   analytics_enabled=False, download_files=str(tmp_path))
        shoe = tmp_path / "shoe.png"
        shoe.write_bytes(png(RNG.integers(0, 256, (28, 28), np.uint8)))
        scores = app.predict(gradio_client.handle_file(str(shoe)), api_name="/classify")
        direct = Client(run_dir=foreground.run_dir).classify(shoe.read_bytes(), "fashion-vit1")
        assert scores["label"] == direct["label"]
    finally:
        launcher.stop_ui(foreground.run_dir, log=lambda *_: None)
    assert not saved.exists()


def test_operator_settings_reach_torchserve(foreground):
    client = Client(run_dir=foreground.run_dir)
    info = client.describe("fashion-vit1")
    assert (info["batchSize"], info["maxBatchDelay"]) == (3, 25)
    assert info["minWorkers"] == info["maxWorkers"] == len(info["workers"]) == 2
    # the archive's version is its checkpoint's, shown by the management API
    assert info["modelVersion"] == snapshot_version("fashion-vit1") != "1.0"
    info = client.describe("fashion-dit1")     # not set: BATCHING's
    assert info["batchSize"] == launcher.BATCHING["generate"]["batchSize"]
    assert len(info["workers"]) == 1


@pytest.mark.parametrize("name, value", [("PIXTOK_CLASSIFY_BATCH_SIZE", "0"),
                                         ("PIXTOK_DEPTH_WORKERS", "two"),
                                         ("PIXTOK_GENERATE_MAX_BATCH_DELAY_MS", "-1"),
                                         ("PIXTOK_DRAIN_SECONDS", "soon"),
                                         ("PIXTOK_GATE", "maybe"),
                                         ("PIXTOK_REQUEST_TIMEOUT_S", "-5")])
def test_a_bad_operator_setting_is_one_line_and_exit_2(name, value, tmp_path):
    env = {**os.environ, "PIXTOK_RUN_DIR": str(tmp_path / "run"), name: value}
    done = subprocess.run([sys.executable, "-m", "pixtok", "serve", "--no-ui"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert name in done.stderr and repr(value) in done.stderr
    assert launcher.running_pid(tmp_path / "run") is None


def test_foreground_serves_until_sigterm_then_stops_everything(foreground):
    run_dir, out = foreground.run_dir, foreground.log.read_text()
    assert f"http://127.0.0.1:{foreground.ports['inference']}/predictions/<model>" in out
    keys = json.loads((run_dir / "key_file.json").read_text())
    assert out.count(keys["inference"]["key"]) == 1          # printed once, for `docker logs`
    assert keys["management"]["key"] not in out and keys["API"]["key"] not in out
    client = Client(run_dir=run_dir, timeout=60)
    assert client.classify(png(np.zeros((28, 28), np.uint8)), "fashion-vit1")["label"]
    started = processes(run_dir)
    assert len(started) >= 3 and foreground.poll() is None     # TorchServe and its workers
    # a generation that takes far longer than the drain is in flight when SIGTERM comes
    answer = {}

    def generate():
        try:
            answer["ok"] = client.generate("tee", model="fashion-dit1", steps=1000,
                                           num_images=16, sampler="ddpm")
        except Exception as e:  # noqa: BLE001 - the test looks at what it was
            answer["error"] = e

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(2)
    assert thread.is_alive(), answer        # still generating: the drain has to cut it short
    t0 = time.monotonic()
    foreground.send_signal(signal.SIGTERM)
    assert foreground.wait(60) == 0
    assert time.monotonic() - t0 <= 10, foreground.log.read_text()[-1500:]   # `docker stop`'s
    thread.join(30)
    error = answer.get("error")     # answered 503, not reset: the client may send it again
    assert isinstance(error, ServerError) and error.status == 503, answer
    assert error.payload["type"] == "shutting_down", error.payload
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive and launcher.running_pid(run_dir) is None
    assert launcher.running_gate_pid(run_dir) is None and not launcher.gate_file(run_dir).exists()
    assert not (run_dir / "key_file.json").exists()
    out = foreground.log.read_text()
    assert "SIGTERM, stopping" in out
    assert re.search(r"^\[gate\] .*gate: 127\.0\.0\.1:\d+ -> http://127\.0\.0\.1:", out, re.M)
    # TorchServe's own logs reached stdout (`docker logs`), each line marked with its source
    assert re.search(r"^\[access\] .*POST /predictions/fashion-vit1 HTTP/1.1\" 200", out, re.M)
    assert re.search(r"^\[access\] .*POST /predictions/fashion-dit1 HTTP/1.1\" 503", out, re.M)
    assert re.search(r"^\[model\] .*pixtok: fashion-dit1 ready", out, re.M)
    assert re.search(r"^\[torchserve\] .*Loading initial models", out, re.M), out[-3000:]


def test_foreground_exits_nonzero_when_torchserve_dies(store, tmp_path):
    proc = start_foreground(store, tmp_path)
    try:
        server, *workers = processes(proc.run_dir)
        assert workers
        server.kill()
        assert proc.wait(60) == 1
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive                        # the dead server's workers were stopped too
        assert f"TorchServe (pid {server.pid}) exited" in proc.log.read_text()
        assert launcher.running_gate_pid(proc.run_dir) is None      # the gate went with it
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
