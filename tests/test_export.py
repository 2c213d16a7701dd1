"""`pixtok export`: what goes into a .mar, that it runs without pixtok, ONNX parity, CLI errors."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from clirun import pixtok
from PIL import Image

from export.archive import (
    CODE_DIGEST,
    ExportError,
    build_missing_archives,
    checkpoint_version,
    code_digest,
    export_archive,
    is_stale,
)
from export.onnx import export_onnx
from pixtok.checkpoint import load_model
from pixtok.inference.classifier import load_classifier

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *_: None}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()



def test_archive_holds_code_config_and_safetensors_only(tiny_classifier, tmp_path):
    mar = export_archive(tiny_classifier, tmp_path, **QUIET)
    assert mar == tmp_path / "tiny-cls.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = json.loads(z.read("config.json"))
        weights = z.read("model.safetensors")
        labels = json.loads(z.read("index_to_name.json"))
        vit = z.read("pixtok/models/vit.py")
    code = {f"pixtok/{f}.py" for f in
            ("__init__", "models/vit", "resize", "inference/runtime", "inference/classifier",
             "inference/images", "inference/validate", "inference/handler_base", "checkpoint",
             "errors")}
    assert code | {"handler.py", "config.json", "model.safetensors", "index_to_name.json",
                   "requirements.txt"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))]
    assert not [n for n in names if n.endswith(("pixtok/cli.py", "pixtok/__main__.py"))]
    # the core ships as it is in the repository: no import is rewritten
    assert vit == (ROOT / "pixtok" / "models" / "vit.py").read_bytes()
    # an image model's archive carries its ONNX file by default (the server runs it)
    assert "model.onnx" in names and "model.int8.onnx" not in names
    assert manifest["model"] == {**manifest["model"], "modelName": "tiny-cls",
                                 "handler": "handler.py",
                                 "modelVersion": checkpoint_version(tiny_classifier)}
    assert config == json.loads((tiny_classifier / "config.json").read_text())
    assert weights == (tiny_classifier / "model.safetensors").read_bytes()
    assert labels == {str(i): name for i, name in enumerate(config["labels"])}


# Runs inside the unpacked archive with pixtok's packages unimportable, through TorchServe's
# own Context: one good image and one bad one in the same batch.
ISOLATED = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, os, sys
    BLOCKED = {"training", "serving", "export", "tools"}
    HERE = os.path.realpath(".") + os.sep

    class Block(importlib.abc.MetaPathFinder):
        # the repository is unimportable; `pixtok` only from the archive's own folder
        def find_spec(self, name, path, target=None):
            top = name.split(".")[0]
            if top in BLOCKED:
                raise ImportError(f"{name} must not be imported by an archive")
            if top == "pixtok":
                spec = importlib.machinery.PathFinder.find_spec(name, path or [HERE])
                if spec is None or not os.path.realpath(spec.origin).startswith(HERE):
                    raise ImportError(f"{name} must come from the archive")
                return spec
            return None

    sys.meta_path.insert(0, Block())
    from ts.context import Context, RequestProcessor
    import handler

    context = Context("tiny-cls", ".", None, 2, None, "0.12.0")
    context.request_processor = [RequestProcessor({"Content-Type": "image/png"}),
                                 RequestProcessor({"Content-Type": "image/png"})]
    service = handler.ClassifierHandler()
    service.initialize(context)
    out = service.handle([{"body": open("good.png", "rb").read()}, {"body": b"junk"}], context)
    from pixtok.inference.handler_base import foreign_modules
    leaked = foreign_modules(".")
    print(json.dumps({"answers": [json.loads(o) for o in out], "leaked": leaked,
                      "status": [context.get_response_status(i) for i in range(2)]}))
""")


def test_archive_runs_without_pixtok(tiny_classifier, tmp_path):
    mar = export_archive(tiny_classifier, tmp_path / "store", **QUIET)
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(mar).extractall(unpacked)
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    (unpacked / "good.png").write_bytes(png(image))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", ISOLATED], cwd=unpacked, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    good, bad = result["answers"]
    assert result["status"] == [[200, None], [400, "Bad Request"]]
    assert bad == {"code": 400, "type": "bad_image", "message": bad["message"]}
    # the archive's answer is the in-process answer of the repository's own code
    local = load_classifier(tiny_classifier)
    expected = local.predict([local.preprocess(png(image), "image/png")])[0]
    assert good["index"] == expected["index"] and good["label"] == expected["label"]
    np.testing.assert_allclose([t["score"] for t in good["top_k"]],
                               [t["score"] for t in expected["top_k"]], atol=1e-6)


def test_onnx_matches_torch_with_a_dynamic_batch_axis(tiny_classifier, tmp_path):
    model, config = load_model(tiny_classifier)
    diff = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    assert diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 8, 8]
    assert out.shape[1] == len(config["labels"])
    for n in (1, 3, 17):   # 17 was never seen at export time
        x = torch.rand(n, 1, 8, 8)
        with torch.inference_mode():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {inp.name: x.numpy()})[0], expected,
                                   atol=1e-4)


def test_onnx_flag_puts_the_onnx_beside_and_inside_the_archive(tiny_classifier, tmp_path):
    mar = export_archive(tiny_classifier, tmp_path, name="cls-onnx", onnx=True, **QUIET)
    with zipfile.ZipFile(mar) as z:
        inside = z.read("model.onnx")
        assert "model.safetensors" in z.namelist()     # PyTorch fallback without onnxruntime
    assert inside == (tmp_path / "cls-onnx.onnx").read_bytes()
    # --no-onnx: a PyTorch-only archive, nothing beside it
    mar = export_archive(tiny_classifier, tmp_path, name="cls-torch", onnx=False, **QUIET)
    with zipfile.ZipFile(mar) as z:
        assert "model.onnx" not in z.namelist() and "model.safetensors" in z.namelist()
    assert not (tmp_path / "cls-torch.onnx").exists()


def test_cli_exports_under_the_folder_name(tiny_classifier, tmp_path):
    done = pixtok("export", tiny_classifier, "--out", tmp_path / "store")
    assert (tmp_path / "store" / "tiny-cls.mar").is_file()
    assert "tiny-cls.mar" in done.stdout


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "bad_name"])
def test_cli_errors_are_one_line_and_exit_2(case, tiny_classifier, tmp_path):
    args = {"missing": [str(tmp_path / "nope")],
            "not_a_checkpoint": [str(tmp_path)],
            "bad_name": [str(tiny_classifier), "--name", "../evil"]}[case]
    done = pixtok("export", *args, "--out", tmp_path / "store", check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pixtok export: error: "), done.stderr
    assert ("nope" in lines[0]) if case == "missing" else True
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_unsupported_task_is_a_user_error(tiny_classifier, tmp_path):
    ckpt = tmp_path / "depth"
    ckpt.mkdir()
    config = json.loads((tiny_classifier / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "task": "segment"}))
    with pytest.raises(ExportError, match="'segment' cannot be exported"):
        export_archive(ckpt, tmp_path, **QUIET)


def test_missing_and_stale_archives_are_rebuilt(tiny_classifier, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    ckpt = store / "cls"
    ckpt.mkdir()
    for f in ("config.json", "model.safetensors"):
        (ckpt / f).write_bytes((tiny_classifier / f).read_bytes())
    assert build_missing_archives(store, **QUIET) == [store / "cls.mar"]
    assert build_missing_archives(store, **QUIET) == []          # fresh: nothing to do
    newer = (store / "cls.mar").stat().st_mtime + 10
    os.utime(ckpt / "model.safetensors", (newer, newer))           # retrained since
    assert build_missing_archives(store, **QUIET) == [store / "cls.mar"]


def test_an_archive_of_other_code_is_rebuilt(tiny_classifier, tmp_path):
    """The archive carries its own copy of the handler and core: after the code changes (a pull,
    an edit), `pixtok serve` must not keep serving the old copy. Its recorded digest says."""
    store = tmp_path / "store"
    store.mkdir()
    ckpt = store / "cls"
    shutil.copytree(tiny_classifier, ckpt)
    mar = build_missing_archives(store, **QUIET)[0]
    with zipfile.ZipFile(mar) as z:
        assert z.read(CODE_DIGEST).decode().strip() == code_digest()
        assert "code.sha256" in z.namelist() and "pixtok/inference/handler_base.py" in z.namelist()
    assert not is_stale(ckpt, mar)
    assert is_stale(ckpt, mar, digest="0" * 64)                   # this checkout's code differs
    # an archive from before digests (or another checkout): same files, no digest -> rebuilt
    older = tmp_path / "older.mar"
    with zipfile.ZipFile(mar) as z, zipfile.ZipFile(older, "w") as out:
        for item in z.infolist():
            if item.filename != CODE_DIGEST:
                out.writestr(item, z.read(item.filename))
    os.replace(older, mar)
    os.utime(mar, (time.time() + 10, time.time() + 10))            # newer than the checkpoint
    assert build_missing_archives(store, **QUIET) == [mar]
    assert not is_stale(ckpt, mar)
