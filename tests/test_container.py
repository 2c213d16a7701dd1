"""What the container build and its HEALTHCHECK run, run here. The image itself is built and
run by `make image` and `make test-container` (.ci/test-container), which CI runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from clirun import pixtok
from conftest import make_classifier

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    res = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_runs_the_make_install_steps():
    text = (ROOT / "Dockerfile").read_text()
    assert "make install" in text and "pixtok export model_store" in text
    assert "USER 10001" in text and "HEALTHCHECK" in text and "serving.healthcheck" in text
    for port in (8080, 8081, 8082, 7860):
        assert str(port) in text.split("EXPOSE", 1)[1].splitlines()[0]
    # two stages: the image takes the built /app and installs no build tools of its own
    build, image = text.split("\nFROM ${BASE}\n")
    assert "FROM ${BASE} AS build" in build and "COPY --from=build /app /app" in image
    installs = re.findall(r"apt-get install[^\n]*", image)
    assert installs and not re.search(r"\b(make|gcc|g\+\+|build-essential|python3-dev|"
                                      r"python3-venv|python3-pip)\b", " ".join(installs))
    # torch's CPU wheel may come from a local folder; a CA bundle for pip stays a secret
    assert "--mount=type=bind,from=wheels" in text and "--mount=type=secret,id=pip_cert" in text


def test_make_install_leaves_test_packages_out_of_a_serving_install():
    done = subprocess.run(["make", "-n", "-B", "install", "EXTRAS=serve", "VENV=/nonexistent"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "'.[serve]'" in done.stdout, done.stderr
    assert "taming-transformers-rom1504" not in done.stdout
    done = subprocess.run(["make", "-n", "-B", "install", "EXTRAS=test", "VENV=/nonexistent"],
                          cwd=ROOT, capture_output=True, text=True)
    assert "taming-transformers-rom1504==0.0.6" in done.stdout


def test_export_a_whole_model_store(tmp_path):
    store = tmp_path / "model_store"
    make_classifier(store / "tiny-a")
    make_classifier(store / "tiny-b", seed=1)
    pixtok("export", store, "--out", store)
    assert sorted(p.name for p in store.glob("*.mar")) == ["tiny-a.mar", "tiny-b.mar"]
    res = pixtok("export", store, "--onnx", check=False)
    assert res.returncode == 2 and "model store" in res.stderr


def test_healthcheck_asks_for_a_real_prediction(server):
    env = {**os.environ, "PIXTOK_RUN_DIR": str(server.run_dir), "PIXTOK_CLASSIFIER": "tiny-cls",
           "PIXTOK_INFERENCE_PORT": str(server.ports["inference"]),
           "PIXTOK_MANAGEMENT_PORT": str(server.ports["management"])}
    res = subprocess.run([sys.executable, "-m", "serving.healthcheck"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and "healthy" in res.stdout, res.stderr
    env["PIXTOK_CLASSIFIER"] = "no-such-model"
    res = subprocess.run([sys.executable, "-m", "serving.healthcheck"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 1 and "unhealthy" in res.stderr
    # without a name, a model the run folder's server serves (this store holds no fashion-vit1)
    del env["PIXTOK_CLASSIFIER"]
    res = subprocess.run([sys.executable, "-m", "serving.healthcheck"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and "healthy" in res.stdout, res.stderr
