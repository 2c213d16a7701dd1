"""One of the background processes `pixtok serve` manages in a run folder (TorchServe, KServe's
ModelServer, the gate, the Gradio page): its pid file, how it is spawned, the wait until it is
ready, its stop (with a drain first where the caller gives one) and the tail of its output.

A pid file counts only while its process is alive and its command line names the process's
marker (a recycled pid does not count); a stale pid file is removed when it is read.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

READY, EXITED, TIMED_OUT = "ready", "exited", "timed out"    # how a wait for readiness ended


def live_pid(path: Path, marker: str) -> int | None:
    """The pid that the pid file `path` holds, if that process is alive and its command line
    names `marker` (a recycled pid does not count); a stale pid file is removed."""
    import psutil

    try:
        pid = int(path.read_text().strip())
        if marker in psutil.Process(pid).cmdline():
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    path.unlink(missing_ok=True)
    return None


def reap(procs: list, timeout: float) -> None:
    """Wait up to timeout s for terminated processes to exit; SIGKILL the ones still running."""
    import psutil

    _, running = psutil.wait_procs(procs, timeout=timeout)
    for proc in running:
        proc.kill()
    psutil.wait_procs(running, timeout=5)


def command_line(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tail_of(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, joined by " | " ("" when there is no such file)."""
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:])


@dataclass(frozen=True)
class ManagedProcess:
    """A process of the run folder: pid_path holds its pid, marker is in its command line,
    out_path takes its output."""
    pid_path: Path
    marker: str
    out_path: Path

    def running_pid(self) -> int | None:
        """Its pid if it is alive (a stale pid file is removed)."""
        return live_pid(self.pid_path, self.marker)

    def spawn(self, cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
        """Start it in the background, its output appended to out_path and its pid written to
        pid_path. It runs in a session of its own, so it outlives `pixtok serve` and its
        terminal's Ctrl-C."""
        with open(self.out_path, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_path.write_text(f"{proc.pid}\n")
        return proc

    def wait_ready(self, running: Callable[[], bool], ready: Callable[[], bool],
                   timeout: float, poll: float = 0.25) -> str:
        """Until ready() (-> READY), running() is false (-> EXITED; the pid file is removed) or
        `timeout` seconds pass (-> TIMED_OUT). The caller says what each means."""
        deadline = time.monotonic() + timeout
        while True:
            if not running():
                self.pid_path.unlink(missing_ok=True)
                return EXITED
            if ready():
                return READY
            if time.monotonic() > deadline:
                return TIMED_OUT
            time.sleep(poll)

    def stop(self, timeout: float, drain: Callable[[object], list] | None = None) -> int | None:
        """Stop it: drain(process) first where given (it returns further processes to wait for,
        e.g. workers), then SIGTERM, and SIGKILL for whatever still runs after `timeout` s. The
        pid file is removed. Returns the pid, or None if it was not running."""
        import psutil

        pid = self.running_pid()
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                others = drain(proc) if drain is not None else []
                proc.terminate()
                reap([proc, *others], timeout)
        self.pid_path.unlink(missing_ok=True)
        return pid

    def tail(self, lines: int = 3) -> str:
        """The last lines of its output, joined by " | "."""
        return tail_of(self.out_path, lines)


# --- the bar that `pixtok serve` shows while models load ------------------------------------
@contextlib.contextmanager
def cleared_on_error(bar):
    """Close a bar when the block ends; on an error clear it first, so that the error is the
    one line it leaves on stderr."""
    try:
        yield bar
    except BaseException:
        bar.leave = False
        bar.close()
        raise
    bar.close()


def ready_bar(models: list[str]):
    """A bar on stderr over the models that have a READY worker (or were given up on); its
    description names the ones still loading. TQDM_DISABLE=1 turns it off."""
    from tqdm import tqdm

    return tqdm(total=len(models), desc=waiting_for(models), unit="model", dynamic_ncols=True,
                file=sys.stderr)


def waiting_for(models: list[str]) -> str:
    return f"pixtok serve: waiting for READY: {', '.join(models)}" if models else \
        "pixtok serve: every model READY"
