"""The model store `pixtok serve` serves: which archives it holds, which of them are damaged,
and whether the run folder has room for them unpacked."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import zipfile
from pathlib import Path

from pixtok.archive import read_archive_json
from serving.run_folder import ROOT, ServeError

LOG_ROOM = 16 * 2**20      # bytes a start's logs and pid files need in the run folder


def model_store_path(model_store=None) -> Path:
    """The model store: the argument, $PIXTOK_MODEL_STORE, or the repository's model_store/."""
    store = Path(model_store or os.environ.get("PIXTOK_MODEL_STORE") or ROOT / "model_store")
    return store.expanduser().resolve()


def collect_models(store: Path, broken: dict | None = None) -> dict[str, tuple[str, str, str]]:
    """{model name: (archive, version, task)} for the archives in the store.

    TorchServe names a model by the archive's manifest, not by its file name. A damaged model
    (an archive that cannot be read, or one `broken` already names: its checkpoint folder could
    not be built) is left out and noted in `broken` as {name: one-line reason}; the others are
    served."""
    broken = {} if broken is None else broken
    models = {}
    for mar in sorted(store.glob("*.mar")):
        if mar.stem in broken:      # its folder is damaged: an older archive is not served
            continue
        manifest = read_archive_json(mar, "MAR-INF/MANIFEST.json")
        if manifest is None:
            why = cannot_open(mar) or ("not a readable TorchServe archive (damaged or cut "
                                       "short: no MAR-INF/MANIFEST.json)")
            broken[mar.stem] = f"{mar}: {why}"
            continue
        name = manifest.get("model", {}).get("modelName", mar.stem)
        version = manifest.get("model", {}).get("modelVersion", "1.0")
        if name in models:
            raise ServeError(f"{mar.name} and {models[name][0]} both hold a model named {name!r}")
        task = (read_archive_json(mar, "config.json") or {}).get("task", "classify")
        models[name] = (mar.name, version, task)
    return models


def cannot_open(path: Path) -> str | None:
    """Why a file cannot be opened for reading (no permission, say), or None if it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"


def servable_models(store: Path, build=None, log=print) -> tuple[dict, dict[str, str]]:
    """(the store's models that can be served, {damaged model: why}); build: as for start().
    Each damaged model is named in a line on stderr; a store with none to serve is an error."""
    broken: dict[str, str] = {}
    if build is not None:
        build(store, log=log, broken=broken)
    models = collect_models(store, broken)
    say_damaged(broken)
    if not models:
        if broken:
            raise nothing_servable(store, broken)
        raise ServeError(f"no models in {store}: add checkpoint folders or .mar archives "
                         f"(pixtok export CKPT --out {store})")
    return models, broken


def say_damaged(broken: dict[str, str]) -> None:
    for why in broken.values():
        print(f"pixtok serve: not serving a damaged model: {why}", file=sys.stderr, flush=True)


def nothing_servable(store: Path, broken: dict[str, str]) -> ServeError:
    return ServeError(f"no model in {store} can be served: {len(broken)} damaged "
                      f"({', '.join(sorted(broken))}); see the lines above")


def unpacked_size(store: Path, models: dict) -> int:
    """Bytes the server unpacks the models' archives into (the run folder's tmp/)."""
    total = 0
    for mar, _, _ in models.values():
        with contextlib.suppress(OSError, zipfile.BadZipFile), zipfile.ZipFile(store / mar) as z:
            total += sum(info.file_size for info in z.infolist())
    return total


def check_room(run_dir: Path, store: Path, models: dict) -> None:
    """ServeError, in one line, unless the run folder's disk has room for the unpacked archives
    and the logs: a full disk is refused before any server starts, not found out by a worker."""
    need = unpacked_size(store, models) + LOG_ROOM
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ServeError(f"the run folder {run_dir} has {free / 2**20:.1f} MB free; the server "
                         f"needs about {need / 2**20:.0f} MB there (unpacked archives and logs): "
                         "free some space or set PIXTOK_RUN_DIR to a folder on another disk")
