"""The run folder of `pixtok serve` ($PIXTOK_RUN_DIR, default ~/.cache/pixtok/run/, mode 0700)
and what runs from it: where each process keeps its pid file and output, which server runs,
the ports, and the Server a start returns.

The folder holds everything a server writes: config.properties, key_file.json (TorchServe writes
it into its working directory, which is this folder), gate.json, logs/, and tmp/ with
TorchServe's pid file, worker sockets and unpacked archives. TorchServe's own "one server per
machine" pid file lives in $TMPDIR, so pointing TMPDIR at tmp/ lets two run folders (a user's
server and a test's) run side by side.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pixtok.errors import UserError
from serving.client import PORTS, Client, default_run_dir
from serving.process import ManagedProcess

ROOT = Path(__file__).resolve().parents[1]
SERVER_CLASS = "org.pytorch.serve.ModelServer"     # in TorchServe's command line
KSERVE_MODULE = "serving.kserve_server"
UI_MODULE = "serving.gradio_app"
GATE_MODULE = "serving.gate"


class ServeError(UserError):
    """The server cannot start, is already running, or did not come up."""


@dataclass
class Server:
    """A running `pixtok serve`: where it listens and where its state is."""
    run_dir: Path
    pid: int
    host: str
    ports: dict
    models: list[str] = field(default_factory=list)
    broken: dict = field(default_factory=dict)      # {name: why} of damaged models left out
    kind: str = "torchserve"
    upstream: str | None = None      # TorchServe's own inference URL when the gate is in front

    @property
    def inference_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.ports['metrics']}/metrics"

    def client(self, timeout: float = 120.0) -> Client:
        management = self.management_url if self.kind == "torchserve" else None
        return Client(self.inference_url, self.run_dir, management, timeout)


def bracketed(host: str) -> str:
    """A host as it appears in a URL: IPv6 addresses go in brackets."""
    return f"[{host}]" if ":" in host else host


def url_host(host: str) -> str:
    """Where a client reaches a server bound to host: all interfaces are reached locally."""
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    return bracketed(local.get(host, host))


_HANDED_OUT: set[int] = set()     # ports free_ports gave this process: never given twice


def free_ports(avoid=()) -> dict:
    """A distinct port that nothing listens on right now for every API (tests, benchmarks),
    none of them in `avoid` nor handed out by an earlier call in this process: the kernel may
    offer a port it just offered again, and a server not yet started does not hold its ports
    (a loopback port picked for TorchServe behind the gate once equalled its gRPC port)."""
    taken = _HANDED_OUT | set(avoid)
    held, ports = [], []
    try:
        while len(ports) < len(PORTS):
            s = socket.socket()
            held.append(s)     # kept bound until all are chosen, so no port comes twice
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in taken:
                ports.append(port)
                taken.add(port)
            if len(held) > 64 * len(PORTS):
                raise ServeError("no free loopback ports left to choose from")
    finally:
        for s in held:
            s.close()
    _HANDED_OUT.update(ports)
    return dict(zip(PORTS, ports))


def ports_from_env() -> dict:
    ports = {}
    for api, (env, default) in PORTS.items():
        value = os.environ.get(env, str(default))
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ServeError(f"{env}={value!r}: expected a port number 1..65535")
        ports[api] = int(value)
    return ports


def check_port_free(host: str, port: int, what: str, hint: str) -> None:
    """ServeError unless this process could listen on host:port (for `what`; `hint` says what
    to do instead)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port} for {what} ({e.strerror}); "
                             f"{hint}") from None


def check_ports_free(host: str, ports: dict) -> None:
    for api, number in ports.items():
        check_port_free(host, number, f"the {api} API", f"set {PORTS[api][0]} to a free port")


def positive_int_env(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, str(default)).strip()
    if not value.isdigit() or int(value) < minimum:
        raise ServeError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def prepare_run_dir(run_dir=None) -> Path:
    """The run folder, created private (0700) with its logs/ and tmp/."""
    run_dir = Path(run_dir or default_run_dir()).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "tmp").mkdir(exist_ok=True)
    return run_dir


def resolved(run_dir=None) -> Path:
    """The run folder's path (the default one without an argument), not created."""
    return Path(run_dir or default_run_dir()).expanduser().resolve()


@contextlib.contextmanager
def run_dir_writes(run_dir: Path):
    """An OSError writing the run folder's files (a full or read-only disk) is a ServeError."""
    try:
        yield
    except OSError as e:
        raise ServeError(f"cannot write into the run folder {run_dir} ({e.strerror or e}): "
                         "free some space or set PIXTOK_RUN_DIR to another folder") from None


def module_env(run_dir: Path, env: dict | None) -> dict:
    """The environment of the gate and the page: this repository importable, Gradio's files in
    the run folder."""
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), merged.get("PYTHONPATH")) if p)
    merged.setdefault("GRADIO_TEMP_DIR", str(run_dir / "tmp" / "gradio"))
    merged["GRADIO_ANALYTICS_ENABLED"] = "False"
    return merged


# --- the processes of a run folder --------------------------------------------------------------
def torchserve_process(run_dir: Path) -> ManagedProcess:
    """TorchServe writes this pid file itself (it daemonises: `torchserve --start`)."""
    run_dir = Path(run_dir)
    return ManagedProcess(run_dir / "tmp" / ".model_server.pid", SERVER_CLASS,
                          run_dir / "logs" / "torchserve.out")


def kserve_process(run_dir: Path) -> ManagedProcess:
    run_dir = Path(run_dir)
    return ManagedProcess(run_dir / "tmp" / "kserve.pid", KSERVE_MODULE,
                          run_dir / "logs" / "kserve.out")


def gate_process(run_dir: Path) -> ManagedProcess:
    run_dir = Path(run_dir)
    return ManagedProcess(run_dir / "tmp" / "gate.pid", GATE_MODULE, run_dir / "logs" / "gate.out")


def page_process(run_dir: Path) -> ManagedProcess:
    run_dir = Path(run_dir)
    return ManagedProcess(run_dir / "gradio.pid", UI_MODULE, run_dir / "logs" / "gradio.out")


def pid_file(run_dir: Path) -> Path:
    return torchserve_process(run_dir).pid_path


def kserve_pid_file(run_dir: Path) -> Path:
    return kserve_process(run_dir).pid_path


def gate_pid_file(run_dir: Path) -> Path:
    return gate_process(run_dir).pid_path


def ui_pid_file(run_dir: Path) -> Path:
    return page_process(run_dir).pid_path


def gate_file(run_dir: Path) -> Path:
    """gate.json: where the gate answers and where TorchServe does; serving/client.py reads the
    first (config.properties' inference address is TorchServe's, behind the gate)."""
    return Path(run_dir) / "gate.json"


def running_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's TorchServe if it is alive."""
    return torchserve_process(run_dir).running_pid()


def running_kserve_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's KServe ModelServer if it is alive."""
    return kserve_process(run_dir).running_pid()


def running_gate_pid(run_dir: Path) -> int | None:
    return gate_process(run_dir).running_pid()


def running_ui_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's Gradio front end if it is alive."""
    return page_process(run_dir).running_pid()


def running_server(run_dir: Path) -> tuple[str, int] | None:
    """(kind, pid) of the server this run folder runs, or None."""
    pid = running_pid(run_dir)
    if pid is not None:
        return "torchserve", pid
    pid = running_kserve_pid(run_dir)
    return ("kserve", pid) if pid is not None else None


def refuse_second_server(run_dir: Path) -> None:
    running = running_server(run_dir)
    if running is not None:
        kind, pid = running
        raise ServeError(f"already running ({kind}, pid {pid}, run folder {run_dir}); stop it "
                         "with `pixtok serve --stop`")
