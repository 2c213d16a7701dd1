"""Starting and stopping the Gradio page (serving/gradio_app.py, a REST client) as a process of
its own: pid file gradio.pid, output logs/gradio.out, Gradio's temp files tmp/gradio/.
Beyond loopback the page asks for a login (user pixtok; $PIXTOK_UI_PASSWORD or a password made
at each start, kept in ui_password, mode 0600, and printed once)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pixtok.errors import UserError
from serving.client import local_url
from serving.page_settings import (
    UI_MODEL_FLAGS,
    UI_PASSWORD_ENV,
    UI_PASSWORD_FILE,
    UI_USER,
    examples_dir,
    needs_login,
    new_ui_password,
    ui_port,
)
from serving.process import EXITED, READY
from serving.run_folder import (
    UI_MODULE,
    ServeError,
    check_port_free,
    module_env,
    page_process,
    prepare_run_dir,
    resolved,
    url_host,
)


@dataclass
class FrontEnd:
    """A running Gradio front end of a run folder; login is (user, password) or None."""
    run_dir: Path
    pid: int
    host: str
    port: int
    login: tuple[str, str] | None = None
    password_generated: bool = False

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}/"


def ui_port_from_env() -> int:
    try:
        return ui_port()
    except UserError as e:
        raise ServeError(str(e)) from None


def check_ui_port_free(host: str, port: int) -> None:
    check_port_free(host, port, "the Gradio front end",
                    "set PIXTOK_UI_PORT to a free port, or serve without it (--no-ui)")


def refuse_second_page(run_dir: Path, where: str) -> None:
    pid = page_process(run_dir).running_pid()
    if pid is not None:
        raise ServeError(f"the Gradio front end is already running (pid {pid}{where}); stop it "
                         "with `pixtok serve --stop`")


def start_ui(run_dir=None, host: str = "127.0.0.1", port: int | None = None,
             models: dict | None = None, env: dict | None = None, timeout: float | None = None,
             log=print, login: bool = False, examples=None) -> FrontEnd:
    """Start the Gradio front end for the server of `run_dir`; return once its page answers.

    models ({task: name}) and env (extra environment variables) override the defaults. The page
    asks for user pixtok's password when host is not loopback, or always with login=True.
    examples(folder): writes the page's example inputs first (`pixtok serve` passes training's
    writer; the page only reads the folder)."""

    run_dir = prepare_run_dir(run_dir)
    refuse_second_page(run_dir, f", run folder {run_dir}")
    port = port or ui_port_from_env()
    check_ui_port_free(host, port)
    if examples is not None:    # written here, so the front end never loads torch or data code
        examples(examples_dir(run_dir))
    cmd = [sys.executable, "-m", UI_MODULE, "--host", host, "--port", str(port),
           "--run-dir", str(run_dir)]
    for task, name in (models or {}).items():
        cmd += [UI_MODEL_FLAGS[task], name]
    credentials, generated = None, False
    if needs_login(host, login):
        given = {**os.environ, **(env or {})}.get(UI_PASSWORD_ENV, "")
        password, generated = new_ui_password(run_dir, given)
        credentials = (UI_USER, password)
        cmd.append("--login")       # the app reads the same variable, or the file just written
    else:
        (run_dir / UI_PASSWORD_FILE).unlink(missing_ok=True)
    proc = page_process(run_dir).spawn(cmd, run_dir, module_env(run_dir, env))
    ui = FrontEnd(run_dir, proc.pid, host, port, credentials, generated)
    wait_for_page(ui, proc, timeout or float(os.environ.get("PIXTOK_UI_TIMEOUT", 120)))
    return ui


def wait_for_page(ui: FrontEnd, proc, timeout: float) -> None:
    """Until the page answers (or asks for its login); ServeError if it exits or stays silent
    for `timeout` seconds (then it is stopped)."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def answers() -> bool:
        try:
            with opener.open(local_url(ui.url) + "/config", timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401 and bool(ui.login)     # up, and asking for the login
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    page = page_process(ui.run_dir)
    outcome = page.wait_ready(lambda: proc.poll() is None, answers, timeout)
    if outcome == READY:
        return
    if outcome == EXITED:
        raise ServeError(f"the Gradio front end exited (code {proc.returncode}); see "
                         f"{page.out_path} ({page.tail()})")
    stop_ui(ui.run_dir, log=lambda *_: None)
    raise ServeError(f"the Gradio front end did not answer on {ui.url} within "
                     f"{timeout:.0f} s; see {page.out_path}")


def stop_ui(run_dir=None, log=print, timeout: float = 10.0) -> bool:
    """Stop this run folder's Gradio front end. False if none was running."""
    run_dir = resolved(run_dir)
    pid = page_process(run_dir).stop(timeout)
    if pid is None:
        return False
    (run_dir / UI_PASSWORD_FILE).unlink(missing_ok=True)     # valid for this start only
    log(f"pixtok serve: Gradio front end stopped (pid {pid})")
    return True
