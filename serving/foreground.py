"""`pixtok serve --foreground` (a container's entry point): stay until SIGTERM/SIGINT (exit 0)
or until the server or the gate dies (exit 1), echo the logs on stdout meanwhile, and stop the
page, the server and its workers and the gate either way, within STOP_WITHIN seconds."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from serving.kserve_start import kserve_log_tail
from serving.launcher import stop
from serving.page_start import FrontEnd, stop_ui
from serving.run_folder import (
    Server,
    running_gate_pid,
    running_kserve_pid,
    running_pid,
    running_ui_pid,
)
from serving.torchserve import drain_seconds, log_tail

STOP_WITHIN = 8.0     # seconds from SIGTERM to the end of the stop: `docker stop` kills at 10 s
FOLLOWED_LOGS = {"torchserve.out": "torchserve", "gradio.out": "page", "gate.out": "gate"}
# TorchServe's console output (torchserve.out) holds its frontend log at INFO and, by log4j's
# additivity, every line of access_log.log and model_log.log too; those lines are marked so
TORCHSERVE_SOURCES = {" ACCESS_LOG - ": "access", " MODEL_LOG - ": "model"}


def log_source(line: str, source: str) -> str:
    """[access] and [model] for TorchServe's access and worker lines, else the file's source."""
    if source == "torchserve":
        return next((s for mark, s in TORCHSERVE_SOURCES.items() if mark in line), source)
    return source


class LogFollower:
    """Every line TorchServe's and the page's output gain from now on, also on stdout with its
    source in brackets, so `docker logs` / `podman logs` show it. A truncated file is read anew.
    (TorchServe's metrics logs are not followed: the metrics API serves them.)"""

    def __init__(self, logs: Path, out=None):
        self.logs, self.out = logs, out
        self.at = {}        # file name -> (inode, offset read up to)
        for name in FOLLOWED_LOGS:
            with contextlib.suppress(OSError):
                st = (logs / name).stat()
                self.at[name] = (st.st_ino, st.st_size)

    def poll(self) -> None:
        out = self.out or sys.stdout
        for name, source in FOLLOWED_LOGS.items():
            try:
                st = (self.logs / name).stat()
            except OSError:
                continue
            inode, offset = self.at.get(name, (st.st_ino, 0))
            if inode != st.st_ino or st.st_size < offset:      # replaced or truncated
                offset = 0
            if st.st_size > offset:
                with open(self.logs / name, "rb") as f:
                    f.seek(offset)
                    data = f.read(st.st_size - offset)
                whole = data.rfind(b"\n") + 1      # a line still being written waits
                for line in data[:whole].decode(errors="replace").splitlines():
                    print(f"[{log_source(line, source)}] {line}", file=out)
                offset += whole
            self.at[name] = (st.st_ino, offset)
        out.flush()


def catch_stop_signals() -> list[int]:
    """From now on SIGTERM and SIGINT are noted in the returned list instead of ending the process,
    so the foreground loop stops what it started (a container's PID 1 ignores an unhandled
    SIGTERM, and dying on it would leave TorchServe and the page running)."""
    caught: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: caught.append(signum))
    return caught


def reap_children() -> None:
    """Collect exited children: as a container's PID 1 this process inherits every orphan."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def hold(server: Server, ui: FrontEnd | None, caught: list[int], poll: float = 0.25,
         follower: LogFollower | None = None) -> int:
    """Until a stop signal (-> 0) or TorchServe's death (-> 1); then stop the page, TorchServe
    and every worker it had (a dead server's workers are orphans nobody else stops), within
    STOP_WITHIN seconds of the signal. The follower echoes the logs meanwhile."""
    run_dir = server.run_dir
    follower = follower or LogFollower(run_dir / "logs")
    workers = watch(server, ui, caught, poll, follower)
    t0 = time.monotonic()
    deadline = t0 + STOP_WITHIN
    say_why_stopping(server, caught, workers)
    stop_ui(run_dir, timeout=1.5)
    follower.poll()
    # a live server stops its own workers; the drain (which may overrun by 1.3 s) leaves
    # TorchServe's own shutdown about 2 s of the budget
    drain_for = min(drain_seconds(), max(0.0, deadline - time.monotonic() - 3.0))
    stop(run_dir, log=lambda msg: print(f"{msg} ({time.monotonic() - t0:.1f} s)",
                                        file=sys.stderr, flush=True),
         drain_for=drain_for, timeout=max(0.5, deadline - time.monotonic()))
    reap_children()
    follower.poll()
    print(f"pixtok serve: stopped in {time.monotonic() - t0:.1f} s", flush=True)
    return 0 if caught else 1


def watch(server: Server, ui: FrontEnd | None, caught: list[int], poll: float,
          follower: LogFollower) -> list:
    """Echo the logs until a stop signal, or the server's or the gate's death; returns the
    server's workers as last seen."""
    import psutil

    run_dir, workers, ui_gone = server.run_dir, [], False
    server_pid = running_kserve_pid if server.kind == "kserve" else running_pid
    gated = server.upstream is not None
    while (not caught and server_pid(run_dir) is not None
           and (not gated or running_gate_pid(run_dir) is not None)):
        follower.poll()
        with contextlib.suppress(psutil.Error):
            workers = psutil.Process(server.pid).children(recursive=True)
        if ui and not ui_gone and running_ui_pid(run_dir) is None:
            ui_gone = True
            print(f"pixtok serve: the Gradio front end exited; see {run_dir / 'logs'} "
                  "(the REST API keeps serving)", file=sys.stderr, flush=True)
        reap_children()
        time.sleep(poll)
    return workers


def say_why_stopping(server: Server, caught: list[int], workers: list) -> None:
    """One line on why the foreground ends; a dead server's workers are killed here."""
    import psutil

    run_dir = server.run_dir
    server_pid = running_kserve_pid if server.kind == "kserve" else running_pid
    if caught:
        print(f"pixtok serve: {signal.Signals(caught[0]).name}, stopping", flush=True)
    elif server.upstream is not None and server_pid(run_dir) is not None:
        print(f"pixtok serve: the gate on the inference port exited; see "
              f"{run_dir / 'logs' / 'gate.out'}", file=sys.stderr, flush=True)
    else:
        name, tail = (("KServe", kserve_log_tail(run_dir)) if server.kind == "kserve"
                      else ("TorchServe", log_tail(run_dir)))
        print(f"pixtok serve: {name} (pid {server.pid}) exited; see {run_dir / 'logs'} "
              f"({tail})", file=sys.stderr, flush=True)
        for proc in workers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
