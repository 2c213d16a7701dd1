"""A worker's part of a graceful stop, and the file it tells the launcher with.

A graceful stop (`pixtok serve --stop`, or SIGTERM to `pixtok serve --foreground`) sends each
worker SIGTERM before it stops TorchServe, whose own shutdown drops every request in flight: the
worker then finishes the batch in hand (a generation stops at the first sampler step after
$PIXTOK_DRAIN_SECONDS and answers 503), answers every later request 503 `shutting_down`, and
tells the launcher it is idle with an empty file $TMPDIR/pixtok-drained-<pid>.
"""
from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from .validate import RequestError

log = logging.getLogger(__name__)


DRAIN_SECONDS = 4.0     # default of $PIXTOK_DRAIN_SECONDS: how long a stop lets a request run on
SHUTTING_DOWN = RequestError(503, "shutting_down", "the server is stopping; send the request "
                             "again once it is back")


def drained_file(pid: int) -> Path:
    """The file a draining worker leaves once it holds no request (in the worker's $TMPDIR)."""
    return Path(tempfile.gettempdir()) / f"pixtok-drained-{pid}"


class Drain:
    """A worker's part of a graceful stop (see the module's docstring); the handler holds one."""

    def __init__(self):
        self.deadline = None      # time.monotonic() after which a running generation stops
        self.busy = False

    def install(self) -> None:
        try:
            signal.signal(signal.SIGTERM, self.begin)
        except ValueError:        # not the main thread: a handler driven by a test
            pass

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self, signum=None, frame=None) -> None:
        seconds = float(os.environ.get("PIXTOK_DRAIN_SECONDS", DRAIN_SECONDS))
        self.deadline = time.monotonic() + seconds
        log.info("pixtok: stopping; finishing the request in hand within %.0f s", seconds)
        if not self.busy:
            self.idle()

    def overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def idle(self) -> None:
        drained_file(os.getpid()).touch()
