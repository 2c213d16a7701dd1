"""Checkpoint folder -> a self-contained TorchServe archive NAME.mar (torch-model-archiver).

An archive runs on a stock TorchServe with only torch, numpy, pillow and safetensors installed:

    handler.py              serving/handlers/<task>.py
    pixtok_model/           the inference core (serving/*.py) and the model code it needs
                            (training/models/vit.py, training/data/resize.py), copied verbatim
    config.json             the checkpoint's config: architecture, labels, input size and resize
    index_to_name.json      labels in TorchServe's usual form
    model.safetensors       weights; never a pickle
    model.onnx              with --onnx; the handler prefers it when onnxruntime imports
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pixtok.errors import UserError
from training.checkpoint import load_model, read_config

ROOT = Path(__file__).resolve().parents[1]
VERSION = "1.0"    # the model version TorchServe registers; config.properties refers to it
REQUIREMENTS = ["torch", "numpy", "pillow", "safetensors"]
CORE = [ROOT / "serving" / f for f in ("validate.py", "images.py", "inference.py",
                                        "handler_base.py")]
TASKS = {   # task -> the handler and the model code its archive ships
    "classify": {"handler": ROOT / "serving" / "handlers" / "classifier.py",
                 "code": [ROOT / "training" / "models" / "vit.py",
                          ROOT / "training" / "data" / "resize.py"]},
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExportError(UserError):
    """A checkpoint that cannot be exported, or an archive that could not be built."""


def check_classifier_config(config: dict, ckpt: Path) -> None:
    model, spec, labels = config.get("model", {}), config.get("input", {}), config.get("labels")
    if model.get("arch") != "vit":
        raise ExportError(f"{ckpt}: a classifier must be a 'vit', not {model.get('arch')!r}")
    if not isinstance(labels, list) or not labels:
        raise ExportError(f"{ckpt}/config.json: 'labels' must be a non-empty list of class names")
    if model.get("args", {}).get("num_classes") != len(labels):
        raise ExportError(f"{ckpt}/config.json: {len(labels)} labels but the model has "
                          f"{model.get('args', {}).get('num_classes')} classes")
    size = spec.get("image_size")
    if not (isinstance(size, list) and len(size) == 2) or spec.get("channels") not in (1, 3):
        raise ExportError(f"{ckpt}/config.json: 'input' needs image_size [H, W] and channels 1 "
                          f"or 3, got {spec}")
    if spec.get("resize", "bicubic") not in ("bicubic", "nearest"):
        raise ExportError(f"{ckpt}/config.json: resize must be bicubic or nearest, not "
                          f"{spec.get('resize')!r}")


def stage_files(ckpt: Path, config: dict, task: dict, files: Path) -> None:
    """Lay out everything but the handler in files/ (its contents become the archive's root)."""
    package = files / "pixtok_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""pixtok model code shipped inside a TorchServe '
                                         'archive."""\n')
    for src in CORE + task["code"]:
        shutil.copy2(src, package / src.name)
    shutil.copy2(ckpt / "config.json", files / "config.json")
    shutil.copy2(ckpt / "model.safetensors", files / "model.safetensors")
    index_to_name = {str(i): label for i, label in enumerate(config["labels"])}
    (files / "index_to_name.json").write_text(json.dumps(index_to_name, indent=1) + "\n")


def run_archiver(name: str, handler: Path, files: Path, stage: Path) -> Path:
    """torch-model-archiver in a subprocess, its temp files kept inside stage -> the .mar."""
    requirements = stage / "requirements.txt"
    requirements.write_text("\n".join(REQUIREMENTS) + "\n")
    (stage / "tmp").mkdir()
    (stage / "out").mkdir()
    cmd = [sys.executable, "-c",
           "from model_archiver.model_packaging import generate_model_archive as g; g()",
           "--model-name", name, "--version", VERSION, "--handler", str(handler),
           "--extra-files", str(files), "--requirements-file", str(requirements),
           "--export-path", str(stage / "out"), "--force"]
    # the archiver copies into $TMPDIR/<name>, shared by every export of that name on the host
    env = {**os.environ, "TMPDIR": str(stage / "tmp")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        if "No module named 'model_archiver'" in done.stderr:
            detail = ["torch-model-archiver is not installed (pip install "
                      "torch-model-archiver==0.12.0)"]
        raise ExportError(f"torch-model-archiver failed for {name}: {detail[0]}")
    return stage / "out" / f"{name}.mar"


def export_archive(ckpt, out="model_store", name: str | None = None, onnx: bool = False,
                   log=print) -> Path:
    """Build out/NAME.mar (and out/NAME.onnx with onnx=True) from a checkpoint folder."""
    ckpt, out = Path(ckpt), Path(out)
    config = read_config(ckpt)
    task = TASKS.get(config.get("task"))
    if task is None:
        raise ExportError(f"{ckpt}: task {config.get('task')!r} cannot be exported yet; "
                          f"supported: {', '.join(TASKS)}")
    check_classifier_config(config, ckpt)
    name = name or ckpt.resolve().name
    if not _NAME.match(name):
        raise ExportError(f"model name {name!r}: use letters, digits, '_', '-' and '.', "
                          "starting with a letter or digit")
    try:
        model, _ = load_model(ckpt)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ExportError(f"{ckpt}: the weights do not fit the configured model ({e})") from None
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pixtok-export-") as tmp:
        stage = Path(tmp)
        stage_files(ckpt, config, task, stage / "files")
        if onnx:
            from export.onnx import export_onnx

            spec = config["input"]
            shape = (spec["channels"], *spec["image_size"])
            diff = export_onnx(model, shape, out / f"{name}.onnx")
            log(f"onnx: {out / f'{name}.onnx'} (max |onnxruntime - torch| = {diff:.2e})")
            shutil.copy2(out / f"{name}.onnx", stage / "files" / "model.onnx")
        handler = stage / "handler.py"
        shutil.copy2(task["handler"], handler)
        mar = run_archiver(name, handler, stage / "files", stage)
        os.replace(mar, out / f"{name}.mar")     # TorchServe never sees a half-written archive
    log(f"archive: {out / f'{name}.mar'}")
    return out / f"{name}.mar"


def read_archive_json(mar, member: str) -> dict | None:
    """A JSON file inside a .mar (config.json, MAR-INF/MANIFEST.json), or None if it has none."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read(member))
    except (KeyError, OSError, zipfile.BadZipFile, json.JSONDecodeError):
        return None


def is_stale(ckpt: Path, mar: Path) -> bool:
    """True when the archive is missing or older than any file of its checkpoint."""
    if not mar.is_file():
        return True
    newest = max((f.stat().st_mtime for f in ckpt.iterdir() if f.is_file()), default=0.0)
    return newest > mar.stat().st_mtime


def build_missing_archives(store, log=print) -> list[Path]:
    """(Re)build NAME.mar for every checkpoint folder in the model store that lacks a fresh one."""
    store = Path(store)
    built = []
    for ckpt in sorted(p for p in store.iterdir() if (p / "config.json").is_file()):
        mar = store / f"{ckpt.name}.mar"
        if not is_stale(ckpt, mar):
            continue
        task = read_config(ckpt).get("task")
        if task not in TASKS:
            log(f"skipping {ckpt.name}: task {task!r} has no exporter yet")
            continue
        log(f"building {mar.name} from {ckpt}")
        onnx = (store / f"{ckpt.name}.onnx").is_file()     # keep an archive's ONNX flavour
        built.append(export_archive(ckpt, store, ckpt.name, onnx=onnx, log=log))
    return built
