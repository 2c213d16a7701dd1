"""Models whose archive opens but whose worker cannot load it, read from TorchServe's logs.

TorchServe starts a worker for every registered model and, when the worker dies while loading
(weights damaged inside the .mar, a handler that raises), logs `Retry worker: PORT in N seconds.`
and starts another one, forever. `pixtok serve` counts those lines per model while it waits for
READY workers (serving/torchserve.py wait_ready); after PIXTOK_LOAD_ATTEMPTS failed loads (default
3) the model counts as damaged, named with the last exception its worker printed.

Only the part of the logs written after this start is read (the run folder's logs are appended
to by every start), and log4j may write a line twice: each distinct line counts once.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pixtok.errors import UserError

ATTEMPTS_ENV = "PIXTOK_LOAD_ATTEMPTS"
DEFAULT_ATTEMPTS = 3
# "... [INFO ] W-9001-NAME_VERSION org.pytorch.serve.wlm.WorkerThread - Retry worker: 9001 ..."
# (the version is the text after the last underscore; a model name may hold underscores)
RETRY = re.compile(r"\] W-\d+-(?P<model>\S+)_[^_\s]+ org\.pytorch\.serve\.wlm\.WorkerThread - "
                   r"Retry worker: ")
# "... W-9001-NAME_VERSION-stdout MODEL_LOG - some.module.SomeError: what went wrong"
RAISED = re.compile(r"\] W-\d+-(?P<model>\S+)_[^_\s]+-std(?:out|err) MODEL_LOG - "
                    r"(?P<error>[A-Za-z_][\w.]*(?:Error|Exception)\b.*)$")


def load_attempts() -> int:
    """How many failed loads make a model damaged: $PIXTOK_LOAD_ATTEMPTS (>= 1), default 3."""
    value = os.environ.get(ATTEMPTS_ENV, str(DEFAULT_ATTEMPTS)).strip()
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{ATTEMPTS_ENV}={value!r}: expected an integer >= 1")
    return int(value)


class LogReader:
    """The lines a log file gains from the moment this reader is made (a whole last line only)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.offset = path.stat().st_size
        except OSError:
            self.offset = 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        whole = data.rfind(b"\n") + 1
        self.offset += whole
        return data[:whole].decode(errors="replace").splitlines()


class LoadFailures:
    """Failed worker loads per model since this start, and each model's last exception line."""

    def __init__(self, logs: Path, attempts: int | None = None, archives: dict | None = None):
        self.attempts = attempts or load_attempts()
        self.archives = archives or {}     # {model: its .mar}, to name the file
        self.frontend = LogReader(logs / "ts_log.log")
        self.workers = LogReader(logs / "model_log.log")
        self.logs = logs
        self.retries: dict[str, set[str]] = {}
        self.errors: dict[str, str] = {}

    def poll(self) -> None:
        for line in self.frontend.new_lines():
            m = RETRY.search(line)
            if m:
                self.retries.setdefault(m["model"], set()).add(line)
        for line in self.workers.new_lines():
            m = RAISED.search(line)
            if m:
                self.errors[m["model"]] = " ".join(m["error"].split())[:300]

    def failed(self, models) -> dict[str, str]:
        """{model: one-line reason} of the given models that failed to load `attempts` times."""
        self.poll()
        out = {}
        for name in models:
            count = len(self.retries.get(name, ()))
            if count >= self.attempts:
                error = self.errors.get(name, "no exception in the model log")
                where = f"{self.archives[name]} (model {name})" if name in self.archives else name
                out[name] = (f"{where}: the archive opens but its worker failed to load it "
                             f"{count} times ({error}); see {self.logs / 'model_log.log'}")
        return out
