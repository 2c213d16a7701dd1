"""Checkpoint folder -> a self-contained TorchServe archive NAME.mar (torch-model-archiver).

An archive runs on a stock TorchServe with only torch, numpy, pillow and safetensors installed
(and diffusers for a generator):

    handler.py              serving/handlers/<task>.py
    pixtok/                 the core package as it is in the repository (models, resize, pipeline,
                            sampling defaults, checkpoint format, the inference core), less the
                            command-line modules; the handler puts the archive's folder first on
                            sys.path, so the archive's copy is the one that runs
    config.json             the checkpoint's config: architecture, labels, input size and resize
    index_to_name.json      labels in TorchServe's usual form (classifiers and generators)
    model.safetensors       weights; never a pickle
    model.onnx              classifiers and depth models, unless --no-onnx (or the ONNX tools
                            are not installed): the handler runs it when onnxruntime imports
    model.int8.onnx         with --quantize int8, once it passed its check against model.onnx
    quantization.json       that check's record (export/quantize.py)
    code.sha256             the digest of the handlers and the core as they were staged: an
                            archive of older code is stale (rebuilt by `pixtok serve`)

A generator's archive holds transformer.safetensors and vq_decoder.safetensors instead of
model.safetensors (export/generator.py).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from export.common import ExportError, write_index_to_name
from export.generator import is_pipeline_folder, read_pipeline, stage_generator
from pixtok.checkpoint import load_model, read_config
from pixtok.errors import UserError
from pixtok.tasks import TASKS, TaskInfo

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "pixtok"
CLI_ONLY = ("cli.py", "__main__.py")    # the core's top: not needed to serve
REQUIREMENTS = ["torch", "numpy", "pillow", "safetensors"]
HANDLERS = ROOT / "serving" / "handlers"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REPOSITORY_PACKAGES = ("training", "serving", "export", "tools")
CODE_DIGEST = "code.sha256"    # at an archive's root: code_digest() of the code it carries


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


def export_checks() -> dict:
    """{task: the check of its checkpoint's config.json} for every task whose registry row
    (pixtok/tasks.py) names an export check: the tasks export builds from a checkpoint folder."""
    checks = {}
    for name, task in TASKS.items():
        if task.export_check:
            module, function = task.export_check.split(":")
            checks[name] = getattr(importlib.import_module(module), function)
    return checks


def handler_path(task: TaskInfo) -> Path:
    return HANDLERS / f"{task.handler}.py"


def requirements(task: TaskInfo) -> list[str]:
    """What the archive needs installed: a generator's pipeline also needs diffusers."""
    return [*REQUIREMENTS, "diffusers"] if task.pipeline else REQUIREMENTS


def imported_modules(module: Path, root: Path) -> list[str]:
    """The absolute names of the modules a file under `root` imports (relative ones resolved)."""
    package = list(module.relative_to(root).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.append(".".join(package[:len(package) - node.level + 1]
                                  + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def check_self_contained(stage: Path) -> None:
    """Every `pixtok` module that the handler and the shipped package import is shipped, and
    nothing imports the rest of the repository: a packaging mistake fails the export, not a
    user's server."""
    files = stage / "files"
    for module, root in [(stage / "handler.py", stage),
                         *((m, files) for m in sorted((files / "pixtok").rglob("*.py")))]:
        for name in imported_modules(module, root):
            top = name.split(".")[0]
            path = files.joinpath(*name.split("."))
            shipped = path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
            if top in REPOSITORY_PACKAGES or (top == "pixtok" and not shipped):
                raise ExportError(f"archive module {module.relative_to(root)} imports {name}, "
                                  "which the archive does not ship")


SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", *CLI_ONLY)   # not staged


def shipped_code() -> list[Path]:
    """Every file an archive may carry as code: the handlers and the staged core package."""
    def walk(folder: Path) -> list[Path]:
        names = sorted(os.listdir(folder))
        kept = [folder / n for n in names if n not in SKIPPED(str(folder), names)]
        return [f for p in kept for f in (walk(p) if p.is_dir() else [p])]

    return sorted(HANDLERS.glob("*.py")) + walk(CORE)


def code_digest() -> str:
    """sha256 over the names and bytes of shipped_code(): an archive records it, and an archive
    whose digest differs from this checkout's carries other code."""
    digest = hashlib.sha256()
    for f in shipped_code():
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def stage_code(handler: Path, stage: Path) -> None:
    """handler.py and the core package, both copied as they are, and their digest."""
    shutil.copytree(CORE, stage / "files" / "pixtok", ignore=SKIPPED)
    shutil.copy2(handler, stage / "handler.py")
    (stage / "files" / CODE_DIGEST).write_text(code_digest() + "\n")
    check_self_contained(stage)


def stage_files(ckpt: Path, config: dict, files: Path) -> None:
    """A checkpoint's config, weights and labels into files/ (the archive's root)."""
    shutil.copy2(ckpt / "config.json", files / "config.json")
    shutil.copy2(ckpt / "model.safetensors", files / "model.safetensors")
    if config.get("labels"):
        write_index_to_name(config["labels"], files)


def checkpoint_version(ckpt) -> str:
    """The model version an archive carries (TorchServe's modelVersion): when the checkpoint was
    made and from which commit, as its config.json says: 2026-11-26T170450Z.db72a85 (-dirty when
    the tree had changes). Without a date, its newest file's time; without a commit, no suffix."""
    ckpt, config = Path(ckpt), {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        config = json.loads((ckpt / "config.json").read_text())
    try:
        when = datetime.fromisoformat(config["created"]).astimezone(UTC)
    except (KeyError, TypeError, ValueError):
        newest = max((f.stat().st_mtime for f in ckpt.rglob("*") if f.is_file()), default=0.0)
        when = datetime.fromtimestamp(newest, UTC)
    version = when.strftime("%Y-%m-%dT%H%M%SZ")
    commit = config.get("git_commit")
    if isinstance(commit, str) and commit:
        dirty = commit.endswith("-dirty")
        version += f".{commit.removesuffix('-dirty')[:7]}{'-dirty' if dirty else ''}"
    return version


def run_archiver(name: str, handler: Path, files: Path, stage: Path,
                 requirements_list: list[str] = REQUIREMENTS, version: str = "1.0") -> Path:
    """torch-model-archiver in a subprocess, its temp files kept inside stage -> the .mar."""
    requirements = stage / "requirements.txt"
    requirements.write_text("\n".join(requirements_list) + "\n")
    (stage / "tmp").mkdir()
    (stage / "out").mkdir()
    cmd = [sys.executable, "-c",
           "from model_archiver.model_packaging import generate_model_archive as g; g()",
           "--model-name", name, "--version", version, "--handler", str(handler),
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


def onnx_tools_available() -> bool:
    """The ONNX exporter (onnxscript) and ONNX Runtime, which checks what it wrote, import."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxscript", "onnxruntime"))


def read_source(ckpt: Path, onnx: bool | None,
                quantize: str | None = None) -> tuple[TaskInfo, dict | None, object]:
    """(task, config.json or None, the loaded model or the pipeline) of what is exported."""
    if is_pipeline_folder(ckpt):
        if onnx or quantize:
            raise ExportError(f"{ckpt}: --onnx and --quantize are for image models; a "
                              "generator's archive runs PyTorch")
        return TASKS["dit"], None, read_pipeline(ckpt)
    config = read_config(ckpt)
    checks = export_checks()
    if config.get("task") not in checks:
        raise ExportError(f"{ckpt}: task {config.get('task')!r} cannot be exported yet; "
                          f"supported: {', '.join(checks)} and generator pipeline folders")
    checks[config["task"]](config, ckpt)
    try:
        model, _ = load_model(ckpt)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ExportError(f"{ckpt}: the weights do not fit the configured model ({e})") from None
    return TASKS[config["task"]], config, model


def stage_bar(name: str, stages: int, show: bool):
    """A bar on stderr over an export's stages, or None. Its description says the stage."""
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=stages, desc=f"export {name}", unit="stage", dynamic_ncols=True,
                file=sys.stderr, bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| "
                "{elapsed}")


def onnx_plan(config: dict | None, onnx: bool | None, quantize: str | None) -> tuple[bool, bool]:
    """(put model.onnx in the archive, write NAME.onnx beside it) for export_archive's `onnx`:
    None (the default) puts it in for an image model where the ONNX tools are installed;
    True also writes it beside (--onnx); False leaves it out (--no-onnx)."""
    from export.quantize import SCHEMES

    if quantize is not None and quantize not in SCHEMES:
        raise ExportError(f"--quantize {quantize!r}: expected one of {', '.join(SCHEMES)}")
    if config is None:
        return False, False
    if onnx is False and quantize:
        raise ExportError("--quantize needs the ONNX file; drop --no-onnx")
    inside = onnx_tools_available() if onnx is None and not quantize else bool(onnx or quantize)
    return inside, bool(onnx)


def export_archive(ckpt, out="model_store", name: str | None = None, onnx: bool | None = None,
                   log=print, version: str | None = None, progress: bool = False,
                   quantize: str | None = None, held_out=None) -> Path:
    """Build out/NAME.mar from a checkpoint folder, or from a generator's diffusers pipeline
    folder (model_index.json). An image model's archive carries model.onnx unless onnx=False
    (onnx=True also writes out/NAME.onnx); quantize="int8" adds model.int8.onnx once it passed
    its check on held_out(config) -> (images, targets, description) (export/quantize.py). The
    archive's model version is the checkpoint's own (checkpoint_version) unless `version` says
    otherwise. progress: a bar on stderr names each stage as it starts (`pixtok export`)."""
    ckpt, out = Path(ckpt), Path(out)
    name = check_name(name or ckpt.resolve().name)
    task, config, source = read_source(ckpt, onnx, quantize)
    inside, beside = onnx_plan(config, onnx, quantize)
    if quantize and held_out is None:
        raise ExportError("--quantize needs held-out data to check against (pixtok export "
                          "passes the checkpoint's test split)")
    # the held-out sample is read before any stage runs: a checkpoint it cannot be read for is
    # refused at once, its error the one line on stderr
    plan = OnnxPlan(inside, beside, quantize, held_out(config) if quantize else None)
    out.mkdir(parents=True, exist_ok=True)
    bar = stage_bar(name, 3 + inside + bool(quantize), progress)

    def stage_done(next_stage: str | None = None):
        if bar is not None:
            bar.update(1)
            if next_stage:
                bar.set_description(f"export {name}: {next_stage}")

    if bar is not None:
        bar.set_description(f"export {name}: staging the code")
    try:
        version = write_archive(ckpt, out, name, task, config, source, plan, version, log,
                                stage_done)
    except BaseException:
        if bar is not None:     # cleared: a failed export's error stays the one stderr line
            bar.leave = False
            bar.close()
        raise
    if bar is not None:
        bar.close()
    log(f"archive: {out / f'{name}.mar'} (version {version})")
    return out / f"{name}.mar"


@dataclass(frozen=True)
class OnnxPlan:
    inside: bool                  # model.onnx in the archive
    beside: bool                  # NAME.onnx next to it too (--onnx)
    quantize: str | None          # "int8": model.int8.onnx, checked
    held_out: tuple | None        # (images, targets, description): the int8 check's sample


def stage_onnx(name: str, out: Path, task: TaskInfo, config: dict, model, plan: OnnxPlan,
               files: Path, log, stage_done) -> None:
    """model.onnx (checked against PyTorch) into the archive's files, NAME.onnx beside it with
    --onnx, and with --quantize the int8 file once it passed its check."""
    from export.onnx import export_onnx

    spec = config["input"]
    diff = export_onnx(model, (spec["channels"], *spec["image_size"]), files / "model.onnx",
                       output_name=task.onnx_output)
    log(f"onnx: {name} (onnxruntime vs torch: {diff:.2e})")
    if plan.beside:
        shutil.copy2(files / "model.onnx", out / f"{name}.onnx")
        log(f"onnx: {out / f'{name}.onnx'}")
    stage_done("int8 quantization and check" if plan.quantize else "writing the archive")
    if plan.quantize:
        from export.quantize import INT8_FILE, check_int8, quantize_int8, write_record

        quantize_int8(files / "model.onnx", files / INT8_FILE)
        images, targets, source = plan.held_out
        record = check_int8(task.name, files / "model.onnx", files / INT8_FILE,
                            (images, targets), source)
        write_record(record, files)
        log(f"int8: {record['metric']} {record['value']:.4f} on {source} (passed)")
        stage_done("writing the archive")


def write_archive(ckpt: Path, out: Path, name: str, task: TaskInfo, config: dict | None,
                  source, plan: OnnxPlan, version: str | None, log, stage_done) -> str:
    """export_archive's stages: stage the code and the files, ONNX (and int8) per plan, the .mar
    into out; stage_done(next stage) after each. -> the archive's version."""
    with tempfile.TemporaryDirectory(prefix="pixtok-export-") as tmp:
        stage = Path(tmp)
        stage_code(handler_path(task), stage)
        stage_done("staging the weights")
        if config is None:
            stage_generator(source, stage / "files")
        else:
            stage_files(ckpt, config, stage / "files")
        stage_done("ONNX export and check" if plan.inside else "writing the archive")
        if plan.inside:
            stage_onnx(name, out, task, config, source, plan, stage / "files", log, stage_done)
        version = version or checkpoint_version(ckpt)
        mar = run_archiver(name, stage / "handler.py", stage / "files", stage,
                           requirements(task), version)
        os.replace(mar, out / f"{name}.mar")     # TorchServe never sees a half-written archive
        stage_done("done")
    return version


def archived_quantization(mar: Path) -> str | None:
    """The scheme of the quantized file an archive carries ("int8"), or None."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("quantization.json")).get("scheme")
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, AttributeError):
        return None


def archived_digest(mar: Path) -> str | None:
    """The code digest an archive recorded; None for an archive from before digests, or one
    that cannot be read as a zip."""
    try:
        with zipfile.ZipFile(mar) as z:
            return z.read(CODE_DIGEST).decode().strip()
    except (KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        return None


def is_stale(ckpt: Path, mar: Path, digest: str | None = None) -> bool:
    """True when the archive is missing, older than any file of its checkpoint (a pipeline
    folder's weights are in its subfolders), or carries other code than this checkout's (digest:
    code_digest(), computed once by the caller)."""
    if not mar.is_file():
        return True
    newest = max((f.stat().st_mtime for f in ckpt.rglob("*") if f.is_file()), default=0.0)
    return newest > mar.stat().st_mtime or archived_digest(mar) != (digest or code_digest())


def is_model_folder(path: Path) -> bool:
    """A checkpoint or pipeline folder; a folder that cannot be read counts, so that building
    it fails with the reason."""
    try:
        return (path / "config.json").is_file() or is_pipeline_folder(path)
    except PermissionError:
        return path.is_dir()


def build_missing_archives(store, log=print, broken: dict | None = None,
                           held_out=None) -> list[Path]:
    """(Re)build NAME.mar for every checkpoint or pipeline folder in the model store that lacks
    a fresh one: an image model's archive carries its ONNX file (where the ONNX tools are
    installed), and an int8 archive is rebuilt as int8, checked again on held_out. With
    `broken` (a dict), a folder that cannot be built is noted there as {folder name: one-line
    reason} and the others are still built; without, the error is raised."""

    store = Path(store)
    built = []
    folders = sorted(p for p in store.iterdir() if is_model_folder(p))
    stale, digest = [], code_digest()
    for ckpt in folders:
        try:
            if is_stale(ckpt, store / f"{ckpt.name}.mar", digest):
                stale.append(ckpt)
        except OSError:
            stale.append(ckpt)    # unreadable: building it below says why
    bar = archives_bar(len(stale))
    try:
        build_each(store, stale, log, broken, bar, built, held_out)
    except BaseException:
        if bar is not None:     # cleared: the error stays the one stderr line
            bar.leave = False
            bar.close()
        raise
    if bar is not None:
        bar.close()
    return built


def build_each(store: Path, stale: list[Path], log, broken: dict | None, bar,
               built: list[Path], held_out=None) -> None:
    """build_missing_archives' loop: each stale folder's archive, appended to `built`."""
    for ckpt in stale:
        mar = store / f"{ckpt.name}.mar"
        if bar is not None:
            bar.set_description(f"building archives: {mar.name}")
        try:
            if not is_pipeline_folder(ckpt):
                task = read_config(ckpt).get("task")
                if task not in export_checks():
                    log(f"skipping {ckpt.name}: task {task!r} has no exporter yet")
                    continue
            log(f"building {mar.name} from {ckpt}")
            # an image model: ONNX by default, kept beside where it was; int8 stays int8
            image = not is_pipeline_folder(ckpt)
            beside = image and (store / f"{ckpt.name}.onnx").is_file()
            quantize = archived_quantization(mar) if image and mar.is_file() else None
            built.append(export_archive(ckpt, store, ckpt.name, onnx=True if beside else None,
                                        log=log, quantize=quantize, held_out=held_out))
        except (UserError, OSError) as e:
            if broken is None:
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            broken[ckpt.name] = f"{ckpt}: {reason}" if isinstance(e, OSError) else reason
        finally:
            if bar is not None:
                bar.update(1)


def archives_bar(count: int):
    """A bar on stderr over the archives a build will make (`pixtok serve`, `pixtok export
    STORE`); none when nothing is to be built. TQDM_DISABLE=1 turns it off."""
    if not count:
        return None
    from tqdm import tqdm

    return tqdm(total=count, desc="building archives", unit="archive", dynamic_ncols=True,
                file=sys.stderr)
