"""Checkpoint folder -> a self-contained TorchServe archive NAME.mar (torch-model-archiver).

An archive runs on a stock TorchServe with only torch, numpy, pillow and safetensors installed
(and diffusers for a generator):

    handler.py              serving/handlers/<task>.py
    pixtok_model/           the inference core (serving/*.py) and the model code it needs
                            (training/models/vit.py, training/data/resize.py, ...), copied with
                            their imports of this repository made relative to the package
    config.json             the checkpoint's config: architecture, labels, input size and resize
    index_to_name.json      labels in TorchServe's usual form (classifiers and generators)
    model.safetensors       weights; never a pickle
    model.onnx              with --onnx; the handler prefers it when onnxruntime imports

A generator's archive holds transformer.safetensors and vq_decoder.safetensors instead of
model.safetensors (export/generator.py).
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
                                        "handler_base.py")] + [
    ROOT / "training" / "sampling_defaults.py"]
MODELS, SERVING = ROOT / "training" / "models", ROOT / "serving"
TASKS = {   # task -> the handler, the model code its archive ships, what it needs installed
    "classify": {"handler": SERVING / "handlers" / "classifier.py",
                 "code": [MODELS / "vit.py", ROOT / "training" / "data" / "resize.py"],
                 "requirements": REQUIREMENTS, "onnx_output": "logits"},
    "depth": {"handler": SERVING / "handlers" / "depth.py",
              "code": [MODELS / "vit.py", MODELS / "depth.py",
                       ROOT / "training" / "data" / "resize.py",
                       SERVING / "depth_estimator.py"],
              "requirements": REQUIREMENTS, "onnx_output": "depth"},
    "generate": {"handler": SERVING / "handlers" / "generator.py",
                 "code": [MODELS / "vit.py", MODELS / "dit.py", ROOT / "training" / "pipeline.py",
                          ROOT / "pixtok" / "errors.py", SERVING / "image_generator.py"],
                 "requirements": [*REQUIREMENTS, "diffusers"]},
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# `from training.models.vit import ViT` -> `from .vit import ViT` (any depth, any indentation)
_PROJECT_IMPORT = re.compile(
    r"^(\s*)from (?:pixtok|training|serving|export)(?:\.\w+)*\.(\w+) import ", re.M)
_RELATIVE_IMPORT = re.compile(r"^\s*from \.(\w+) import ", re.M)
_ANY_PROJECT_IMPORT = re.compile(r"^\s*(?:from|import) (?:pixtok|training|serving|export)\b",
                                 re.M)


class ExportError(UserError):
    """A checkpoint that cannot be exported, or an archive that could not be built."""


def check_input_spec(config: dict, ckpt: Path) -> None:
    """config["input"]: image_size [H, W] the model's own, channels 1 or 3, a known resize."""
    spec, args = config.get("input", {}), config.get("model", {}).get("args", {})
    size = spec.get("image_size")
    if not (isinstance(size, list) and len(size) == 2) or spec.get("channels") not in (1, 3):
        raise ExportError(f"{ckpt}/config.json: 'input' needs image_size [H, W] and channels 1 "
                          f"or 3, got {spec}")
    if spec.get("resize", "bicubic") not in ("bicubic", "nearest"):
        raise ExportError(f"{ckpt}/config.json: resize must be bicubic or nearest, not "
                          f"{spec.get('resize')!r}")
    for key, want in (("image_size", size), ("in_channels", spec["channels"])):
        if key in args and args[key] != want:
            raise ExportError(f"{ckpt}/config.json: the input is {want} but the model's "
                              f"{key} is {args[key]}")


def check_classifier_config(config: dict, ckpt: Path) -> None:
    model, labels = config.get("model", {}), config.get("labels")
    if model.get("arch") != "vit":
        raise ExportError(f"{ckpt}: a classifier must be a 'vit', not {model.get('arch')!r}")
    if not isinstance(labels, list) or not labels:
        raise ExportError(f"{ckpt}/config.json: 'labels' must be a non-empty list of class names")
    if model.get("args", {}).get("num_classes") != len(labels):
        raise ExportError(f"{ckpt}/config.json: {len(labels)} labels but the model has "
                          f"{model.get('args', {}).get('num_classes')} classes")
    check_input_spec(config, ckpt)


def check_depth_config(config: dict, ckpt: Path) -> None:
    arch = config.get("model", {}).get("arch")
    if arch != "vit-depth":
        raise ExportError(f"{ckpt}: a depth model must be a 'vit-depth', not {arch!r}")
    check_input_spec(config, ckpt)


CHECKS = {"classify": check_classifier_config, "depth": check_depth_config}


def copy_module(src: Path, package: Path) -> None:
    """Copy a module into the archive's package with its imports of this repository rewritten
    to the package's own copies (`from training.models.vit import` -> `from .vit import`)."""
    (package / src.name).write_text(_PROJECT_IMPORT.sub(r"\1from .\2 import ", src.read_text()))


def check_self_contained(package: Path) -> None:
    """Every relative import in the package names a module it ships, and nothing imports the
    repository: a packaging mistake fails the export, not a user's server."""
    shipped = {p.stem for p in package.glob("*.py")}
    for module in package.glob("*.py"):
        text = module.read_text()
        missing = sorted(set(_RELATIVE_IMPORT.findall(text)) - shipped)
        outside = [line.strip() for line in _ANY_PROJECT_IMPORT.findall(text)]
        if missing or outside:
            raise ExportError(f"archive module {module.name} imports code the archive does not "
                              f"ship: {', '.join(missing + outside)}")


def stage_code(task: dict, files: Path) -> None:
    """The pixtok_model package: the inference core and the task's model code."""
    package = files / "pixtok_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""pixtok model code shipped inside a TorchServe '
                                         'archive."""\n')
    sources = CORE + task["code"]
    if len({s.name for s in sources}) != len(sources):
        raise ExportError(f"two modules of one archive share a file name: {sources}")
    for src in sources:
        copy_module(src, package)
    check_self_contained(package)


def write_index_to_name(labels: list[str], files: Path) -> None:
    index_to_name = {str(i): label for i, label in enumerate(labels)}
    (files / "index_to_name.json").write_text(json.dumps(index_to_name, indent=1) + "\n")


def stage_files(ckpt: Path, config: dict, files: Path) -> None:
    """A checkpoint's config, weights and labels into files/ (the archive's root)."""
    shutil.copy2(ckpt / "config.json", files / "config.json")
    shutil.copy2(ckpt / "model.safetensors", files / "model.safetensors")
    if config.get("labels"):
        write_index_to_name(config["labels"], files)


def run_archiver(name: str, handler: Path, files: Path, stage: Path,
                 requirements_list: list[str] = REQUIREMENTS) -> Path:
    """torch-model-archiver in a subprocess, its temp files kept inside stage -> the .mar."""
    requirements = stage / "requirements.txt"
    requirements.write_text("\n".join(requirements_list) + "\n")
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


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ExportError(f"model name {name!r}: use letters, digits, '_', '-' and '.', "
                          "starting with a letter or digit")
    return name


def export_archive(ckpt, out="model_store", name: str | None = None, onnx: bool = False,
                   log=print) -> Path:
    """Build out/NAME.mar (and out/NAME.onnx with onnx=True) from a checkpoint folder, or from a
    generator's diffusers pipeline folder (model_index.json)."""
    from export.generator import is_pipeline_folder, read_pipeline, stage_generator

    ckpt, out = Path(ckpt), Path(out)
    name = check_name(name or ckpt.resolve().name)
    pipeline = model = config = None
    if is_pipeline_folder(ckpt):
        if onnx:
            raise ExportError(f"{ckpt}: --onnx is for image models; a generator's archive runs "
                              "PyTorch")
        task, pipeline = TASKS["generate"], read_pipeline(ckpt)
    else:
        config = read_config(ckpt)
        if config.get("task") not in CHECKS:
            raise ExportError(f"{ckpt}: task {config.get('task')!r} cannot be exported yet; "
                              f"supported: {', '.join(CHECKS)} and generator pipeline folders")
        task = TASKS[config["task"]]
        CHECKS[config["task"]](config, ckpt)
        try:
            model, _ = load_model(ckpt)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ExportError(f"{ckpt}: the weights do not fit the configured model "
                              f"({e})") from None
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pixtok-export-") as tmp:
        stage = Path(tmp)
        stage_code(task, stage / "files")
        if pipeline is not None:
            stage_generator(pipeline, stage / "files")
        else:
            stage_files(ckpt, config, stage / "files")
        if onnx:
            from export.onnx import export_onnx

            spec = config["input"]
            shape = (spec["channels"], *spec["image_size"])
            diff = export_onnx(model, shape, out / f"{name}.onnx",
                               output_name=task["onnx_output"])
            log(f"onnx: {out / f'{name}.onnx'} (onnxruntime vs torch: {diff:.2e})")
            shutil.copy2(out / f"{name}.onnx", stage / "files" / "model.onnx")
        handler = stage / "handler.py"
        shutil.copy2(task["handler"], handler)
        mar = run_archiver(name, handler, stage / "files", stage, task["requirements"])
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
    """True when the archive is missing or older than any file of its checkpoint (a pipeline
    folder's weights are in its subfolders)."""
    if not mar.is_file():
        return True
    newest = max((f.stat().st_mtime for f in ckpt.rglob("*") if f.is_file()), default=0.0)
    return newest > mar.stat().st_mtime


def is_model_folder(path: Path) -> bool:
    """A checkpoint or pipeline folder; a folder that cannot be read counts, so that building
    it fails with the reason."""
    from export.generator import is_pipeline_folder

    try:
        return (path / "config.json").is_file() or is_pipeline_folder(path)
    except PermissionError:
        return path.is_dir()


def build_missing_archives(store, log=print, broken: dict | None = None) -> list[Path]:
    """(Re)build NAME.mar for every checkpoint or pipeline folder in the model store that lacks
    a fresh one. With `broken` (a dict), a folder that cannot be built is noted there as
    {folder name: one-line reason} and the others are still built; without, the error is raised."""
    from export.generator import is_pipeline_folder

    store = Path(store)
    built = []
    for ckpt in sorted(p for p in store.iterdir() if is_model_folder(p)):
        mar = store / f"{ckpt.name}.mar"
        try:
            if not is_stale(ckpt, mar):
                continue
            if not is_pipeline_folder(ckpt):
                task = read_config(ckpt).get("task")
                if task not in CHECKS:
                    log(f"skipping {ckpt.name}: task {task!r} has no exporter yet")
                    continue
            log(f"building {mar.name} from {ckpt}")
            # keep an image model's ONNX flavour
            onnx = not is_pipeline_folder(ckpt) and (store / f"{ckpt.name}.onnx").is_file()
            built.append(export_archive(ckpt, store, ckpt.name, onnx=onnx, log=log))
        except (UserError, OSError) as e:
            if broken is None:
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            broken[ckpt.name] = f"{ckpt}: {reason}" if isinstance(e, OSError) else reason
    return built
