"""The Gradio page's settings, read by the page (serving/gradio_app.py) and by what starts it
(serving/page_start.py), so neither imports the other: its port, its models, its login, its
concurrency, how long it waits for an answer, and where its example inputs are.

A page that listens beyond loopback (--host other than 127.0.0.1, ::1, localhost) asks for a
login: user `pixtok`, password $PIXTOK_UI_PASSWORD or the run folder's ui_password file (mode
0600), which `pixtok serve` writes with a fresh password at each start.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
from pathlib import Path

from pixtok.archive import read_archive_json
from pixtok.errors import UserError
from pixtok.tasks import served_tasks
from serving.client import DEFAULT_MODELS, read_properties

SERVED = served_tasks()      # the task registry's served tasks, by the name the page uses
MODEL_ENV = {name: t.serving.model_env for name, t in SERVED.items()}
UI_MODEL_FLAGS = {name: t.serving.page_flag for name, t in SERVED.items()}
UI_PORT_ENV, DEFAULT_UI_PORT = "PIXTOK_UI_PORT", 7860
UI_USER, UI_PASSWORD_ENV, UI_PASSWORD_FILE = "pixtok", "PIXTOK_UI_PASSWORD", "ui_password"
# requests the page sends at once, per task; TorchServe batches the rest
CONCURRENCY = {name: t.serving.page_concurrency for name, t in SERVED.items()}


def ui_port() -> int:
    value = os.environ.get(UI_PORT_ENV, str(DEFAULT_UI_PORT))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UserError(f"{UI_PORT_ENV}={value!r}: expected a port number 1..65535")
    return int(value)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False     # a host name: it may resolve to any interface


def needs_login(host: str, forced: bool = False) -> bool:
    """The page asks for a login unless it listens on loopback only (or forced)."""
    return forced or not is_loopback(host)


def new_ui_password(run_dir: Path, given: str = "") -> tuple[str, bool]:
    """(password, generated) for a page that asks for a login: `given` ($PIXTOK_UI_PASSWORD),
    else a new random one written to the run folder's ui_password (mode 0600) for this start."""
    path = Path(run_dir) / UI_PASSWORD_FILE
    path.unlink(missing_ok=True)          # never leave an older start's password behind
    if given:
        return given, False
    password = secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password, True


def ui_login(run_dir: Path) -> tuple[str, str]:
    """(user, password) the page asks for: $PIXTOK_UI_PASSWORD, else the run folder's file."""
    password = os.environ.get(UI_PASSWORD_ENV, "")
    path = Path(run_dir) / UI_PASSWORD_FILE
    if not password and path.is_file():
        password = path.read_text().strip()
    if not password:
        raise UserError(f"the page listens beyond loopback and needs a password: set "
                        f"{UI_PASSWORD_ENV}, or start it with `pixtok serve`, which writes {path}")
    return UI_USER, password


def request_timeout() -> float:
    """Seconds to wait for an answer: longer than the slowest model's TorchServe timeout."""
    return 30.0 + max(120, *(t.serving.batching.get("responseTimeout", 120)
                             for t in SERVED.values()))


def model_names(overrides: dict | None = None) -> dict:
    """{task: model name}: an override, else $PIXTOK_CLASSIFIER / _DEPTH_MODEL / _GENERATOR,
    else the default names of docs/architecture.md."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    return {task: overrides.get(task) or os.environ.get(env) or DEFAULT_MODELS[task]
            for task, env in MODEL_ENV.items()}


def examples_dir(run_dir: Path) -> Path:
    """Where `pixtok serve` writes the page's example inputs (the page only reads them)."""
    return Path(run_dir) / "ui" / "examples"


# --- what the server serves (read from the run folder, never from the model itself) ---------
def served_archives(run_dir: Path) -> dict[str, Path]:
    """{model name: .mar path} from the config.properties `pixtok serve` wrote; {} without one."""
    config = Path(run_dir) / "config.properties"
    if not config.is_file():
        return {}
    props = read_properties(config)
    try:
        models = json.loads(props.get("models", "{}").replace("\\\\", "\\"))
    except json.JSONDecodeError:
        return {}
    store = Path(props.get("model_store", "").replace("\\\\", "\\"))
    return {name: store / next(iter(versions.values()))["marName"]
            for name, versions in models.items() if versions}


def archive_task(mar: Path) -> str | None:
    return (read_archive_json(mar, "config.json") or {}).get("task")


def served_models(run_dir: Path) -> dict[str, list[str]]:
    """{task: [model names]} of the server of `run_dir`, from its archives' config.json."""
    by_task: dict[str, list[str]] = {}
    for name, mar in sorted(served_archives(run_dir).items()):
        by_task.setdefault(archive_task(mar) or "classify", []).append(name)
    return by_task


def archive_labels(mar: Path) -> list[str]:
    """Class names from an archive's config.json "labels" or its index_to_name.json; [] if none."""
    labels = (read_archive_json(mar, "config.json") or {}).get("labels")
    if isinstance(labels, list) and labels:
        return [str(label) for label in labels]
    index = read_archive_json(mar, "index_to_name.json") or {}
    try:
        return [str(index[k]) for k in sorted(index, key=int)]
    except (ValueError, TypeError):
        return []
